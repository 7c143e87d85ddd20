"""Stage 5: train fresh students on synthetic phases (or real-pair baselines) and report retrieval recall.

The protocol follows the reference's `evaluate_synset_PTM` without its bugs: the image
projection is trained in frozen-image mode, the learning-rate schedule restarts with each phase (unless
`evaluate.lr_schedule=global`), every run is seeded, and the checkpoint is chosen on the validation split while
the test split is only reported (unless `evaluate.protocol=reference`, labelled as selected on test). The same
validation choice decides where a later phase starts (`evaluate.handoff`).

Evaluation is kept cheap: validation/test images come from cached frozen features or from pixels already in
memory, and pixels of synthetic images are pushed through a frozen encoder once per phase, not at every step.
"""

from __future__ import annotations

import bisect
import logging
import math
import statistics
import time
from collections.abc import Iterator

import torch
from torch.optim import SGD

from mmdistill.config import from_dict
from mmdistill.data.transforms import apply_crops, draw_crops, normalize
from mmdistill.errors import UserError
from mmdistill.losses import LOSSES
from mmdistill.metrics import EMBED_BATCH, METRICS, model_recall
from mmdistill.model import GROUPS, DualEncoder, build_model
from mmdistill.prepare import Prepared, prepare
from mmdistill.similarity import similarity_block
from mmdistill.synthetic import live_lrs, phases_for
from mmdistill.utils import derive_seed, generator, resolve_device

logger = logging.getLogger(__name__)

PROTOCOLS = {"val": "val (selected on validation)", "reference": "reference (selected on test)"}


# -- image inputs ----------------------------------------------------------------------------------------
def _student_inputs(model: DualEncoder, bundle: Prepared, images: torch.Tensor, device) -> torch.Tensor:
    """Images as the student's trained part eats them.

    Features pass through. Pixels (normalised for the bundle's encoder) are renormalised for the student's
    encoder (a cross-architecture student may expect other statistics) and, in frozen mode, encoded once:
    a frozen encoder gives the same features at every step.
    """
    if images.dim() == 2:
        return images
    encoder = model.image_encoder if model.image_trainable else model.frozen_image_encoder
    # whitened pixels stay as they are: every student of a whitened set reads them (MTT's ZCA protocol)
    renormalize = (tuple(encoder.mean), tuple(encoder.std)) != (tuple(bundle.mean), tuple(bundle.std))
    if renormalize and bundle.whitening is None:
        mean, std = (torch.tensor(v, device=images.device).view(3, 1, 1) for v in (bundle.mean, bundle.std))
        images = normalize(images * std + mean, encoder.mean, encoder.std)
    if model.image_trainable:
        return images
    with torch.no_grad():
        return torch.cat([model.image_features(chunk.to(device)) for chunk in images.split(EMBED_BATCH)])


def input_chunks(
    model: DualEncoder, bundle: Prepared, split: str, image_size: int, cached: bool, device
) -> Iterator[torch.Tensor]:
    """The student's inputs for every image of a split, EMBED_BATCH images at a time (files decode lazily).

    `cached`: the student's frozen encoder is the one the bundle's features were computed with, so the cached
    features are its output on these images.
    """
    if cached:
        yield from bundle.features[split].split(EMBED_BATCH)
        return
    for ids in torch.arange(len(bundle.splits[split])).split(EMBED_BATCH):
        yield _student_inputs(model, bundle, bundle.normalize(bundle.pixels01(split, ids, image_size)), device)


# -- one student -----------------------------------------------------------------------------------------
# A student "breaks down" when a checkpoint's validation r_mean gives back most of what it had gained over the
# untrained student, not just what overfitting costs. Over 321 students of this project's benchmark runs (frozen,
# fine-tuned and scratch presets, 100-500 pairs, ablations), a later checkpoint gave back at most 51 % of the gain
# (50 epochs on a 50-pair phase); the one student that broke down
# (a fine-tuned EfficientNet, val 33.0 -> 4.1 in one phase) gave back 94 %. The absolute floor keeps a student
# that barely learned from being flagged for the noise of a 200-image validation split.
BREAKDOWN_FRACTION = 0.75  # of the gain over the untrained student, given back at one checkpoint
BREAKDOWN_POINTS = 5.0  # validation r_mean points, at least


