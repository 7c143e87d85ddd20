"""Atomic file writes: every artefact is written to a temporary file in the same folder, then renamed."""
from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_tensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file atomically; refuses non-finite floating tensors so no NaN result is ever saved."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"refusing to save non-finite tensor {name!r} to {path}")
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def _reject_nan(value):
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("refusing to write a non-finite number to JSON")
    if isinstance(value, dict):
        for v in value.values():
            _reject_nan(v)
    if isinstance(value, (list, tuple)):
        for v in value:
            _reject_nan(v)


def write_json(obj, path: str | os.PathLike) -> None:
    """Write JSON atomically (indented, keys in insertion order); NaN/Inf are refused."""
    _reject_nan(obj)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line in one write call, so processes appending to the same log do not interleave."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def write_text(text: str, path: str | os.PathLike) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
