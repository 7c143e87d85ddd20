"""Expert trajectories: train them, store them compactly, read back only the rows a caller needs.

Format: one safetensors file per expert, `expert-0000.safetensors`, with the flat parameter groups as tensors
`img` [E+1, P_img] and `txt` [E+1, P_txt] (row 0 = init, row e = after epoch e) in `experts.dtype`, plus
`step_norms_img` / `step_norms_txt` [E, n_tensors]: ||theta_l^{e+1} - theta_l^e||_2 per parameter tensor l,
taken from the float32 snapshots. The step norms let a shortcut trajectory be built from its two endpoint rows
alone (`experts/shortcut.py`), so the reference's convexified copies never need to be written. The metadata holds
the layouts, the training history and a fingerprint of the config keys that shape an expert.

`import_reference` / `export_reference` convert from / to the PTM-ST reference layout
(`{img,txt}_replay_buffer_{n}.pt`: a list of trajectories, each a list of snapshots, each a list of tensors).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import statistics
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from mmdistill import distributed
from mmdistill.config import changed_keys, flat_keys, to_dict
from mmdistill.data.transforms import ImageDataset, augment_batch, build_transform
from mmdistill.errors import UserError
from mmdistill.experts.store import expert_files, expert_path, read_metadata, tensor_norms, write_expert
from mmdistill.io import append_jsonl, folder_lock, write_json, write_text
from mmdistill.losses import LOSSES
from mmdistill.metrics import model_recall
from mmdistill.model import GROUPS, build_model
from mmdistill.prepare import prepare
from mmdistill.tracking import log_scalars
from mmdistill.utils import derive_seed, digest, generator, progress_bar, resolve_device

logger = logging.getLogger(__name__)

LOADER_WORKERS = min(8, os.cpu_count() or 1)


def _expert_sections(cfg) -> dict:
    """Everything that shapes an expert: seed, data, model and experts sections (not experts.count: more
    experts of the same config are the same experts plus new ones)."""
    raw = to_dict(cfg)
    experts = {k: v for k, v in raw["experts"].items() if k != "count"}
    return {"seed": raw["seed"], "data": raw["data"], "model": raw["model"], "experts": experts}


def expert_keys(cfg) -> dict:
    """`_expert_sections` as dotted keys with their values (what a refusal compares key by key)."""
    return flat_keys(_expert_sections(cfg))


def config_fingerprint(cfg) -> str:
    """Hash of `_expert_sections`: an expert file is kept only for the same settings."""
    return digest(_expert_sections(cfg))


def _flip(cfg, bundle) -> bool:
    return bundle.flip_safe and cfg.experts.augment == "clip"


def _loader(split, transform, order: list[int], batch_size: int, seed: int | None = None) -> DataLoader:

    seeded = None if seed is None else torch.Generator().manual_seed(seed)
    return DataLoader(
        Subset(ImageDataset(split, transform), order),
        batch_size=batch_size,
        num_workers=LOADER_WORKERS,
        generator=seeded,
    )


def _batches(loader: DataLoader):
    """The loader's batches; a worker re-raises a UserError (a file that changed since `prepare` verified it)
    with its whole traceback as the message, so only the original message is kept."""
    try:
        yield from loader
    except UserError as err:
        raise UserError(str(err).strip().splitlines()[-1].removeprefix(f"{UserError.__module__}.UserError: ")) from None


def _epoch_batches(cfg, bundle, rng: torch.Generator, device: torch.device):
    """One epoch of the reference's buffer training: every caption with its image, shuffled.

    Yields (image inputs, caption ids). A frozen image encoder reads its cached features, without augmentation
    (the features were computed once with the test transform).
    """

    split = bundle.splits["train"]
    order = torch.randperm(len(split.captions), generator=rng)
    batches = order.split(cfg.experts.batch_size)
    image_of = torch.tensor(split.txt2img)
    augment = cfg.experts.augment
    if not cfg.model.image_trainable:
        features = bundle.features["train"].to(device)
        for ids in batches:
            yield features[image_of[ids].to(device)], ids
    elif "train" in bundle.pixels:
        pixels = bundle.pixels["train"].to(device)
        for ids in batches:
            images = pixels[image_of[ids].to(device)]
            if augment != "none":
                images = augment_batch(images, cfg.data.image_size, rng, _flip(cfg, bundle))
            yield bundle.normalize(images), ids
    else:
        transform = build_transform(cfg.data.image_size, bundle.mean, bundle.std, augment, _flip(cfg, bundle))
        seed = int(torch.randint(1 << 62, (1,), generator=rng))
        loader = _loader(split, transform, image_of[order].tolist(), cfg.experts.batch_size, seed)
        for (images, _), ids in zip(_batches(loader), batches):
            yield bundle.whiten(images), ids


def _image_inputs(cfg, bundle, split_name: str, batch_size: int):
    """A split's image inputs in image order, test-transformed, in batches."""

    if not cfg.model.image_trainable:
        yield from bundle.features[split_name].split(batch_size)
    elif split_name in bundle.pixels:
        for pixels in bundle.pixels[split_name].split(batch_size):
            yield bundle.normalize(pixels)
    else:
        split = bundle.splits[split_name]
        transform = build_transform(cfg.data.image_size, bundle.mean, bundle.std, "none")
        for images, _ in _batches(_loader(split, transform, list(range(len(split))), batch_size)):
            yield bundle.whiten(images)