def breakdown(curve: list[dict]) -> dict | None:
    """The first checkpoint at which the student broke down (see BREAKDOWN_FRACTION), as {phase, epoch,
    val_r_mean, best_val_r_mean}, or None. `curve` starts with the untrained student."""
    if not curve:
        return None
    untrained = best = curve[0]["val_r_mean"]
    for point in curve[1:]:
        best = max(best, point["val_r_mean"])
        lost = best - point["val_r_mean"]
        if lost >= BREAKDOWN_POINTS and lost >= BREAKDOWN_FRACTION * (best - untrained):
            return {
                "phase": point["phase"],
                "epoch": point["epoch"],
                "val_r_mean": point["val_r_mean"],
                "best_val_r_mean": best,
            }
    return None


class _Checkpoints:
    """Recall at the evaluation checkpoints of one run, and the state the protocol selects.

    Protocol "val" scores a checkpoint by validation r_mean and keeps a copy of the student's state (buffers
    included), whose test recall is measured once at the end. Protocol "reference" measures test recall at
    every checkpoint and keeps the best (biased upward: it selects on the test set, as the reference did).
    Either way the best checkpoint's state is kept, so that the student can be handed back in it.
    """

    def __init__(self, model: DualEncoder, splits: dict, protocol: str, device):
        self.model, self.splits, self.protocol, self.device = model, splits, protocol, device
        self.curve: list[dict] = []
        self.best: dict | None = None

    def _recall(self, name: str) -> dict | None:
        """Retrieval metrics of a split, or None when the student's embeddings are not finite."""
        images, texts, split = self.splits[name]
        return model_recall(self.model, images.split(EMBED_BATCH), texts, split.img2txt, split.txt2img, self.device)

    def check(self, phase: int, epoch: int) -> bool:
        """Evaluate the current student; False when it has diverged."""
        reference = self.protocol == "reference"
        val = self._recall("validation")
        test = self._recall("test") if reference else None
        if val is None or (reference and test is None):
            return False
        self.curve.append({"phase": phase, "epoch": epoch, "val_r_mean": val["r_mean"]})
        score = (test if reference else val)["r_mean"]
        if self.best is None or score > self.best["score"]:
            state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            self.best = {"score": score, "val": val, "test": test, "phase": phase, "epoch": epoch, "state": state}
        return True

    def restore_best(self) -> None:
        """Put the student back in the state of the checkpoint the protocol selects so far."""
        self.model.load_state_dict(self.best["state"])

    def result(self) -> dict:
        """The selected checkpoint's recall; the student is left in that checkpoint's state."""
        best = self.best
        self.restore_best()
        if best["test"] is None:
            best["test"] = self._recall("test")
        return {
            "test": best["test"],
            "val": best["val"],
            "phase": best["phase"],
            "epoch": best["epoch"],
            "curve": self.curve,
        }


def _check_phases(cfg, phases: list[dict], encoder_name: str, cross: bool) -> None:
    for p, phase in enumerate(phases):
        if phase["images"].dim() != 2:
            continue
        if cross:
            raise UserError(
                f"cross-architecture evaluation (image encoder {encoder_name!r}) needs pixel-space "
                f"synthetic data, but phase {p} holds image features (distill.space=feature)"
            )
        if cfg.model.image_trainable:
            raise UserError(f"phase {p} holds image features, which need model.image_trainable=false")


def _optimizer(cfg, model: DualEncoder, lrs: list[float]) -> SGD | None:
    """SGD over the student's two groups at `lrs` (image side, text projection); None for an lr that is not a
    finite number >= 0 (a learned lr the reference never clips can go negative): such a student has
    diverged before it starts."""
    if not all(math.isfinite(lr) and lr >= 0 for lr in lrs):
        return None
    named = dict(model.named_parameters())
    groups = [[named[n] for n in model.layouts[g].names] for g in GROUPS]  # 'img' includes the image projection
    return SGD(
        [{"params": params, "lr": lr} for params, lr in zip(groups, lrs)],
        momentum=cfg.evaluate.momentum,
        weight_decay=cfg.evaluate.weight_decay,
    )


