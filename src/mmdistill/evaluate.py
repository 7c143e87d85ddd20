"""Stage 5: train fresh students on synthetic phases (or real-pair baselines) and report retrieval recall.

The protocol follows the reference's `evaluate_synset_PTM` (spec 7) without its bugs (spec 9): the image
projection is trained in frozen-image mode, the learning-rate schedule restarts with each phase (unless
`evaluate.lr_schedule=global`), every run is seeded, and the checkpoint is chosen on the validation split while
the test split is only reported (unless `evaluate.protocol=reference`, labelled as selected on test).

Evaluation is kept cheap: validation/test images come from cached frozen features or from pixels already in
memory, and pixels of synthetic images are pushed through a frozen encoder once per phase, not at every step.
"""
from __future__ import annotations

import bisect
import json
import logging
import math
import statistics
import time
from pathlib import Path
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch.optim import SGD

from .coresets import CORESETS, select_coreset
from .data.transforms import normalize
from .errors import UserError
from .experts import ExpertStore
from .io import folder_lock, write_json
from .losses import LOSSES
from .metrics import retrieval_metrics
from .model import GROUPS, DualEncoder, build_model
from .prepare import Prepared, prepare
from .similarity import similarity_block
from .synthetic import live_lrs
from .tracking import log_table
from .utils import derive_seed, generator, resolve_device

logger = logging.getLogger(__name__)

METRICS = ("IR@1", "IR@5", "IR@10", "TR@1", "TR@5", "TR@10", "r_mean")
PROTOCOLS = {"val": "val (selected on validation)", "reference": "reference (selected on test)"}
EMBED_BATCH = 512  # images or captions per forward pass when embedding a whole split
SIM_CHUNK = 4096  # captions per block of the caption x image matrix in the forgetting statistics


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
    if (tuple(encoder.mean), tuple(encoder.std)) != (tuple(bundle.mean), tuple(bundle.std)):
        mean, std = (torch.tensor(v, device=images.device).view(3, 1, 1) for v in (bundle.mean, bundle.std))
        images = normalize(images * std + mean, encoder.mean, encoder.std)
    if model.image_trainable:
        return images
    with torch.no_grad():
        return torch.cat([model.image_features(chunk.to(device)) for chunk in images.split(EMBED_BATCH)])


def _input_chunks(model: DualEncoder, bundle: Prepared, split: str, image_size: int, cached: bool,
                  device) -> Iterator[torch.Tensor]:
    """The student's inputs for every image of a split, EMBED_BATCH images at a time (files decode lazily).

    `cached`: the student's frozen encoder is the one the bundle's features were computed with, so the cached
    features are its output on these images.
    """
    if cached:
        yield from bundle.features[split].split(EMBED_BATCH)
        return
    for ids in torch.arange(len(bundle.splits[split])).split(EMBED_BATCH):
        yield _student_inputs(model, bundle, bundle.normalize(bundle.pixels01(split, ids, image_size)), device)