@torch.no_grad()
def retrieval_recall(model, cfg, bundle, split_name: str, device: torch.device, batch_size: int = 256) -> dict:
    """Retrieval metrics of an expert on a split; an expert whose embeddings are no longer finite has diverged."""
    split = bundle.splits[split_name]
    metrics = model_recall(
        model,
        _image_inputs(cfg, bundle, split_name, batch_size),
        bundle.texts[split_name],
        split.img2txt,
        split.txt2img,
        device,
    )
    if metrics is None:
        raise UserError(
            f"an expert diverged (non-finite embeddings on the {split_name} split): lower experts.lr_img"
            f" ({cfg.experts.lr_img}) or experts.lr_txt ({cfg.experts.lr_txt})"
        )
    return metrics


def _train_epoch(
    model, optimizer, loss_fn, batches, texts: torch.Tensor, device: torch.device, bar, where: str
) -> float:
    """One pass over `batches` with the identity target; returns the mean loss per pair."""
    total, count = 0.0, 0
    for images, ids in batches:
        logits = model(images.to(device), texts[ids.to(device)])
        loss = loss_fn(logits, torch.eye(len(ids), device=device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = loss.item()
        if not math.isfinite(value):
            raise UserError(f"{where} diverged (loss {value}); lower experts.lr_img / experts.lr_txt")
        total, count = total + value * len(ids), count + len(ids)
        bar.update()
        bar.set_postfix(loss=f"{value:.3f}")
    return total / count


def train_expert(cfg, bundle, index: int, out_dir: Path, device: torch.device) -> None:
    """Train expert `index` and write its file. All its randomness (init, shuffles, augmentation, dropout)
    derives from (cfg.seed, index), so any expert can be retrained alone and comes out identical."""
    ec = cfg.experts
    model = build_model(
        cfg.model,
        text_dim=bundle.text_dim,
        image_size=cfg.data.image_size,
        seed=derive_seed(cfg.seed, "expert", index),
        device=device,
    )
    named = dict(model.named_parameters())
    optimizer = torch.optim.SGD(
        [
            {"params": [named[n] for n in model.layouts["img"].names], "lr": ec.lr_img},
            {"params": [named[n] for n in model.layouts["txt"].names], "lr": ec.lr_txt},
        ],
        lr=ec.lr_img,
        momentum=ec.momentum,
        weight_decay=ec.weight_decay,
    )
    rng = generator(cfg.seed, "expert", index, "data")
    texts = bundle.texts["train"].to(device)
    log = out_dir / "experts.jsonl"

    snapshots = [{g: v.cpu() for g, v in model.get_flat().items()}]
    norms: list[dict[str, torch.Tensor]] = []
    history = [{"epoch": 0, "loss": None, "seconds": 0.0, **retrieval_recall(model, cfg, bundle, "validation", device)}]
    append_jsonl(log, {"expert": index, "split": "validation", **history[0]})
    batches_per_epoch = -(-len(bundle.splits["train"].captions) // ec.batch_size)
    cuda_devices = [torch.cuda.current_device()] if device.type == "cuda" else []
    with (
        torch.random.fork_rng(devices=cuda_devices),
        progress_bar(
            total=ec.epochs * batches_per_epoch,
            desc=f"expert {index}",
            unit="batch",
            leave=False,
            position=distributed.rank(),
        ) as bar,
    ):
        torch.manual_seed(derive_seed(cfg.seed, "expert", index, "dropout"))
        model.train()
        for epoch in range(1, ec.epochs + 1):
            start = time.perf_counter()
            loss = _train_epoch(
                model,
                optimizer,
                LOSSES[ec.loss],
                _epoch_batches(cfg, bundle, rng, device),
                texts,
                device,
                bar,
                where=f"expert {index} in epoch {epoch}",
            )
            seconds = time.perf_counter() - start
            flat = {g: v.cpu() for g, v in model.get_flat().items()}
            norms.append({g: tensor_norms(flat[g] - snapshots[-1][g], model.layouts[g]) for g in GROUPS})
            snapshots.append(flat)
            record = {
                "epoch": epoch,
                "loss": loss,
                "seconds": seconds,
                **retrieval_recall(model, cfg, bundle, "validation", device),
            }
            history.append(record)
            append_jsonl(log, {"expert": index, "split": "validation", **record})
            log_scalars(f"experts/expert-{index}", {"loss": loss, "val_r_mean": record["r_mean"]}, epoch)
    test = retrieval_recall(model, cfg, bundle, "test", device)
    append_jsonl(log, {"expert": index, "split": "test", "epoch": ec.epochs, **test})
    logger.info(
        "expert %d: val r_mean %.2f, test r_mean %.2f, %.2f s/epoch",
        index,
        history[-1]["r_mean"],
        test["r_mean"],
        statistics.fmean(r["seconds"] for r in history[1:]),
    )
    write_expert(
        expert_path(out_dir, index),
        {g: torch.stack([s[g] for s in snapshots]) for g in GROUPS},
        {g: torch.stack([n[g] for n in norms]) for g in GROUPS},
        model.layouts,
        ec.dtype,
        {
            "preset": cfg.name,
            "seed": cfg.seed,
            "expert": index,
            "image_trainable": cfg.model.image_trainable,
            "fingerprint": config_fingerprint(cfg),
            "config_keys": json.dumps(expert_keys(cfg)),
            "history": json.dumps(history),
            "test": json.dumps(test),
        },
    )


def _is_done(path: Path, cfg, restart: bool) -> bool:
    """Whether an expert file exists for this config; one from another config is an error naming the keys that
    differ, or with `restart` deleted (to be trained again)."""
    if not path.exists():
        return False
    metadata = read_metadata(path)
    if metadata.get("fingerprint") == config_fingerprint(cfg):
        return True
    if restart:
        path.unlink(missing_ok=True)  # every torchrun rank looks at every file
        return False
    saved = json.loads(metadata["config_keys"]) if "config_keys" in metadata else None
    differ = changed_keys(saved, expert_keys(cfg)) if saved is not None else "not recorded in this older file"
    raise UserError(
        f"{path} was trained with other settings ({differ}); undo the change, use a new --out, or"
        " retrain with --restart"
    )


def _mean_std(values: list[dict]) -> tuple[dict, dict]:
    keys = [k for k in values[0] if k not in ("epoch", "loss", "seconds")]
    mean = {k: statistics.fmean(v[k] for v in values) for k in keys}
    std = {k: statistics.stdev(v[k] for v in values) if len(values) > 1 else 0.0 for k in keys}
    return mean, std


def summarize(out_dir: Path, count: int) -> dict:
    """summary.json (the full-data reference for evaluation) and a clean experts.jsonl, from the expert files."""
    metas = [read_metadata(expert_path(out_dir, i)) for i in range(count)]
    histories = [json.loads(m["history"]) for m in metas]
    tests = [json.loads(m["test"]) for m in metas]
    test_mean, test_std = _mean_std(tests)
    summary = {
        "experts": count,
        "epochs": len(histories[0]) - 1,
        "test": test_mean,
        "test_std": test_std,
        "val_by_epoch": [_mean_std([h[e] for h in histories])[0] for e in range(len(histories[0]))],
        "seconds_per_epoch": statistics.fmean(r["seconds"] for h in histories for r in h[1:]),
    }
    write_json(summary, out_dir / "summary.json")
    lines = []
    for i, (history, test) in enumerate(zip(histories, tests)):
        lines += [{"expert": i, "split": "validation", **record} for record in history]
        lines.append({"expert": i, "split": "test", "epoch": len(history) - 1, **test})
    write_text("".join(json.dumps(line) + "\n" for line in lines), out_dir / "experts.jsonl")
    return summary


def _refuse_extra_experts(out_dir: Path, count: int, restart: bool) -> None:
    """Expert files numbered `count` or more: distillation reads every expert file in the folder, so they would be
    mixed in. With `restart` they are deleted; otherwise refused, naming the first."""
    extra = [path for index, path in expert_files(out_dir) if index >= count]
    if extra and not restart:
        raise UserError(
            f"{extra[0]} is beyond experts.count={count} ({len(extra)} such file(s)); raise experts.count, use a new"
            " --out, or delete them with --restart"
        )
    for path in extra:
        path.unlink(missing_ok=True)  # every torchrun rank looks at every file


def train_experts(cfg, out_dir: Path, restart: bool = False) -> None:
    """Train `experts.count` experts into `out_dir` (sharded over torchrun ranks); finished experts of the same
    settings are kept, those of other settings or numbered beyond the count refused (with `restart`: trained
    again, or deleted).

    Rank 0 prepares the data first so the others find the feature cache built; rank 0 writes summary.json
    once every rank is done.
    """

    out_dir = Path(out_dir)
    with (
        distributed.process_group(cfg.device) as (rank, world),
        folder_lock(out_dir) if distributed.is_main() else contextlib.nullcontext(),
    ):
        out_dir.mkdir(parents=True, exist_ok=True)
        _refuse_extra_experts(out_dir, cfg.experts.count, restart)
        todo = [i for i in range(cfg.experts.count) if not _is_done(expert_path(out_dir, i), cfg, restart)]
        mine = distributed.shard(todo)
        if world > 1:
            logger.info("rank %d/%d trains experts %s", rank, world, mine)
        if todo:  # the same on every rank, so all of them pass the same barriers
            with distributed.main_first():  # rank 0 builds the feature cache
                bundle = prepare(cfg, verbose=distributed.is_main())
            for index in mine:
                train_expert(cfg, bundle, index, out_dir, resolve_device(cfg.device))
        distributed.barrier()
        if distributed.is_main():
            summary = summarize(out_dir, cfg.experts.count)
            logger.info(
                "%d experts in %s: test r_mean %.2f (std %.2f), %.2f s/epoch",
                cfg.experts.count,
                out_dir,
                summary["test"]["r_mean"],
                summary["test_std"]["r_mean"],
                summary["seconds_per_epoch"],
            )