def _epoch(cfg, model: DualEncoder, phase: dict, optimizer: SGD, gen: torch.Generator, device) -> bool:
    """One epoch on a synthetic set: ceil(N / batch_size) batches, each the first batch_size pairs of a fresh
    permutation (its pixels cropped with `evaluate.augment=crop`), trained towards S[B, B]; False when the loss
    is not finite."""
    images, texts = phase["student_images"], phase["student_texts"]
    kind, alpha = phase.get("similarity", "identity"), float(phase.get("sim_alpha", 1.0))
    sim_params = {k: v for k, v in phase.items() if k.startswith("sim_") and torch.is_tensor(v)}
    batch_size, loss_fn = cfg.evaluate.batch_size, LOSSES[cfg.distill.loss]
    crop = cfg.evaluate.augment == "crop" and images.dim() == 4
    for _ in range(math.ceil(len(texts) / batch_size)):
        index = torch.randperm(len(texts), generator=gen)[:batch_size]
        target = similarity_block(kind, sim_params, index, alpha).to(device)
        batch = images[index.to(device)]
        if crop:
            batch = apply_crops(batch, draw_crops(len(batch), gen, flip=False), batch.shape[-1])
        loss = loss_fn(model(batch, texts[index.to(device)]), target)
        if not torch.isfinite(loss):
            return False
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return True


def _with_inputs(model: DualEncoder, bundle: Prepared, phase: dict, device) -> dict:
    """The phase with its images and texts as the student eats them, on the device."""
    return {
        **phase,
        "student_images": _student_inputs(model, bundle, phase["images"], device).to(device),
        "student_texts": phase["texts"].to(device),
    }


def _train_phase(
    cfg,
    model: DualEncoder,
    bundle: Prepared,
    phase: dict,
    p: int,
    checkpoints: _Checkpoints,
    gen: torch.Generator,
    device,
) -> bool:
    """Train the student on one synthetic set with its own (EMA) lrs and a fresh optimizer; False when it
    diverged (then it stops at once)."""
    ev = cfg.evaluate
    lrs = [float(phase["lr_img"]), float(phase["lr_txt"])]
    optimizer = _optimizer(cfg, model, lrs)
    if optimizer is None:
        return False
    phase = _with_inputs(model, bundle, phase, device)
    milestones = sorted(ev.lr_milestones)
    model.train()
    for epoch in range(1, ev.epochs + 1):
        # MultiStepLR's closed form: lr = base * 0.1^(milestones passed), counted per phase or across phases.
        scheduled = epoch - 1 if ev.lr_schedule == "per-phase" else p * ev.epochs + epoch - 1
        for group, lr in zip(optimizer.param_groups, lrs):
            group["lr"] = lr * 0.1 ** bisect.bisect_right(milestones, scheduled)
        if not _epoch(cfg, model, phase, optimizer, gen, device):
            return False
        if (epoch % ev.eval_every == 0 or epoch == ev.epochs) and not checkpoints.check(p, epoch):
            return False
    return True


