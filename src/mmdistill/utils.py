"""Seeding, device choice and small shared helpers."""

from __future__ import annotations

import hashlib
import json
import sys

import torch
from tqdm.auto import tqdm


def derive_seed(seed: int, *keys) -> int:
    """A 63-bit seed that depends only on (seed, *keys): expert i or iteration k get independent streams."""
    hashed = hashlib.sha256(repr((int(seed),) + tuple(keys)).encode()).digest()
    return int.from_bytes(hashed[:8], "little") & ((1 << 63) - 1)


def digest(obj) -> str:
    """16 hex characters of the SHA-256 of `obj` as canonical JSON: the key of a cache file, stage or config."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def generator(seed: int, *keys) -> torch.Generator:
    """A CPU torch.Generator seeded from (seed, *keys)."""
    gen = torch.Generator()
    gen.manual_seed(derive_seed(seed, *keys))
    return gen


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks cuda when available, else cpu; any other name is passed to torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class _Bar(tqdm):
    """tqdm whose `set_postfix` redraws only when `mininterval` has passed, like `update`: plain tqdm redraws on
    every call, which in a log file is one line per batch."""

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
        if self.disable:  # a disabled bar (another torchrun rank's) has no clock
            return
        due = self._time() - self.last_print_t >= self.mininterval
        super().set_postfix(ordered_dict, refresh=refresh and due, **kwargs)


def progress_bar(**kwargs) -> tqdm:
    """A tqdm bar that redraws at most every 30 s when stderr (where bars go) is not a terminal, so a log
    file gets a bar's first and last line and a few in between, never one per batch."""
    kwargs.setdefault("mininterval", 0.1 if sys.stderr.isatty() else 30.0)
    return _Bar(**kwargs)
