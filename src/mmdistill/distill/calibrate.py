"""The `auto` settings of a phase, measured on its initial synthetic set and its experts before iteration 0.

Hand-picked lrs do not transfer between data sets: the synthetic pairs that a 1,000-image preset moves by
4 % of their norm per step are moved by 115 % when the set has 440 images and one caption each (measured), and
the student lr that matches a window best shifts with the experts' steps per epoch. So each phase measures:

- `lr_init`: the student lr. The matching loss of the untrained synthetic set is computed on a log grid of lrs
  over a few expert windows; the loss is flat below its minimum and rises steeply above it (shapes-100, phase 1:
  1.95 at the best lr, 3.2 at 3x, 22 at 10x), so the phase starts at half the best lr, on the gentle side; the
  learned-lr update takes it from there. A later phase whose scan finds no lr better than standing still starts
  no lower than the lr its predecessor started at (see `_later_phase_floor`).
- `lr_images`, `lr_texts`, `lr_sim`: SGD lrs that move each variable by a fixed fraction of its norm in the first
  step (RELATIVE_STEP), from the mean norm of its matching gradient at that lr_init (for S: of the change it makes
  to the dense matrix). This makes them independent of the feature scale (unit-norm MiniLM vs BERT CLS vs
  pixels), of the number of pairs and of how S is parametrised. Pixels that a frozen encoder reads are moved by
  that fraction of their features' norm, measured on the features (a Jacobian-vector product through the
  encoder): the student sees features, and a step of 10 % of the pixels' norm moved their features by 28x the
  features' norm to first order on shapes-100 (its pixel space scored r_mean 28.6 that way, 31.6 with the step on the
  features; emoji-100 26.3 and 28.3). Pixels that the student's own encoder reads (fine-tuned or trained from
  scratch) are moved by that fraction of the embeddings the encoder gives them at each expert window's start
  parameters, the same rule: a step of 10 % of the pixels' own norm turned shapes-scratch-100's synthetic
  images into high-frequency noise; on its ConvNet's embeddings it moves the pixels by about 1 % of their norm
  and the images keep their shapes, at the same recall within noise (one set of experts, 1 thread, two
  distillation seeds: r_mean 8.3 and 8.0 vs 7.6 and 8.1; fixed steps of 3, 1, 0.3 and 0.1 % of the pixels' norm
  gave 7.9, 8.5, 8.0, 7.8 on the first seed). A pretrained encoder is far more sensitive: the rule moves
  EfficientNet-Lite0's pixels by about 0.03 % per step on emoji-finetune-100, where recall stays level (24.4 vs
  24.0 over 6 students), and shapes-finetune-100 scores 41.9 vs 34.7 (6 students, 1 thread; see the README).
- `expert_epochs` (M, the target is M epochs after the start): the fewest epochs whose expert steps are at least
  the synthetic steps. With 440 images and one caption each an epoch is 4 steps of batch 128, so a 1-epoch
  target asked 8 synthetic steps to imitate 4 (measured on that set: r_mean 37.7 at M=1, 46.6 at M=2; it is
  1 wherever an epoch holds syn_steps steps, as on every preset).

Any number given in the config wins over the measurement. Every choice comes with a one-line reason.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from functools import partial

import torch
from torch.func import jvp

from mmdistill.config import AUTO, PhaseConfig
from mmdistill.distill.collapse import NO_MOVE_MARGIN, no_move_loss
from mmdistill.distill.matching import (
    InnerLoop,
    InnerPlan,
    encode_frozen,
    matching_gradient,
    matching_loss,
)
from mmdistill.experts.shortcut import matching_pair
from mmdistill.similarity import full_matrix
from mmdistill.utils import generator

SAMPLES = 8  # expert windows the measurements average over
LR_GRID = tuple(10 ** (e / 4) for e in range(-24, 1))  # 1e-6 .. 1, four points per decade
LR_MARGIN = 0.5  # lr_init = LR_MARGIN x the grid's best lr
# Fraction of a variable's norm moved by the first SGD step. The hand settings under which shapes-100 distilled
# well before calibration existed moved images and texts by 4-14 % per step and S by 0.2-0.7 %; with these
# measured instead, shapes-100 reached r_mean 33.1 at 5 %, 35.9 at 10 % and 35.8 at 20 % (S at a tenth of it;
# learned lrs at lr_lr 0.01 in those runs).
# The set that collapsed under the hand settings was being moved by 115-230 % per step.
RELATIVE_STEP = {"images": 0.1, "texts": 0.1, "sim": 0.01}
DATA_KEYS = {"images": "lr_images", "texts": "lr_texts", "sim": "lr_sim"}


@dataclass
class Calibration:
    """A phase's resolved lrs, why each has its value, and the lr scan behind lr_init (if it ran)."""

    lr_init: float
    lr_images: float
    lr_texts: float
    lr_sim: float
    reasons: dict[str, str] = field(default_factory=dict)
    scan: list[tuple[float, float]] = field(default_factory=list)  # (lr, mean matching loss)

    def data_lrs(self) -> dict[str, float]:
        return {"images": self.lr_images, "texts": self.lr_texts, "sim": self.lr_sim}

    def to_json(self) -> dict:
        return {**asdict(self), "scan": [[lr, round(loss, 6)] for lr, loss in self.scan]}