def _train_reference(
    cfg,
    model: DualEncoder,
    bundle: Prepared,
    phases: list[dict],
    checkpoints: _Checkpoints,
    gen: torch.Generator,
    device,
) -> bool:
    """The reference's evaluation loop (`evaluate_synset_PTM`), for `evaluate.protocol=reference`.

    One optimizer for all phases, at the live lrs of the last phase (its distillation's final lrs, not their
    EMA); epochs+1 epochs per phase (0..epochs), each trained, then scored on test at epochs 0, eval_every, ...,
    epochs; the lr schedule is stepped once per epoch across the phases, each milestone one epoch later than in
    the default protocol (the reference's MultiStepLR(Epoch // 2 + 1): with the default [50], 51), so later
    phases run at 0.1x. The untrained student is a candidate too (`_train_student` scores it first), and the
    best test score is selected. Returns False when the student diverged."""
    ev = cfg.evaluate
    lrs, live = live_lrs(phases[-1])
    if not live:
        logger.warning(
            "the distilled set carries no live lrs (written before format 1.1, or by another code"
            " base): the reference protocol trains with its saved lrs %s",
            lrs,
        )
    optimizer = _optimizer(cfg, model, lrs)
    if optimizer is None:
        return False
    milestones = sorted(m + 1 for m in ev.lr_milestones)
    steps = 0  # scheduler steps so far, across the phases
    model.train()
    for p, phase in enumerate(phases):
        phase = _with_inputs(model, bundle, phase, device)
        for epoch in range(ev.epochs + 1):
            for group, lr in zip(optimizer.param_groups, lrs):
                group["lr"] = lr * 0.1 ** bisect.bisect_right(milestones, steps)
            if not _epoch(cfg, model, phase, optimizer, gen, device):
                return False
            if (epoch % ev.eval_every == 0 or epoch == ev.epochs) and not checkpoints.check(p, epoch + 1):
                return False
            steps += 1
    return True


def train_and_test(cfg, bundle: Prepared, phases: list[dict], seed: int, image_encoder: str | None = None) -> dict:
    """Train one fresh student on the phases in order and report test recall at the protocol's checkpoint.

    Checkpoints are epoch 0 of phase 0 (the untrained student), then every `evaluate.eval_every` epochs and the
    last epoch of each phase. A later phase trains on from the best checkpoint so far (`evaluate.handoff=best`,
    early stopping per phase) or from the previous phase's last epoch (`last`). A run that diverges stops there
    and reports its best finite checkpoint with "diverged": true. "broke_down" names the checkpoint at which
    the student lost most of what it had learned (`breakdown`), or is None.
    """
    return _train_student(cfg, bundle, phases, seed, image_encoder)[1]


def _train_student(
    cfg, bundle: Prepared, phases: list[dict], seed: int, image_encoder: str | None
) -> tuple[DualEncoder, dict]:
    """train_and_test's student, left in the state of the checkpoint the protocol selected, and its result."""
    start = time.perf_counter()
    device = resolve_device(cfg.device)
    encoder_name = image_encoder or cfg.evaluate.image_encoder or cfg.model.image_encoder
    cross = encoder_name != cfg.model.image_encoder
    _check_phases(cfg, phases, encoder_name, cross)
    model = build_model(
        cfg.model,
        text_dim=bundle.text_dim,
        image_size=cfg.data.image_size,
        seed=seed,
        device=device,
        image_encoder=encoder_name,
    )
    cached = not model.image_trainable and not cross
    splits = {
        name: (
            torch.cat(list(input_chunks(model, bundle, name, cfg.data.image_size, cached, device))),
            bundle.texts[name],
            bundle.splits[name],
        )
        for name in ("validation", "test")
    }
    checkpoints = _Checkpoints(model, splits, cfg.evaluate.protocol, device)
    gen = generator(seed, "eval-batches")
    diverged = False
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(derive_seed(seed, "eval-dropout"))  # dropout draws from the global generator
        checkpoints.check(0, 0)
        if cfg.evaluate.protocol == "reference":
            diverged = not _train_reference(cfg, model, bundle, phases, checkpoints, gen, device)
        else:
            for p, phase in enumerate(phases):
                if p and cfg.evaluate.handoff == "best":
                    checkpoints.restore_best()
                if not _train_phase(cfg, model, bundle, phase, p, checkpoints, gen, device):
                    diverged = True
                    break
    result = checkpoints.result()
    broke_down = breakdown(result["curve"])
    if broke_down:
        logger.warning(
            "a student broke down: validation r_mean fell from %.1f to %.1f (phase %d, epoch %d); its result is"
            " the checkpoint the protocol selected, not its last",
            broke_down["best_val_r_mean"],
            broke_down["val_r_mean"],
            broke_down["phase"],
            broke_down["epoch"],
        )
    return model, {**result, "diverged": diverged, "broke_down": broke_down, "seconds": time.perf_counter() - start}


