"""`hf`: an image-caption dataset through the Hugging Face `datasets` library (`pip install 'mmdistill[hf]'`).

    data.name          a hub id (e.g. nlphuji/flickr30k) or a local folder: one written by `save_to_disk`, or
                       any folder `load_dataset` reads (imagefolder, parquet, json, ...)
    data.image_column  the image column (default `image`)
    data.text_column   a caption or a list of captions per row (default `text`)
    data.split_map     {train|validation|test: the dataset's split name}; unmapped splits are found by the names
                       `datasets` uses (validation: val, valid, dev, eval; test: testing)

A missing validation or test split is carved out of train (data.val_images / data.test_images or the
fractions, seeded by data.seed). Images are decoded once, resized to data.image_size and kept in memory like
the built-in sources', so the source suits sets that fit in memory at that size.
"""

from __future__ import annotations

import io
import os
import socket
from urllib.parse import urlparse

import numpy as np
import torch
from PIL import Image

from mmdistill.data import carve_missing, cfg_value, clean_caption, in_memory_split
from mmdistill.errors import UserError

FLIP_SAFE = True
SPLIT_NAMES = {
    "train": ("train", "training"),
    "validation": ("validation", "val", "valid", "dev", "eval"),
    "test": ("test", "testing"),
}


def _datasets():
    try:
        import datasets
    except ImportError:
        raise UserError("data source 'hf' needs the datasets package: pip install 'mmdistill[hf]'") from None
    return datasets


def _check_hub_reachable(datasets, name: str) -> None:
    """Fail at once with no network: the hub client would retry for about half a minute before giving up."""
    if datasets.config.HF_HUB_OFFLINE:
        return
    host = urlparse(datasets.config.HF_ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError as err:
        raise UserError(
            f"cannot load dataset {name!r}: it is not a local folder and the hub ({host}) cannot be"
            f" reached ({err.strerror or err}); give data.name a local dataset folder"
        ) from None


def load(name: str) -> dict:
    """The dataset's splits by their own names: a `save_to_disk` folder, another local folder, or a hub id."""
    datasets = _datasets()
    local = os.path.isdir(name)
    if not local:
        if name.startswith((".", "/", "~")) or name.count("/") > 1:  # a path; hub ids are `name` or `org/name`
            raise UserError(f"dataset folder not found: {name}")
        _check_hub_reachable(datasets, name)
    try:
        if local and any(os.path.isfile(os.path.join(name, f)) for f in ("dataset_dict.json", "state.json")):
            loaded = datasets.load_from_disk(name)
        else:
            loaded = datasets.load_dataset(name)
    except (OSError, ValueError, datasets.exceptions.DatasetNotFoundError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"cannot load dataset {name!r}: {first}") from None
    return {"train": loaded} if isinstance(loaded, datasets.Dataset) else dict(loaded)


def _pick_splits(available: dict, split_map, name: str) -> dict:
    chosen = {}
    for ours, aliases in SPLIT_NAMES.items():
        theirs = split_map.get(ours) if split_map else None
        if theirs is not None:
            if theirs not in available:
                raise UserError(
                    f"bad value {theirs!r} for 'data.split_map.{ours}': dataset {name!r} has splits"
                    f" {', '.join(available)}"
                )
            chosen[ours] = theirs
        else:
            found = next((a for a in aliases if a in available), None)
            if found is not None:
                chosen[ours] = found
    if "train" not in chosen:
        raise UserError(
            f"dataset {name!r} has no train split (it has {', '.join(available)}); map one with"
            " --set data.split_map.train=NAME"
        )
    return chosen


def _pixels(value, size: int, where: str) -> np.ndarray:
    """An image cell (PIL image, {"bytes", "path"} or a path) as uint8 [size, size, 3]."""
    try:
        if isinstance(value, dict):
            value = Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else Image.open(value["path"])
        elif isinstance(value, str):
            value = Image.open(value)
        if not isinstance(value, Image.Image):
            raise UserError(f"{where}: expected an image, got {type(value).__name__}")
        return np.asarray(value.convert("RGB").resize((size, size), Image.Resampling.BICUBIC))
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"{where}: cannot decode the image ({err})") from None


def _captions(value, where: str) -> list[str]:
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise UserError(f"{where}: expected a caption or a non-empty list of captions, got {value!r:.60}")
    for text in texts:
        if not clean_caption(text):
            raise UserError(f"{where}: empty caption {text!r} (nothing is left after cleaning)")
    return texts


def build(data_cfg) -> dict:
    name = str(data_cfg.name)
    image_column = cfg_value(data_cfg, "image_column", "image")
    text_column = cfg_value(data_cfg, "text_column", "text")
    size = int(cfg_value(data_cfg, "image_size", 32))
    max_words = int(cfg_value(data_cfg, "max_words", 30))
    available = load(name)
    splits = {}
    for ours, theirs in _pick_splits(available, cfg_value(data_cfg, "split_map", {}), name).items():
        dataset = available[theirs]
        for column, key in ((image_column, "image_column"), (text_column, "text_column")):
            if column not in dataset.column_names:
                raise UserError(
                    f"bad value {column!r} for 'data.{key}': split {theirs!r} of {name!r} has columns"
                    f" {', '.join(dataset.column_names)}"
                )
        images, captions = [], []
        for row, record in enumerate(dataset.select_columns([image_column, text_column])):
            where = f"{name} [{theirs}] row {row}"
            captions.append(_captions(record[text_column], f"{where}, column {text_column!r}"))
            images.append(_pixels(record[image_column], size, f"{where}, column {image_column!r}"))
        if not images:
            raise UserError(f"split {theirs!r} of dataset {name!r} has no rows")
        pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
        splits[ours] = in_memory_split(ours, captions, pixels, max_words)
        splits[ours].origin = f"{name} [{theirs}]"
    return carve_missing(splits, data_cfg, f"dataset {name!r}")