def expert_epochs_for(cfg, phases: list[PhaseConfig], train_captions: int) -> tuple[int, str]:
    """distill.expert_epochs, resolved when auto (see the module docstring), and why."""
    dc = cfg.distill
    if dc.expert_epochs != AUTO:
        return int(dc.expert_epochs), "set in the config"
    steps = math.ceil(train_captions / cfg.experts.batch_size)
    wanted = math.ceil(dc.syn_steps / steps)
    room = min(
        (p.shortcut_end if p.shortcut_end is not None else cfg.experts.epochs) - (p.start_epochs[1] - 1) for p in phases
    )
    epochs = max(1, min(wanted, room))
    reason = (
        f"auto: {steps} expert steps per epoch ({train_captions} captions, batch {cfg.experts.batch_size});"
        f" {epochs} epoch(s) hold {epochs * steps} steps for {dc.syn_steps} synthetic steps"
    )
    if epochs < wanted:
        reason += f" (the phase windows leave room for {room} only)"
    return epochs, reason


def _windows(distiller, p: int, phase: PhaseConfig) -> list[tuple[dict, dict, InnerPlan]]:
    """SAMPLES (theta_start, theta_target, inner plan) triples, from their own random stream."""
    cfg, store = distiller.cfg, distiller.store
    dc, windows = cfg.distill, []
    for sample in range(SAMPLES):
        gen = generator(cfg.seed, "calibrate", p, sample)
        low, high = phase.start_epochs
        start = int(torch.randint(low, high, (1,), generator=gen))
        theta_start, theta_target = matching_pair(
            store, sample % len(store), start, dc.expert_epochs, phase.shortcut_end
        )
        plan = InnerPlan.draw(
            phase.pairs, dc.syn_steps, dc.mini_batch_size, gen, distiller.blend, distiller.device, distiller.crop
        )
        like = distiller.device
        windows.append(
            ({m: t.to(like) for m, t in theta_start.items()}, {m: t.to(like) for m, t in theta_target.items()}, plan)
        )
    return windows


def _with_lr(syn: dict[str, torch.Tensor], lr: float) -> dict[str, torch.Tensor]:
    value = torch.full_like(syn["lr_img"], lr)
    return {**syn, "lr_img": value, "lr_txt": value.clone()}


def _mean_loss(distiller, syn, windows, lr: float) -> float:
    """Mean matching loss of `syn` trained at `lr` (pass 1 only: no gradient needed)."""
    options = distiller.options
    losses = []
    for theta_start, theta_target, plan in windows:
        loop = InnerLoop(
            distiller.model, _with_lr(syn, lr), plan, options["loss_fn"], options["sim_kind"], options["sim_alpha"]
        )
        theta_n, _ = loop.run(theta_start)
        losses.append(matching_loss(theta_n, theta_start, theta_target, options["merge_branches"]).item())
    return statistics.fmean(losses)