def train_student(
    distilled, cfg=None, *, seed: int | None = None, device: str | None = None, image_encoder: str | None = None
) -> DualEncoder:
    """Train a fresh student on a distilled set (`synthetic.load_distilled`) as `evaluate` trains each of its runs.

    `cfg`: the config to train under; by default the one the set was distilled with (a set from another code base
    carries none: pass one, e.g. `mmdistill.config.load_config("flickr30k-100")`). `seed`: by default that of
    evaluate's first run, so the student is the one behind its first per_run entry. Returns the student in eval
    mode, in the state of the checkpoint the protocol selects; `student.metrics` holds its recall (as per_run).
    """
    from omegaconf import OmegaConf

    if cfg is None:
        if "config" not in distilled.meta:
            raise UserError(
                f"{distilled.source} carries no mmdistill config: pass cfg, e.g. mmdistill.config.load_config(PRESET)"
            )
        cfg = from_dict(distilled.meta["config"])
    cfg = with_run_method(cfg, distilled.meta)
    if device is not None:
        cfg = OmegaConf.merge(cfg, {"device": device})
    bundle = prepare(cfg)
    phases = phases_for(distilled, cfg, bundle)
    seed = derive_seed(cfg.seed, "eval", 0) if seed is None else seed
    model, result = _train_student(cfg, bundle, phases, seed, image_encoder)
    model.eval()
    model.metrics = result
    return model


# -- several runs ----------------------------------------------------------------------------------------
def summarize_runs(per_run: list[dict], protocol: str) -> dict:
    """Mean and sample standard deviation over runs of each test metric (one results.json entry)."""
    std = {m: statistics.stdev([r["test"][m] for r in per_run]) if len(per_run) > 1 else 0.0 for m in METRICS}
    means = {m: statistics.fmean(r["test"][m] for r in per_run) for m in METRICS}
    return {
        **means,
        "r_mean_std": std["r_mean"],
        "runs": len(per_run),
        "std": std,
        "protocol": PROTOCOLS[protocol],
        "diverged": sum(r["diverged"] for r in per_run),
        "broke_down": sum(bool(r.get("broke_down")) for r in per_run),
        "per_run": per_run,
    }


def evaluate_phases(
    cfg, bundle: Prepared, phases: list[dict], *, runs: int, seed: int, image_encoder: str | None = None
) -> dict:
    """`runs` students with seeds derived from `seed`, so every method meets the same initialisations."""
    per_run = [train_and_test(cfg, bundle, phases, derive_seed(seed, "eval", r), image_encoder) for r in range(runs)]
    return summarize_runs(per_run, cfg.evaluate.protocol)


# What a student trains with that the distillation chose: its method's loss and the student's temperature (the
# similarity kind and sim_alpha travel in each phase file). A set distilled with LoRS' settings must be scored
# with them, not with the preset's default method.
RUN_METHOD_KEYS = ("distill.method", "distill.loss", "distill.similarity", "distill.sim_alpha", "model.temperature")


def with_run_method(cfg, meta: dict):
    """`cfg` with RUN_METHOD_KEYS taken from the config a distilled set records (meta.json); unchanged for a set
    that records none (another code base's files)."""
    from omegaconf import OmegaConf

    run = meta.get("config")
    if not isinstance(run, dict):
        return cfg
    run = OmegaConf.create(run)
    taken = {key: OmegaConf.select(run, key) for key in RUN_METHOD_KEYS if OmegaConf.select(run, key) is not None}
    changed = {key: value for key, value in taken.items() if OmegaConf.select(cfg, key) != value}
    if not changed:
        return cfg
    logger.info("evaluating with the distilled set's %s", ", ".join(f"{k}={v}" for k, v in changed.items()))
    cfg = OmegaConf.merge(cfg, {})
    for key, value in changed.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg
