"""Expert trajectories: train them, store them compactly, read back only the rows a caller needs.

Format: one safetensors file per expert, `expert-0000.safetensors`, with the flat parameter groups as tensors
`img` [E+1, P_img] and `txt` [E+1, P_txt] (row 0 = init, row e = after epoch e) in `experts.dtype`, plus
`step_norms_img` / `step_norms_txt` [E, n_tensors]: ||theta_l^{e+1} - theta_l^e||_2 per parameter tensor l,
taken from the float32 snapshots. The step norms let a shortcut trajectory be built from its two endpoint rows
alone (`trajectory.py`), so the reference's convexified copies never need to be written. The metadata holds
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
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from torch.utils.data import DataLoader, Subset

from . import __version__, distributed
from .config import changed_keys, flat_keys, to_dict
from .errors import UserError
from .io import append_jsonl, folder_lock, load_torch, save_tensors, save_torch, write_json, write_text
from .losses import LOSSES
from .model import GROUPS, ParamLayout, build_bench_model, build_model
from .tracking import log_scalars
from .utils import derive_seed, digest, generator, progress_bar, resolve_device

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
EXPERT_FILE = re.compile(r"expert-(\d+)\.safetensors")
REFERENCE_FILE = "{group}_replay_buffer_{n}.pt"
REFERENCE_WINDOWS = (6, 8)  # snapshots in PTM-ST's convexified_0_6 / convexified_0_8 copies (spec 4, 10)
LOADER_WORKERS = min(8, os.cpu_count() or 1)


def expert_path(folder: Path, index: int) -> Path:
    return Path(folder) / f"expert-{index:04d}.safetensors"


# ------------------------------------------------------------------------------------------------ file format

def tensor_norms(delta: torch.Tensor, layout: ParamLayout) -> torch.Tensor:
    """L2 norm of each parameter tensor in flat vectors: [..., P] -> [..., n_tensors], float32."""
    parts = delta.float().split(layout.sizes, dim=-1)
    return torch.stack([torch.linalg.vector_norm(part, dim=-1) for part in parts], dim=-1)


def trajectory_step_norms(trajectory: torch.Tensor, layout: ParamLayout) -> torch.Tensor:
    """Per-tensor step norms of a [S, P] trajectory: [S-1, n_tensors]."""
    return torch.stack([tensor_norms(trajectory[p + 1].float() - trajectory[p].float(), layout)
                        for p in range(trajectory.shape[0] - 1)])


def layouts_json(layouts: dict[str, ParamLayout]) -> str:
    return json.dumps({g: {"names": list(l.names), "shapes": [list(s) for s in l.shapes]} for g, l in layouts.items()})


def parse_layouts(text: str) -> dict[str, ParamLayout]:
    raw = json.loads(text)
    return {g: ParamLayout(tuple(raw[g]["names"]), tuple(tuple(s) for s in raw[g]["shapes"])) for g in GROUPS}


def write_expert(path: Path, trajectories: dict[str, torch.Tensor], step_norms: dict[str, torch.Tensor],
                 layouts: dict[str, ParamLayout], dtype: str, metadata: dict) -> None:
    """Write one expert file atomically: trajectories [S, P] per group cast to `dtype`, float32 step norms."""
    tensors = {g: trajectories[g].to(DTYPES[dtype]) for g in GROUPS}
    tensors.update({f"step_norms_{g}": step_norms[g].float() for g in GROUPS})
    header = {**metadata, "epochs": trajectories["img"].shape[0] - 1, "dtype": dtype, "version": __version__,
              "layouts": layouts_json(layouts)}
    save_tensors(tensors, path, {k: str(v) for k, v in header.items()})


def read_metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise UserError(f"cannot read expert file {path}: {err}") from None
    if "layouts" not in metadata or "epochs" not in metadata:
        raise UserError(f"{path} is not an mmdistill expert file (no layouts/epochs metadata)")
    return metadata


class ExpertStore:
    """The experts of a folder, read lazily: each call opens one file and reads only the rows it returns."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise UserError(f"expert folder not found: {self.folder}")
        found = [(int(m.group(1)), p) for p in self.folder.iterdir() if (m := EXPERT_FILE.fullmatch(p.name))]
        self.paths = [p for _, p in sorted(found)]
        if not self.paths:
            raise UserError(f"no expert files (expert-*.safetensors) in {self.folder}")
        self._metadata = [read_metadata(p) for p in self.paths]
        first = self._metadata[0]
        for path, meta in zip(self.paths[1:], self._metadata[1:]):
            if (meta["layouts"], meta["epochs"]) != (first["layouts"], first["epochs"]):
                raise UserError(f"{path} does not match {self.paths[0]} (other model or epochs); keep one set of"
                                " experts per folder")
        self.layouts = parse_layouts(first["layouts"])
        self.epochs = int(first["epochs"])
        self.dtype = first["dtype"]

    def __len__(self) -> int:
        return len(self.paths)

    def metadata(self, expert: int) -> dict[str, str]:
        return self._metadata[expert]

    def _rows(self, expert: int, name: str, rows: slice | int) -> torch.Tensor:
        """Some rows of one tensor; non-finite values are refused here, naming the file, so that a damaged expert
        is not mistaken for a diverging distillation."""
        path = self.paths[expert]
        try:
            with safe_open(str(path), framework="pt") as f:
                values = f.get_slice(name)[rows]
        except (SafetensorError, OSError) as err:
            raise UserError(f"cannot read expert file {path}: {err}") from None
        if not torch.isfinite(values).all():
            raise UserError(f"expert file {path} holds non-finite values in {name!r}; train it again")
        return values

    def _check_epoch(self, epoch: int) -> None:
        if not 0 <= epoch <= self.epochs:
            raise UserError(f"snapshot {epoch} requested but the experts in {self.folder} have epochs 0..{self.epochs}")

    def snapshot(self, expert: int, epoch: int) -> dict[str, torch.Tensor]:
        """Flat parameters per group after `epoch` epochs, float32 [P]."""
        self._check_epoch(epoch)
        return {g: self._rows(expert, g, epoch).float() for g in GROUPS}

    def trajectory(self, expert: int, start: int = 0, end: int | None = None) -> dict[str, torch.Tensor]:
        """Snapshots start..end (inclusive) per group, [S, P] in the stored dtype."""
        end = self.epochs if end is None else end
        self._check_epoch(start)
        self._check_epoch(end)
        return {g: self._rows(expert, g, slice(start, end + 1)) for g in GROUPS}

    def step_norms(self, expert: int) -> dict[str, torch.Tensor]:
        """Per-tensor step norms [E, n_tensors] per group."""
        return {g: self._rows(expert, f"step_norms_{g}", slice(None)) for g in GROUPS}


# ---------------------------------------------------------------------------------------------- training

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
    from .data.transforms import ImageDataset

    seeded = None if seed is None else torch.Generator().manual_seed(seed)
    return DataLoader(Subset(ImageDataset(split, transform), order), batch_size=batch_size,
                      num_workers=LOADER_WORKERS, generator=seeded)


def _batches(loader: DataLoader):
    """The loader's batches; a worker re-raises a UserError (a file that changed since `prepare` verified it)
    with its whole traceback as the message, so only the original message is kept."""
    try:
        yield from loader
    except UserError as err:
        raise UserError(str(err).strip().splitlines()[-1].removeprefix(f"{UserError.__module__}.UserError: ")) \
            from None


def _epoch_batches(cfg, bundle, rng: torch.Generator, device: torch.device):
    """One epoch of the reference's buffer training: every caption with its image, shuffled.

    Yields (image inputs, caption ids). A frozen image encoder reads its cached features, without augmentation
    (the features were computed once with the test transform).
    """
    from .data.transforms import augment_batch, build_transform

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
            yield images, ids


def _image_inputs(cfg, bundle, split_name: str, batch_size: int):
    """A split's image inputs in image order, test-transformed, in batches."""
    from .data.transforms import build_transform

    if not cfg.model.image_trainable:
        yield from bundle.features[split_name].split(batch_size)
    elif split_name in bundle.pixels:
        for pixels in bundle.pixels[split_name].split(batch_size):
            yield bundle.normalize(pixels)
    else:
        split = bundle.splits[split_name]
        transform = build_transform(cfg.data.image_size, bundle.mean, bundle.std, "none")
        for images, _ in _batches(_loader(split, transform, list(range(len(split))), batch_size)):
            yield images


@torch.no_grad()
def retrieval_recall(model, cfg, bundle, split_name: str, device: torch.device, batch_size: int = 256) -> dict:
    """Retrieval metrics of `model` on a split (eval mode, batched embeddings); leaves the model's mode as it was."""
    from .metrics import retrieval_metrics

    was_training = model.training
    model.eval()
    images = _image_inputs(cfg, bundle, split_name, batch_size)
    image_emb = torch.cat([model.encode_image(x.to(device)) for x in images])
    text_emb = torch.cat([model.encode_text(t.to(device)) for t in bundle.texts[split_name].split(batch_size)])
    model.train(was_training)
    split = bundle.splits[split_name]
    return retrieval_metrics(model.similarity(image_emb, text_emb).cpu(), split.img2txt, split.txt2img)


def _train_epoch(model, optimizer, loss_fn, batches, texts: torch.Tensor, device: torch.device, bar,
                 where: str) -> float:
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
    model = build_model(cfg.model, text_dim=bundle.text_dim, image_size=cfg.data.image_size,
                        seed=derive_seed(cfg.seed, "expert", index), device=device)
    named = dict(model.named_parameters())
    optimizer = torch.optim.SGD(
        [{"params": [named[n] for n in model.layouts["img"].names], "lr": ec.lr_img},
         {"params": [named[n] for n in model.layouts["txt"].names], "lr": ec.lr_txt}],
        lr=ec.lr_img, momentum=ec.momentum, weight_decay=ec.weight_decay)
    rng = generator(cfg.seed, "expert", index, "data")
    texts = bundle.texts["train"].to(device)
    log = out_dir / "experts.jsonl"

    snapshots = [{g: v.cpu() for g, v in model.get_flat().items()}]
    norms: list[dict[str, torch.Tensor]] = []
    history = [{"epoch": 0, "loss": None, "seconds": 0.0, **retrieval_recall(model, cfg, bundle, "validation", device)}]
    append_jsonl(log, {"expert": index, "split": "validation", **history[0]})
    batches_per_epoch = -(-len(bundle.splits["train"].captions) // ec.batch_size)
    cuda_devices = [torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices), \
            progress_bar(total=ec.epochs * batches_per_epoch, desc=f"expert {index}", unit="batch", leave=False,
                 position=distributed.rank()) as bar:
        torch.manual_seed(derive_seed(cfg.seed, "expert", index, "dropout"))
        model.train()
        for epoch in range(1, ec.epochs + 1):
            start = time.perf_counter()
            loss = _train_epoch(model, optimizer, LOSSES[ec.loss], _epoch_batches(cfg, bundle, rng, device), texts,
                                device, bar, where=f"expert {index} in epoch {epoch}")
            seconds = time.perf_counter() - start
            flat = {g: v.cpu() for g, v in model.get_flat().items()}
            norms.append({g: tensor_norms(flat[g] - snapshots[-1][g], model.layouts[g]) for g in GROUPS})
            snapshots.append(flat)
            record = {"epoch": epoch, "loss": loss, "seconds": seconds,
                      **retrieval_recall(model, cfg, bundle, "validation", device)}
            history.append(record)
            append_jsonl(log, {"expert": index, "split": "validation", **record})
            log_scalars(f"experts/expert-{index}", {"loss": loss, "val_r_mean": record["r_mean"]}, epoch)
    test = retrieval_recall(model, cfg, bundle, "test", device)
    append_jsonl(log, {"expert": index, "split": "test", "epoch": ec.epochs, **test})
    logger.info("expert %d: val r_mean %.2f, test r_mean %.2f, %.2f s/epoch", index, history[-1]["r_mean"],
                test["r_mean"], statistics.fmean(r["seconds"] for r in history[1:]))
    write_expert(
        expert_path(out_dir, index),
        {g: torch.stack([s[g] for s in snapshots]) for g in GROUPS},
        {g: torch.stack([n[g] for n in norms]) for g in GROUPS},
        model.layouts, ec.dtype,
        {"preset": cfg.name, "seed": cfg.seed, "expert": index, "image_trainable": cfg.model.image_trainable,
         "fingerprint": config_fingerprint(cfg), "config_keys": json.dumps(expert_keys(cfg)),
         "history": json.dumps(history), "test": json.dumps(test)})


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
    raise UserError(f"{path} was trained with other settings ({differ}); undo the change, use a new --out, or"
                    " retrain with --restart")


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


def train_experts(cfg, out_dir: Path, restart: bool = False) -> None:
    """Train `experts.count` experts into `out_dir` (sharded over torchrun ranks); finished experts of the same
    settings are kept, those of other settings refused (with `restart`: trained again).

    Rank 0 prepares the data first so the others find the feature cache built; rank 0 writes summary.json
    once every rank is done.
    """
    from .prepare import prepare

    out_dir = Path(out_dir)
    with distributed.process_group(cfg.device) as (rank, world), \
            folder_lock(out_dir) if distributed.is_main() else contextlib.nullcontext():
        out_dir.mkdir(parents=True, exist_ok=True)
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
            logger.info("%d experts in %s: test r_mean %.2f (std %.2f), %.2f s/epoch", cfg.experts.count, out_dir,
                        summary["test"]["r_mean"], summary["test_std"]["r_mean"], summary["seconds_per_epoch"])


# ----------------------------------------------------------------------------------- the reference layout

def _check_reference(path: Path, data) -> list[list[list[torch.Tensor]]]:
    """The trajectories of one reference file, or a UserError saying what is wrong with it."""
    if not isinstance(data, (list, tuple)) or not data:
        raise UserError(f"{path}: expected a non-empty list of trajectories, got {type(data).__name__}")
    for k, trajectory in enumerate(data):
        if not isinstance(trajectory, (list, tuple)) or len(trajectory) < 2:
            raise UserError(f"{path}: trajectory {k} is not a list of at least 2 snapshots")
        shapes = None
        for s, snapshot in enumerate(trajectory):
            ok = isinstance(snapshot, (list, tuple)) and snapshot and all(
                isinstance(t, torch.Tensor) and t.dtype in DTYPES.values() for t in snapshot)
            if not ok:
                raise UserError(f"{path}: trajectory {k}, snapshot {s} is not a list of float tensors")
            if shapes is None:
                shapes = [t.shape for t in snapshot]
            elif [t.shape for t in snapshot] != shapes:
                raise UserError(f"{path}: trajectory {k}, snapshot {s} has other parameter shapes than snapshot 0")
    return data


def _load_reference(path: Path) -> list[list[list[torch.Tensor]]]:
    return _check_reference(path, load_torch(path, "reference buffer", mmap=True))


def _reference_layout(shapes) -> ParamLayout:
    return ParamLayout(tuple(f"param_{j}" for j in range(len(shapes))), tuple(tuple(s) for s in shapes))


def require_no_experts(out: Path) -> None:
    if out.is_dir() and any(EXPERT_FILE.fullmatch(p.name) for p in out.iterdir()):
        raise UserError(f"{out} already holds expert files; choose a new --out")


def import_reference(source: Path, out: Path, fmt: str = "reference") -> None:
    """Convert reference replay buffers (`{img,txt}_replay_buffer_{n}.pt`, n = 0, 1, ...) into expert files.

    The k-th img trajectory of file n pairs with the k-th txt trajectory; experts are numbered in file order.
    Each records its file and position, so `export_reference` regroups them exactly.
    """
    if fmt != "reference":
        raise UserError(f"unknown import format {fmt!r}; supported: reference")
    source, out = Path(source), Path(out)
    if not (source / REFERENCE_FILE.format(group="img", n=0)).is_file():
        raise UserError(f"no reference buffers in {source} (expected img_replay_buffer_0.pt, txt_replay_buffer_0.pt)")
    require_no_experts(out)
    index, first_header, n = 0, None, 0
    while (source / REFERENCE_FILE.format(group="img", n=n)).is_file():
        paths = {g: source / REFERENCE_FILE.format(group=g, n=n) for g in GROUPS}
        if not paths["txt"].is_file():
            raise UserError(f"{paths['img']} has no partner file {paths['txt']}")
        buffers = {g: _load_reference(paths[g]) for g in GROUPS}
        if len(buffers["img"]) != len(buffers["txt"]):
            raise UserError(f"{paths['img']} holds {len(buffers['img'])} trajectories but {paths['txt']} holds"
                            f" {len(buffers['txt'])}")
        for position, pair in enumerate(zip(buffers["img"], buffers["txt"])):
            trajectories = dict(zip(GROUPS, pair))
            layouts = {g: _reference_layout([t.shape for t in trajectories[g][0]]) for g in GROUPS}
            dtypes = {t.dtype for g in GROUPS for t in trajectories[g][0]}
            header = (layouts_json(layouts), len(pair[0]), len(pair[1]), dtypes)
            first_header = first_header or header
            if header != first_header:
                raise UserError(f"{paths['img']}: trajectory {position} differs from the first one in parameter"
                                " shapes, snapshot count or dtype")
            flat = {g: torch.stack([torch.cat([t.reshape(-1) for t in snap]) for snap in trajectories[g]])
                    for g in GROUPS}
            dtype = next(name for name, d in DTYPES.items() if d == flat["img"].dtype)
            write_expert(expert_path(out, index), flat,
                         {g: trajectory_step_norms(flat[g], layouts[g]) for g in GROUPS}, layouts, dtype,
                         {"source": str(source), "reference_file": n, "reference_position": position})
            index += 1
        n += 1
    logger.info("imported %d experts from %d reference file pairs in %s into %s", index, n, source, out)


def write_reference(store: ExpertStore, out: Path, trajectory_of: Callable[[int], dict[str, torch.Tensor]]) -> None:
    """Write `trajectory_of(expert)` ([S, P] per group) for every expert of `store` in the reference layout.

    Experts imported from reference files go back to the file and position they came from; others get one
    file each. Every parameter tensor is its own copy, as the reference saves them.
    """
    files: dict[int, list[int]] = {}
    for expert in range(len(store)):
        meta = store.metadata(expert)
        n = int(meta.get("reference_file", expert))
        files.setdefault(n, []).append(expert)
    for n, experts in sorted(files.items()):
        experts.sort(key=lambda e: int(store.metadata(e).get("reference_position", e)))
        trajectories = [trajectory_of(e) for e in experts]
        for g in GROUPS:
            layout = store.layouts[g]
            content = [[[t.clone() for t in layout.unflatten(row).values()] for row in trajectory[g]]
                       for trajectory in trajectories]
            save_torch(content, Path(out) / REFERENCE_FILE.format(group=g, n=n))


def export_reference(experts_dir: Path, out: Path, snapshots: tuple[int, int] | None = None) -> None:
    """Write experts back in the reference layout; `snapshots` = (first, last) limits the rows (inclusive)."""
    store = ExpertStore(experts_dir)
    start, end = snapshots or (0, store.epochs)
    write_reference(store, out, lambda e: store.trajectory(e, start, end))


# ---------------------------------------------------------------------------------------------- benchmark

def bench_storage(cfg) -> dict:
    """Bytes of one expert in our format (float32 and float16) against the reference layout for the same expert:
    its full trajectory plus the convexified copies PTM-ST writes for its two windows. Random values: both
    formats store raw, uncompressed tensors, so size does not depend on them."""
    layouts = build_bench_model(cfg).layouts
    snapshots = cfg.experts.epochs + 1
    windows = [min(w, snapshots) for w in REFERENCE_WINDOWS]
    rng = torch.Generator().manual_seed(0)
    result = {"params_img": layouts["img"].numel, "params_txt": layouts["txt"].numel, "snapshots": snapshots}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        trajectories = {g: torch.randn(snapshots, layouts[g].numel, generator=rng) for g in GROUPS}
        norms = {g: trajectory_step_norms(trajectories[g], layouts[g]) for g in GROUPS}
        for dtype, key in (("float32", "native_fp32_bytes"), ("float16", "native_fp16_bytes")):
            path = folder / f"expert-{dtype}.safetensors"
            write_expert(path, trajectories, norms, layouts, dtype, {})
            result[key] = path.stat().st_size
            path.unlink()
        del trajectories, norms
        reference_bytes = 0
        for g in GROUPS:
            trajectory = [[torch.randn(shape, generator=rng) for shape in layouts[g].shapes] for _ in range(snapshots)]
            for name, rows in [("full", snapshots)] + [(f"convexified_0_{w}", w) for w in windows]:
                path = folder / f"{name}_{g}_replay_buffer_0.pt"
                torch.save([trajectory[:rows]], path)
                reference_bytes += path.stat().st_size
                path.unlink()
            del trajectory
    result["reference_bytes"] = reference_bytes
    result["ratio_fp32"] = result["native_fp32_bytes"] / reference_bytes
    result["ratio_fp16"] = result["native_fp16_bytes"] / reference_bytes
    return result