def _beats_standing_still(best_loss: float, no_move: float) -> bool:
    return best_loss < (1 - NO_MOVE_MARGIN) * no_move


def _best_lr(scan: list[tuple[float, float]], no_move: float) -> tuple[float, str]:
    """The scan's lr with the lowest matching loss, and why.

    When no lr beats a student that stays put (a late phase whose first small steps lead away from the target
    before larger ones come back towards it: shapes, 3,000 images, phase 1 scanned 2.000 at 1e-6, 2.014 at
    0.0056, 2.004 at 0.032, 2.10 at 0.056), the minimum is the smallest lr, where every data gradient vanishes
    and the phase cannot start. Then the largest lr still within 1 % of the no-move loss is taken: the edge of
    the cliff, where the student moves and learning can begin."""
    finite = [(loss, lr) for lr, loss in scan if math.isfinite(loss)]
    if not finite:
        return LR_GRID[0], "no lr scanned gave a finite matching loss"
    best_loss, best_lr = min(finite)
    if _beats_standing_still(best_loss, no_move):
        return best_lr, (
            f"the best of {len(scan)} lrs scanned on {SAMPLES} expert windows (matching loss {best_loss:.3f} there)"
        )
    edge = max((lr for loss, lr in finite if loss <= 1.01 * no_move), default=best_lr)
    loss = next(loss for loss, lr in finite if lr == edge)
    return edge, (
        f"no lr of {len(scan)} beats the no-move loss {no_move:.3f} on {SAMPLES} expert windows; the"
        f" largest within 1 % of it (matching loss {loss:.3f} there)"
    )


def _later_phase_floor(scan: list[tuple[float, float]], no_move: float, previous: float | None) -> float | None:
    """The lr a later phase starts at when its scan finds no lr that beats standing still, or None.

    Such a phase starts from expert epochs its untrained data (real pairs) does not lead towards, so every lr
    scanned moves the student away from the target and the edge rule picks a tiny one. Its data must then grow to
    move the student at all, and that data fails the student that the earlier phases trained: on shapes-large
    (20,000 images, phase 1 started at 0.0028, a tenth of phase 0's 0.028) its texts grew to 7.6x their norm and
    phase 1 never improved on phase 0 (r_mean 43.4 at 200 pairs, the same as phase 0 alone). The student that the
    later phase continues was trained at the earlier phase's lrs, so the earlier phase's starting lr is the
    measured scale to start from: with it, ptm-st scored 50.8 at 200 pairs and 45.2 at 500 (44.4 before), and no
    set of `bench robustness` triggers the rule."""
    finite = [loss for _, loss in scan if math.isfinite(loss)]
    if previous is None or not finite or _beats_standing_still(min(finite), no_move):
        return None
    return previous


