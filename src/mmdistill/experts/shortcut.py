"""Plain and shortcut (convexified) expert trajectories, computed on the fly from the stored snapshots.

PTM-ST replaces the expert path between snapshots `start` and `end` by a straight line from one to the other,
walked at the pace of the real path: for parameter tensor l, after t of the K steps the position along the line
is beta_l(t) = sum_{p<t} n_{p,l} / sum_{p<K} n_{p,l}, with n_{p,l} = ||theta_l^{p+1} - theta_l^p||_2 (PTM-ST, eq. 4).
Experts store the n_{p,l}, so a shortcut point needs only the two endpoint rows. Windows here are inclusive at
both ends: the reference's `convexify --start 0 --end 6` (end exclusive) is our start 0, end 5.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from mmdistill.errors import UserError
from mmdistill.experts.reference import require_no_experts, write_reference
from mmdistill.experts.store import ExpertStore, expert_path, trajectory_step_norms, write_expert
from mmdistill.model import GROUPS, ParamLayout

logger = logging.getLogger(__name__)


def shortcut_window(
    first: torch.Tensor, last: torch.Tensor, step_norms: torch.Tensor, layout: ParamLayout, t: int
) -> torch.Tensor:
    """Point t (0..K) of the shortcut from `first` to `last`, whose real path took the K steps in `step_norms`.

    `step_norms` is [K, n_tensors]; a tensor that never moved (total norm 0) stays at `first`. The endpoints are
    returned exactly (copies of `first` and `last`).
    """
    steps = step_norms.shape[0]
    if not 0 <= t <= steps:
        raise ValueError(f"shortcut point {t} outside the window's 0..{steps}")
    if t == 0:
        return first.clone()
    if t == steps:
        return last.clone()
    total = step_norms.sum(0)
    beta = step_norms[:t].sum(0) / torch.where(total > 0, total, torch.ones_like(total))
    sizes = torch.tensor(layout.sizes, device=beta.device)
    beta = beta.repeat_interleave(sizes).to(device=first.device, dtype=first.dtype)
    return (1 - beta) * first + beta * last


def shortcut_trajectory(store: ExpertStore, expert: int, start: int, end: int) -> dict[str, torch.Tensor]:
    """All points of the shortcut between snapshots start and end (inclusive): [end - start + 1, P] per group."""
    if not 0 <= start < end:
        raise UserError(f"bad shortcut window {start}..{end}: need 0 <= start < end")
    first, last = store.snapshot(expert, start), store.snapshot(expert, end)
    norms = store.step_norms(expert)
    return {
        g: torch.stack(
            [
                shortcut_window(first[g], last[g], norms[g][start:end], store.layouts[g], t)
                for t in range(end - start + 1)
            ]
        )
        for g in GROUPS
    }


def to_device(tensors: dict[str, torch.Tensor], device: torch.device | str | None) -> dict[str, torch.Tensor]:
    """Expert rows (read into ordinary CPU memory) onto `device`. To a GPU they go through pinned memory and
    copy asynchronously, so that reading the next row overlaps the transfer; CPU tensors stay as they are."""
    device = torch.device(device) if device is not None else None
    if device is None or device.type != "cuda":
        return tensors
    return {g: t.pin_memory().to(device, non_blocking=True) for g, t in tensors.items()}


def matching_pair(
    store: ExpertStore,
    expert: int,
    start_epoch: int,
    expert_epochs: int,
    shortcut_end: int | None,
    device: torch.device | str | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(theta_start, theta_target) float32 per group, on `device` (default: the CPU): snapshots s and s + M of
    the plain trajectory, or of the shortcut over window 0..shortcut_end (reads only rows 0 and shortcut_end
    plus the step norms; the shortcut points are computed on `device`)."""
    target_epoch = start_epoch + expert_epochs
    if shortcut_end is None:
        return (
            to_device(store.snapshot(expert, start_epoch), device),
            to_device(store.snapshot(expert, target_epoch), device),
        )
    first, last = to_device(store.snapshot(expert, 0), device), to_device(store.snapshot(expert, shortcut_end), device)
    norms = store.step_norms(expert)

    def point(t: int) -> dict[str, torch.Tensor]:
        return {g: shortcut_window(first[g], last[g], norms[g][:shortcut_end], store.layouts[g], t) for g in GROUPS}

    return point(start_epoch), point(target_epoch)


def export_shortcut(experts_dir: Path, out: Path, start: int, end: int, fmt: str = "native") -> None:
    """Write the shortcut snapshots start..end of every expert, for inspection or for the reference code.

    Distillation never reads these files: it calls `matching_pair` on the original experts.
    native: our expert files (with the step norms of the new path); reference: `{img,txt}_replay_buffer_{n}.pt`.
    """
    store = ExpertStore(experts_dir)
    if not 0 <= start < end <= store.epochs:
        raise UserError(
            f"bad shortcut window {start}..{end}: need 0 <= start < end <= {store.epochs} (the experts' epochs)"
        )
    out = Path(out)
    if fmt == "reference":
        write_reference(store, out, lambda e: shortcut_trajectory(store, e, start, end))
    elif fmt == "native":
        require_no_experts(out)
        for expert in range(len(store)):
            trajectory = shortcut_trajectory(store, expert, start, end)
            norms = {g: trajectory_step_norms(trajectory[g], store.layouts[g]) for g in GROUPS}
            metadata = {
                **store.metadata(expert),
                "fingerprint": "",
                "shortcut_of": str(experts_dir),
                "shortcut_window": f"{start},{end}",
            }
            write_expert(expert_path(out, expert), trajectory, norms, store.layouts, store.dtype, metadata)
    else:
        raise UserError(f"unknown shortcut format {fmt!r}; choose native or reference")
    logger.info("wrote the shortcut %d..%d of %d experts to %s (%s format)", start, end, len(store), out, fmt)
