"""Detect a distillation phase that has stopped learning, so that it is reported as failed, never as a result.

The matching loss of a student that does not move at all is exactly the number of matched branches (2 with
per-branch normalisation, 1 with LoRS's merged branches): each branch's distance equals its denominator. A
phase has collapsed when, for a whole window of iterations, no loss fell below that no-move value (the
synthetic set never brought the student closer to the target than standing still does), or when both learned
lrs have shrunk to a hundredth of their initial value (every gradient scales with the lr: nothing recovers).

The verdict is the phase's state at its end: a phase whose loss sits at the no-move value for a window and then
falls below it has learned, and is not a failure. That happens when no lr beats standing still from the real
initialisation and calibration starts the learned lr small (shapes-large-500, phase 1 with the shortcut: 2.000
for its first 20 iterations, then down to 1.71 by iteration 200; it was reported FAILED before).
"""

from __future__ import annotations

from collections import deque

NO_MOVE_MARGIN = 1e-3  # a loss counts as progress only below (1 - margin) x the no-move value
LR_COLLAPSE = 1e-2  # both learned lrs below this fraction of lr_init
MIN_WINDOW = 10


def no_move_loss(dc) -> float:
    """The matching loss of a student that does not move."""
    return 1.0 if dc.merge_loss_branches else 2.0


def window_for(iterations: int) -> int:
    """Iterations of evidence needed: a tenth of the phase, at least MIN_WINDOW."""
    return max(MIN_WINDOW, iterations // 10)


class CollapseWatch:
    """Fed every iteration's loss and learned lrs; `collapse` holds the current finding (or None), so after the
    last iteration it says whether the phase ended collapsed."""

    def __init__(self, no_move: float, lr_init: float, iterations: int):
        self.no_move, self.lr_init = no_move, lr_init
        self.recent = deque(maxlen=window_for(iterations))
        self.collapse: dict | None = None

    def update(self, loss: float, lrs: tuple[float, ...], iteration: int) -> str | None:
        """Record one iteration; "collapsed" when it makes the phase count as collapsed, "recovered" when it ends
        a collapse (the loss fell below the no-move value again, or the lrs grew back), else None."""
        self.recent.append(loss)
        reason = None
        if len(self.recent) == self.recent.maxlen and min(self.recent) >= (1 - NO_MOVE_MARGIN) * self.no_move:
            reason = (
                f"matching loss at or above the no-move value {self.no_move:.3f} for {len(self.recent)}"
                f" iterations (min {min(self.recent):.4f})"
            )
        elif self.lr_init > 0 and max(lrs) < LR_COLLAPSE * self.lr_init:
            reason = f"learned lrs {', '.join(f'{lr:.2g}' for lr in lrs)} fell below {LR_COLLAPSE:g} x lr_init"
        if reason is not None and self.collapse is None:
            self.collapse = {"iteration": iteration, "reason": reason}
            return "collapsed"
        if reason is None and self.collapse is not None:
            self.collapse = None
            return "recovered"
        return None