def calibrate(
    distiller, p: int, phase: PhaseConfig, syn: dict[str, torch.Tensor], previous_lr_init: float | None = None
) -> Calibration:
    """Resolve every `auto` lr of phase p from its initial synthetic set `syn` (see the module docstring);
    `previous_lr_init`: the lr_init of phase p - 1 (None for the first phase)."""
    dc = distiller.cfg.distill
    windows = _windows(distiller, p, phase)
    reasons, scan = {}, []
    if dc.lr_init == AUTO:
        scanned, _ = encode_frozen(distiller.model, syn)  # pixels through a frozen encoder: features, once
        scan = [(lr, _mean_loss(distiller, scanned, windows, lr)) for lr in LR_GRID]
        best_lr, why = _best_lr(scan, no_move_loss(dc))
        lr_init = LR_MARGIN * best_lr
        reasons["lr_init"] = f"auto: {LR_MARGIN:g} x {best_lr:.3g}, {why}"
        floor = _later_phase_floor(scan, no_move_loss(dc), previous_lr_init)
        if floor is not None and floor > lr_init:
            lr_init = floor
            reasons["lr_init"] = (
                f"auto: {floor:.3g}, the lr phase {p - 1} started at, since no lr of {len(scan)} beats the no-move"
                f" loss {no_move_loss(dc):.3f} here (the edge rule would give {LR_MARGIN:g} x {best_lr:.3g})"
            )
    else:
        lr_init = float(dc.lr_init)
        reasons["lr_init"] = "set in the config"
    lrs = {"lr_init": lr_init}
    images_read_as, _ = _image_reader(distiller.model, syn["images"], None)
    auto_data = {group: key for group, key in DATA_KEYS.items() if dc[key] == AUTO}
    norms = _gradient_norms(distiller, _with_lr(syn, lr_init), windows) if auto_data else {}
    for group, key in DATA_KEYS.items():
        if group not in auto_data:
            lrs[key] = float(dc[key])
            reasons[key] = "set in the config"
            continue
        size, grad = norms.get(group, (0.0, 0.0))
        if grad > 0 and size > 0 and math.isfinite(grad):
            lrs[key] = RELATIVE_STEP[group] * size / grad
            moved = images_read_as if group == "images" else group
            reasons[key] = (
                f"auto: moves {moved} by {RELATIVE_STEP[group]:.1%} of their norm ({size:.3g}) in the"
                f" first step (mean change per unit lr {grad:.3g})"
            )
        else:  # nothing to learn (identity S) or no gradient at all: the lr is never used to move anything
            lrs[key] = 0.0
            reasons[key] = f"auto: {group} {'has no parameters' if size == 0 else 'receive no gradient'} here"
    return Calibration(**lrs, reasons=reasons, scan=scan)


def _image_reader(model, images: torch.Tensor, theta_start: dict[str, torch.Tensor] | None):
    """(what the student reads of the synthetic images, that reading as a function of them): the features of a
    frozen encoder, the embeddings of a trained one with a window's start parameters, or the images themselves
    (None) where they are features already."""
    if images.dim() != 4:
        return "images", None
    if not model.image_trainable:
        return "the images' features", model.image_features
    return "the student encoder's embeddings of the images", partial(model.image_embedding_at, theta_start)


def _gradient_norms(distiller, syn, windows) -> dict[str, tuple[float, float]]:
    """Per variable group: (norm of its initial value, mean norm of the first-order change that one unit-lr SGD
    step makes to it, over the windows). For images and texts that change is the gradient itself; for the
    similarity it is measured on the dense S the parameters define, so that a low-rank S (where a step on the
    factors moves S by far more than their own norm suggests) and a full S move alike. Pixels that a frozen
    encoder reads are measured by their features, and pixels that a trained encoder reads by the embeddings it
    gives them at each window's start parameters: the mean norm of those and of the change the step makes to them
    (a Jacobian-vector product through the encoder)."""
    dc = distiller.cfg.distill
    sim_keys = [k for k in syn if k.startswith("sim_")]
    n = len(syn["images"])

    def dense(*params):
        return full_matrix(dc.similarity, dict(zip(sim_keys, params)), n, dc.sim_alpha)

    model, images = distiller.model, syn["images"]
    changes: dict[str, list[float]] = {}
    read_sizes: list[float] = []
    for theta_start, theta_target, plan in windows:
        _, grads = matching_gradient(model, syn, theta_start, theta_target, plan, **distiller.options)
        _, read = _image_reader(model, images, theta_start)
        if read is None:
            moved = grads["images"]
        else:
            read_images, moved = jvp(read, (images,), (grads["images"],))
            read_sizes.append(read_images.norm().item())
        changes.setdefault("images", []).append(moved.norm().item())
        changes.setdefault("texts", []).append(grads["texts"].norm().item())
        if sim_keys:
            _, moved = jvp(dense, tuple(syn[k] for k in sim_keys), tuple(grads[k] for k in sim_keys))
            changes.setdefault("sim", []).append(moved.norm().item())
    size = statistics.fmean(read_sizes) if read_sizes else images.norm().item()
    sizes = {"images": size, "texts": syn["texts"].norm().item()}
    if sim_keys:
        sizes["sim"] = dense(*(syn[k] for k in sim_keys)).norm().item()
    return {group: (sizes[group], statistics.fmean(changes[group])) for group in sizes}