def _embed(model: DualEncoder, image_chunks: Iterable[torch.Tensor], texts: torch.Tensor, device):
    """Image and text embeddings in eval mode (no dropout), without gradients."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        image_emb = torch.cat([model.encode_image(chunk.to(device)) for chunk in image_chunks])
        text_emb = torch.cat([model.encode_text(chunk.to(device)) for chunk in texts.split(EMBED_BATCH)])
    model.train(was_training)
    return image_emb, text_emb


# -- one student -----------------------------------------------------------------------------------------
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
        image_emb, text_emb = _embed(self.model, images.split(EMBED_BATCH), texts, self.device)
        sim = self.model.similarity(image_emb, text_emb)
        if not torch.isfinite(sim).all():
            return None
        return retrieval_metrics(sim, split.img2txt, split.txt2img)

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

    def result(self) -> dict:
        """The selected checkpoint's recall; the student is left in that checkpoint's state."""
        best = self.best
        self.model.load_state_dict(best["state"])
        if best["test"] is None:
            best["test"] = self._recall("test")
        return {"test": best["test"], "val": best["val"], "phase": best["phase"], "epoch": best["epoch"],
                "curve": self.curve}


def _check_phases(cfg, phases: list[dict], encoder_name: str, cross: bool) -> None:
    for p, phase in enumerate(phases):
        if phase["images"].dim() != 2:
            continue
        if cross:
            raise UserError(f"cross-architecture evaluation (image encoder {encoder_name!r}) needs pixel-space "
                            f"synthetic data, but phase {p} holds image features (distill.space=feature)")
        if cfg.model.image_trainable:
            raise UserError(f"phase {p} holds image features, which need model.image_trainable=false")


def _optimizer(cfg, model: DualEncoder, lrs: list[float]) -> SGD | None:
    """SGD over the student's two groups at `lrs` (image side, text projection); None for an lr that is not a
    finite number >= 0 (a learned lr can go negative, spec 5.6): such a student has diverged before it starts."""
    if not all(math.isfinite(lr) and lr >= 0 for lr in lrs):
        return None
    named = dict(model.named_parameters())
    groups = [[named[n] for n in model.layouts[g].names] for g in GROUPS]  # 'img' includes the image projection
    return SGD([{"params": params, "lr": lr} for params, lr in zip(groups, lrs)],
               momentum=cfg.evaluate.momentum, weight_decay=cfg.evaluate.weight_decay)


def _epoch(cfg, model: DualEncoder, phase: dict, optimizer: SGD, gen: torch.Generator, device) -> bool:
    """One epoch on a synthetic set: ceil(N / batch_size) batches, each the first batch_size pairs of a fresh
    permutation, trained towards S[B, B]; False when the loss is not finite."""
    images, texts = phase["student_images"], phase["student_texts"]
    kind, alpha = phase.get("similarity", "identity"), float(phase.get("sim_alpha", 1.0))
    sim_params = {k: v for k, v in phase.items() if k.startswith("sim_") and torch.is_tensor(v)}
    batch_size, loss_fn = cfg.evaluate.batch_size, LOSSES[cfg.distill.loss]
    for _ in range(math.ceil(len(texts) / batch_size)):
        index = torch.randperm(len(texts), generator=gen)[:batch_size]
        target = similarity_block(kind, sim_params, index, alpha).to(device)
        loss = loss_fn(model(images[index.to(device)], texts[index.to(device)]), target)
        if not torch.isfinite(loss):
            return False
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return True


def _with_inputs(model: DualEncoder, bundle: Prepared, phase: dict, device) -> dict:
    """The phase with its images and texts as the student eats them, on the device."""
    return {**phase, "student_images": _student_inputs(model, bundle, phase["images"], device).to(device),
            "student_texts": phase["texts"].to(device)}


def _train_phase(cfg, model: DualEncoder, bundle: Prepared, phase: dict, p: int, checkpoints: _Checkpoints,
                 gen: torch.Generator, device) -> bool:
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


def _train_reference(cfg, model: DualEncoder, bundle: Prepared, phases: list[dict], checkpoints: _Checkpoints,
                     gen: torch.Generator, device) -> bool:
    """The reference's evaluation loop (`evaluate_synset_PTM`, spec 7), for `evaluate.protocol=reference`.

    One optimizer for all phases, at the live lrs of the last phase (its distillation's final lrs, not their
    EMA); epochs+1 epochs per phase (0..epochs), each trained, then scored on test at epochs 0, eval_every, ...,
    epochs; the lr schedule is stepped once per epoch across the phases, each milestone one epoch later than in
    the default protocol (the reference's MultiStepLR(Epoch // 2 + 1): with the default [50], 51), so later
    phases run at 0.1x. The untrained student is a candidate too (`_train_student` scores it first), and the
    best test score is selected. Returns False when the student diverged."""
    ev = cfg.evaluate
    lrs, live = live_lrs(phases[-1])
    if not live:
        logger.warning("the distilled set carries no live lrs (written before format 1.1, or by another code"
                       " base): the reference protocol trains with its saved lrs %s", lrs)
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
    last epoch of each phase (epoch 0 of a later phase is the last checkpoint of the one before). A run that
    diverges stops there and reports its best finite checkpoint with "diverged": true.
    """
    return _train_student(cfg, bundle, phases, seed, image_encoder)[1]


def _train_student(cfg, bundle: Prepared, phases: list[dict], seed: int,
                   image_encoder: str | None) -> tuple[DualEncoder, dict]:
    """train_and_test's student, left in the state of the checkpoint the protocol selected, and its result."""
    start = time.perf_counter()
    device = resolve_device(cfg.device)
    encoder_name = image_encoder or cfg.evaluate.image_encoder or cfg.model.image_encoder
    cross = encoder_name != cfg.model.image_encoder
    _check_phases(cfg, phases, encoder_name, cross)
    model = build_model(cfg.model, text_dim=bundle.text_dim, image_size=cfg.data.image_size, seed=seed,
                        device=device, image_encoder=encoder_name)
    cached = not model.image_trainable and not cross
    splits = {name: (torch.cat(list(_input_chunks(model, bundle, name, cfg.data.image_size, cached, device))),
                     bundle.texts[name], bundle.splits[name]) for name in ("validation", "test")}
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
                if not _train_phase(cfg, model, bundle, phase, p, checkpoints, gen, device):
                    diverged = True
                    break
    return model, {**checkpoints.result(), "diverged": diverged, "seconds": time.perf_counter() - start}


def train_student(distilled, cfg=None, *, seed: int | None = None, device: str | None = None,
                  image_encoder: str | None = None) -> DualEncoder:
    """Train a fresh student on a distilled set (`synthetic.load_distilled`) as `evaluate` trains each of its runs.

    `cfg`: the config to train under; by default the one the set was distilled with (a set from another code base
    carries none: pass one, e.g. `mmdistill.config.load_config("flickr30k-100")`). `seed`: by default that of
    evaluate's first run, so the student is the one behind its first per_run entry. Returns the student in eval
    mode, in the state of the checkpoint the protocol selects; `student.metrics` holds its recall (as per_run).
    """
    from omegaconf import OmegaConf

    from .config import from_dict
    from .synthetic import phases_for

    if cfg is None:
        if "config" not in distilled.meta:
            raise UserError(f"{distilled.source} carries no mmdistill config: pass cfg, e.g."
                            " mmdistill.config.load_config(PRESET)")
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
    return {**means, "r_mean_std": std["r_mean"], "runs": len(per_run), "std": std, "protocol": PROTOCOLS[protocol],
            "diverged": sum(r["diverged"] for r in per_run), "per_run": per_run}


def evaluate_phases(cfg, bundle: Prepared, phases: list[dict], *, runs: int, seed: int,
                    image_encoder: str | None = None) -> dict:
    """`runs` students with seeds derived from `seed`, so every method meets the same initialisations."""
    per_run = [train_and_test(cfg, bundle, phases, derive_seed(seed, "eval", r), image_encoder) for r in range(runs)]
    return summarize_runs(per_run, cfg.evaluate.protocol)


# -- baselines at the same budget ------------------------------------------------------------------------
def _full_data_model(cfg, bundle: Prepared, store, epoch: int, device) -> DualEncoder:
    """A student holding expert 0's parameters after `epoch` epochs on the full training data."""
    model = build_model(cfg.model, text_dim=bundle.text_dim, image_size=cfg.data.image_size, seed=0, device=device)
    model.set_flat(store.snapshot(0, epoch))
    return model


def _train_embeddings(cfg, model: DualEncoder, bundle: Prepared, device):
    """L2-normalised embeddings of every training image and caption."""
    chunks = _input_chunks(model, bundle, "train", cfg.data.image_size, not model.image_trainable, device)
    image_emb, text_emb = _embed(model, chunks, bundle.texts["train"], device)
    return F.normalize(image_emb, dim=1), F.normalize(text_emb, dim=1)


def _correct_history(cfg, bundle: Prepared, store, device) -> torch.Tensor:
    """[epochs, captions]: after each epoch of expert 0, is the caption's own image its top-1 retrieval?

    A pair counts as learned when, among all training images, its caption retrieves its image first
    (text -> image, argmax ties to the smallest image id).
    """
    txt2img = torch.tensor(bundle.splits["train"].txt2img, device=device)
    history = []
    for epoch in range(1, store.epochs + 1):
        image_emb, text_emb = _train_embeddings(cfg, _full_data_model(cfg, bundle, store, epoch, device), bundle,
                                                device)
        top1 = torch.cat([(chunk @ image_emb.T).argmax(1) for chunk in text_emb.split(SIM_CHUNK)])
        history.append((top1 == txt2img).cpu())
    return torch.stack(history)


def coreset_phases(cfg, bundle: Prepared, method: str, experts_dir, seed: int) -> list[dict]:
    """One phase of real training pairs chosen by a coreset method at the distillation budget.

    The pairs are caption entries (a caption and its image); S is the identity and the learning rates are the
    ones real data trains with (`experts.lr_img`, `experts.lr_txt`; `evaluate_coreset` tries others), so they
    train under the same protocol and loss (`distill.loss`) as a distilled set.
    Herding and k-center select on the concatenated image and text embeddings of a full-data model (expert 0's
    final snapshot), forgetting on expert 0's training dynamics (see `_correct_history`).
    """
    if method not in CORESETS:
        raise UserError(f"unknown coreset baseline {method!r}; choose from {', '.join(CORESETS)}")
    split = bundle.splits["train"]
    pairs = sum(p.pairs for p in cfg.distill.phases)
    if pairs > len(split.captions):
        raise UserError(f"the budget of {pairs} pairs exceeds the {len(split.captions)} training captions")
    gen = generator(seed, "coreset", method)
    device = resolve_device(cfg.device)
    if method == "random":
        index = select_coreset(method, pairs, generator=gen, num_items=len(split.captions))
    else:
        store = ExpertStore(experts_dir)
        if method == "forgetting":
            index = select_coreset(method, pairs, generator=gen,
                                   correct_history=_correct_history(cfg, bundle, store, device))
        else:
            model = _full_data_model(cfg, bundle, store, store.epochs, device)
            image_emb, text_emb = _train_embeddings(cfg, model, bundle, device)
            features = torch.cat([image_emb[torch.tensor(split.txt2img, device=device)], text_emb], dim=1)
            index = select_coreset(method, pairs, generator=gen, features=features)
    index = index.cpu()
    images, texts = bundle.pairs("train", index, cfg.distill.space, cfg.data.image_size)
    return [{"images": images, "texts": texts, "captions": index,
             "lr_img": torch.tensor([cfg.experts.lr_img]), "lr_txt": torch.tensor([cfg.experts.lr_txt]),
             "similarity": "identity", "sim_alpha": 1.0, "space": cfg.distill.space}]


def evaluate_coreset(cfg, bundle: Prepared, method: str, experts_dir, seed: int) -> dict:
    """A coreset's results.json entry with the lr of `evaluate.coreset_lrs` chosen on validation.

    A distilled set brings its learned lrs; real pairs do not, and their recall depends on the lr several-fold
    (shapes-100 random coreset: test r_mean 1.9 at lr 0.1, 7.4 at 0.03), so each lr of the grid trains the same
    `evaluate.runs` seeds and the one with the best mean validation r_mean is reported (its test recall).
    """
    (phase,) = coreset_phases(cfg, bundle, method, experts_dir, seed)
    grid = list(cfg.evaluate.coreset_lrs) or [None]
    best, scores = None, {}
    for lr in grid:
        if lr is not None:
            phase = {**phase, "lr_img": torch.tensor([lr]), "lr_txt": torch.tensor([lr])}
        result = evaluate_phases(cfg, bundle, [phase], runs=cfg.evaluate.runs, seed=seed)
        score = statistics.fmean(run["val"]["r_mean"] for run in result["per_run"])
        scores[str(lr if lr is not None else "experts")] = round(score, 4)
        if best is None or score > best[0]:
            best = (score, result, lr)
    return {**best[1], "lr": best[2], "val_r_mean_by_lr": scores}


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"file not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"corrupt JSON in {path} (line {err.lineno}): {err.msg}") from None


def full_data_metrics(experts_dir) -> dict:
    """The experts' mean final test recall (summary.json), in the format of an evaluated method."""
    path = Path(experts_dir) / "summary.json"
    summary = _read_json(path)
    if "test" not in summary:
        raise UserError(f"{path} has no 'test' entry: train the experts again")
    test, std = summary["test"], summary.get("test_std", {})
    return {**{m: test[m] for m in METRICS}, "r_mean_std": std.get("r_mean", 0.0),
            "runs": summary.get("experts", 1), "std": {m: std.get(m, 0.0) for m in METRICS},
            "protocol": "full data (experts' final epoch)"}


# -- command ---------------------------------------------------------------------------------------------
def results_path(out: Path) -> Path:
    """`--out` names a folder (results.json goes inside) or, ending in .json, the file itself."""
    out = Path(out)
    return out if out.suffix == ".json" else out / "results.json"


def format_table(methods: dict) -> str:
    """One line per method: the six recalls, r_mean +- std, runs, how many runs diverged, if any (their numbers
    are the last finite checkpoint's, so the table must say so), and FAILED / BELOW RANDOM where it applies."""
    header = f"{'method':<16}" + "".join(f"{m:>7}" for m in METRICS[:-1]) + f"{'r_mean':>16}{'runs':>6}  status"
    lines = [header]
    for name, entry in methods.items():
        recalls = "".join(f"{entry[m]:>7.2f}" for m in METRICS[:-1])
        diverged = f"  ({entry['diverged']} diverged)" if entry.get("diverged") else ""
        status = f"  {method_status(entry, methods)}".rstrip()
        lines.append(f"{name:<16}{recalls}{entry['r_mean']:>9.2f} ± {entry['r_mean_std']:<4.2f}{entry['runs']:>6}"
                     f"{status}{diverged}")
    notes = failure_notes(methods)
    return "\n".join(lines + ([""] + notes if notes else []))


def method_status(entry: dict, methods: dict) -> str:
    """FAILED for a distillation with a collapsed phase, BELOW RANDOM for one under the random coreset."""
    if entry.get("collapsed_phases"):
        return "FAILED"
    random = methods.get("random")
    if "collapsed_phases" in entry and random is not None and entry["r_mean"] < random["r_mean"]:
        return "BELOW RANDOM"
    return ""


def failure_notes(methods: dict) -> list[str]:
    """Plain sentences for every distilled set that failed or lost to the random coreset."""
    notes, random = [], methods.get("random")
    for name, entry in methods.items():
        for collapse in entry.get("collapsed_phases", []):
            notes.append(f"{name} FAILED: phase {collapse['phase']} collapsed at iteration {collapse['iteration']}"
                         f" ({collapse['reason']}); its distilled set is not a result.")
        if random is not None and "collapsed_phases" in entry and entry["r_mean"] < random["r_mean"]:
            notes.append(f"{name} r_mean {entry['r_mean']:.1f} is below the random coreset's {random['r_mean']:.1f}:"
                         " the distilled set is worse than the same number of random real pairs.")
    return notes


def evaluate_distilled(cfg, bundle: Prepared, phases: list[dict]) -> dict:
    """A distilled set's results entry: evaluate_phases with the config's runs and seed, plus the collapse
    records of its phases (`collapsed_phases`, empty when every phase learned), which the tables mark FAILED."""
    entry = evaluate_phases(cfg, bundle, phases, runs=cfg.evaluate.runs, seed=cfg.seed)
    return {**entry, "collapsed_phases": [{"phase": p, **phase["collapse"]} for p, phase in enumerate(phases)
                                          if phase.get("collapse")]}


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


def evaluate_command(cfg, synthetic: Path, out_path: Path, fmt: str = "mmdistill") -> dict:
    """`mmdistill evaluate`: evaluate a distilled set (any layout `synthetic.load_distilled` reads, or another code
    base's with `fmt`) and merge its entry into results.json."""
    from .synthetic import load_distilled, phases_for

    distilled = load_distilled(synthetic, fmt)
    method = distilled.method
    cfg = with_run_method(cfg, distilled.meta)
    bundle = prepare(cfg)
    phases = phases_for(distilled, cfg, bundle)
    path = results_path(out_path)
    with folder_lock(path.parent):
        results = {"preset": cfg.name, "dataset": cfg.data.source, "pairs": sum(len(p["texts"]) for p in phases),
                   "seed": cfg.seed, "methods": {}, "timing": {"evaluate_s": 0.0}}
        if path.exists():
            old = _read_json(path)
            if any(old.get(k) != results[k] for k in ("preset", "dataset", "pairs", "seed")):
                raise UserError(f"{path} holds results of another preset, dataset, budget or seed; choose another"
                                " --out")
            results.update(methods=old.get("methods", {}), timing=old.get("timing", results["timing"]))
        start = time.perf_counter()
        results["methods"][method] = evaluate_distilled(cfg, bundle, phases)
        results["timing"]["evaluate_s"] = results["timing"].get("evaluate_s", 0.0) + time.perf_counter() - start
        write_json(results, path)
    log_table(results["methods"])
    print(format_table(results["methods"]))
    return results
