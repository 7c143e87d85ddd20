"""The baselines a distilled set is compared with: coresets of real pairs and the full training data."""

from __future__ import annotations

import logging
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from mmdistill.config import to_dict, total_pairs
from mmdistill.coresets import CORESETS, select_coreset
from mmdistill.errors import UserError
from mmdistill.evaluation.student import evaluate_phases, input_chunks
from mmdistill.experts.store import ExpertStore
from mmdistill.io import read_json
from mmdistill.metrics import METRICS, embed
from mmdistill.model import DualEncoder, build_model
from mmdistill.prepare import Prepared
from mmdistill.utils import digest, generator, resolve_device

logger = logging.getLogger(__name__)

SIM_CHUNK = 4096  # captions per block of the caption x image matrix in the forgetting statistics


# -- baselines at the same budget ------------------------------------------------------------------------
def _full_data_model(cfg, bundle: Prepared, store, epoch: int, device) -> DualEncoder:
    """A student holding expert 0's parameters after `epoch` epochs on the full training data."""
    model = build_model(cfg.model, text_dim=bundle.text_dim, image_size=cfg.data.image_size, seed=0, device=device)
    model.set_flat(store.snapshot(0, epoch))
    return model


def _train_embeddings(cfg, model: DualEncoder, bundle: Prepared, device):
    """L2-normalised embeddings of every training image and caption."""
    chunks = input_chunks(model, bundle, "train", cfg.data.image_size, not model.image_trainable, device)
    image_emb, text_emb = embed(model, chunks, bundle.texts["train"], device)
    return F.normalize(image_emb, dim=1), F.normalize(text_emb, dim=1)


# Forgetting statistics per expert set and data, kept for the process: they do not depend on the budget, and
# `bench budgets` asks for them once per budget (370 s each on shapes-large's 100,000 captions).
_HISTORIES: dict[str, torch.Tensor] = {}


def _correct_history(cfg, bundle: Prepared, store, device) -> torch.Tensor:
    """[epochs, captions]: after each epoch of expert 0, is the caption's own image its top-1 retrieval?

    A pair counts as learned when, among all training images, its caption retrieves its image first
    (text -> image, argmax ties to the smallest image id). Computed once per expert files (path, size, time)
    and data and model config in a process.
    """
    files = [(str(path), path.stat().st_size, path.stat().st_mtime_ns) for path in store.paths]
    key = digest([files, to_dict(cfg.data), to_dict(cfg.model)])
    if key not in _HISTORIES:
        _HISTORIES[key] = _compute_correct_history(cfg, bundle, store, device)
    return _HISTORIES[key]


def _compute_correct_history(cfg, bundle: Prepared, store, device) -> torch.Tensor:
    txt2img = torch.tensor(bundle.splits["train"].txt2img, device=device)
    history = []
    for epoch in range(1, store.epochs + 1):
        image_emb, text_emb = _train_embeddings(
            cfg, _full_data_model(cfg, bundle, store, epoch, device), bundle, device
        )
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
    pairs = total_pairs(cfg)
    if pairs > len(split.captions):
        raise UserError(f"the budget of {pairs} pairs exceeds the {len(split.captions)} training captions")
    gen = generator(seed, "coreset", method)
    device = resolve_device(cfg.device)
    if method == "random":
        index = select_coreset(method, pairs, generator=gen, num_items=len(split.captions))
    else:
        store = ExpertStore(experts_dir)
        if method == "forgetting":
            index = select_coreset(
                method, pairs, generator=gen, correct_history=_correct_history(cfg, bundle, store, device)
            )
        else:
            model = _full_data_model(cfg, bundle, store, store.epochs, device)
            image_emb, text_emb = _train_embeddings(cfg, model, bundle, device)
            features = torch.cat([image_emb[torch.tensor(split.txt2img, device=device)], text_emb], dim=1)
            index = select_coreset(method, pairs, generator=gen, features=features)
    index = index.cpu()
    images, texts = bundle.pairs("train", index, cfg.distill.space, cfg.data.image_size)
    return [
        {
            "images": images,
            "texts": texts,
            "captions": index,
            "lr_img": torch.tensor([cfg.experts.lr_img]),
            "lr_txt": torch.tensor([cfg.experts.lr_txt]),
            "similarity": "identity",
            "sim_alpha": 1.0,
            "space": cfg.distill.space,
        }
    ]


def evaluate_coreset(cfg, bundle: Prepared, method: str, experts_dir, seed: int) -> dict:
    """A coreset's results.json entry with the lr of `evaluate.coreset_lrs` chosen on validation.

    A distilled set brings its learned lrs; real pairs do not, and their recall depends on the lr several-fold
    (shapes-100 random coreset: test r_mean 1.9 at lr 0.1, 7.4 at 0.03), so each lr of the grid trains the same
    `evaluate.runs` seeds and the one with the best mean validation r_mean is reported (its test recall).
    """
    phases = coreset_phases(cfg, bundle, method, experts_dir, seed)
    return best_lr_on_validation(cfg, bundle, phases, list(cfg.evaluate.coreset_lrs) or [None], seed, "experts")


def best_lr_on_validation(cfg, bundle: Prepared, phases: list[dict], lrs: list, seed: int, own: str) -> dict:
    """The results entry of the lr among `lrs` whose `evaluate.runs` students score the best mean validation
    r_mean, with that lr and every candidate's score. None stands for the phases' own lrs (`own` in the scores)."""
    best, scores = None, {}
    for lr in lrs:
        fixed = {"lr_img": torch.tensor([lr]), "lr_txt": torch.tensor([lr])} if lr is not None else {}
        result = evaluate_phases(cfg, bundle, [{**p, **fixed} for p in phases], runs=cfg.evaluate.runs, seed=seed)
        score = statistics.fmean(run["val"]["r_mean"] for run in result["per_run"])
        scores[own if lr is None else str(lr)] = round(score, 4)
        if best is None or score > best[0]:
            best = (score, result, lr)
    return {**best[1], "lr": best[2], "val_r_mean_by_lr": scores}


def full_data_metrics(experts_dir) -> dict:
    """The experts' mean final test recall (summary.json), in the format of an evaluated method."""
    path = Path(experts_dir) / "summary.json"
    summary = read_json(path)
    if "test" not in summary:
        raise UserError(f"{path} has no 'test' entry: train the experts again")
    test, std = summary["test"], summary.get("test_std", {})
    return {
        **{m: test[m] for m in METRICS},
        "r_mean_std": std.get("r_mean", 0.0),
        "runs": summary.get("experts", 1),
        "std": {m: std.get(m, 0.0) for m in METRICS},
        "protocol": "full data (experts' final epoch)",
    }
