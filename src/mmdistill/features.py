"""Frozen text and image features, computed once per (split, encoder, transform) and cached as safetensors.

A cache file is `{cache_dir}/features/{kind}-{sha}.safetensors` holding one tensor `features` [rows, dim]. The
sha covers everything the numbers depend on, so a changed split, encoder, image size or feature format simply
misses the cache instead of returning stale features.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from mmdistill.data import load_image
from mmdistill.data.transforms import build_transform
from mmdistill.encoders import build_frozen_image_encoder, build_text_encoder
from mmdistill.errors import UserError
from mmdistill.io import save_tensors
from mmdistill.utils import digest, progress_bar, resolve_device

# Bump when the way features are computed changes, so older cache files are no longer picked up.
FEATURE_FORMAT_VERSION = 1


def text_features(
    split, encoder_name: str, cache_dir: str | os.PathLike, device: str | torch.device = "cpu", batch_size: int = 256
) -> torch.Tensor:
    """Features of every caption of `split`, float32 CPU [num_captions, dim]."""
    key = {"kind": "text", "split": split.fingerprint(), "encoder": encoder_name}
    path = cache_path(cache_dir, key)
    if path.exists():
        return _load(path, len(split.captions))
    encoder = build_text_encoder(encoder_name, device)
    features = encoder.encode(split.captions, batch_size=batch_size, progress=True)
    _save(path, features, key, split)
    return features


def image_features(
    split,
    encoder_name: str,
    image_size: int,
    cache_dir: str | os.PathLike,
    device: str | torch.device = "cpu",
    batch_size: int = 128,
    pretrained: bool = True,
    convnet: dict | None = None,
) -> torch.Tensor:
    """Features of every image of `split` from a frozen image encoder, float32 CPU [num_images, dim].

    Images get the test transform: bicubic resize to `image_size`, normalised with the encoder's own mean/std
    (which the encoder name and `pretrained` determine, so they are keyed through those). `convnet`: the
    convnet's depth/width/norm/pooling, part of the key for that encoder; random weights come from the fixed
    seed of `build_frozen_image_encoder`, as the student's frozen encoder does.
    """
    key = {
        "kind": "image",
        "split": split.fingerprint(),
        "encoder": encoder_name,
        "image_size": image_size,
        "pretrained": pretrained,
        "transform": "none",
        "normalisation": "encoder mean/std",
    }
    if encoder_name == "convnet":
        key["convnet"] = dict(convnet or {})
    path = cache_path(cache_dir, key)
    if path.exists():
        return _load(path, len(split))
    device = resolve_device(str(device))
    encoder = build_frozen_image_encoder(encoder_name, image_size=image_size, pretrained=pretrained, **(convnet or {}))
    encoder.to(device).requires_grad_(False).eval()
    transform = build_transform(image_size, encoder.mean, encoder.std, "none")
    features = torch.empty(len(split), encoder.out_dim)  # filled outside inference_mode: an ordinary tensor
    start = 0
    with progress_bar(total=len(split), desc=f"image features ({encoder_name})", unit="img") as bar:
        for pixels in _pixel_batches(split, transform, batch_size):
            with torch.inference_mode():
                batch_features = encoder(pixels.to(device))
            features[start : start + len(pixels)] = batch_features.float().cpu()
            start += len(pixels)
            bar.update(len(pixels))
    _save(path, features, key, split)
    return features


def _pixel_batches(split, transform, batch_size: int) -> Iterator[torch.Tensor]:
    """The split's transformed images, batch by batch in order; image files are decoded by a thread pool."""
    if isinstance(split.images, torch.Tensor):  # v2 transforms treat leading dims as a batch
        for start in range(0, len(split), batch_size):
            yield transform(split.images[start : start + batch_size])
        return

    def load(i: int) -> torch.Tensor:
        return transform(load_image(split, i))

    # Threads rather than DataLoader workers: decoding releases the GIL, and a UserError (missing file) reaches
    # the caller unchanged instead of wrapped in a multi-line worker traceback.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for start in range(0, len(split), batch_size):
            yield torch.stack(list(pool.map(load, range(start, min(start + batch_size, len(split))))))


def cache_path(cache_dir: str | os.PathLike, key: dict) -> Path:
    """Where the features described by `key` are cached."""
    key = dict(key, format=FEATURE_FORMAT_VERSION)
    return Path(cache_dir).expanduser() / "features" / f"{key['kind']}-{digest(key)}.safetensors"


def _save(path: Path, features: torch.Tensor, key: dict, split) -> None:
    metadata = {
        "encoder": key["encoder"],
        "split": split.name,
        "count": str(features.shape[0]),
        "dim": str(features.shape[1]),
        "key": json.dumps(key, sort_keys=True),
        "format": str(FEATURE_FORMAT_VERSION),
    }
    save_tensors({"features": features}, path, metadata=metadata)


def _load(path: Path, count: int) -> torch.Tensor:
    try:
        features = load_file(str(path))["features"]
    except (SafetensorError, KeyError, OSError) as err:
        raise UserError(f"{path}: unreadable feature cache ({err}); delete it to recompute") from None
    if features.shape[0] != count:
        raise UserError(f"{path}: holds {features.shape[0]} rows, expected {count}; delete it to recompute")
    return features
