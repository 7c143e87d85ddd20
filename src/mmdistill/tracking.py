"""Metrics sinks: scalars of a run (matching loss, learned lrs, recall snapshots, evaluation tables) to
TensorBoard or Weights & Biases, as `--log tensorboard DIR` / `--log wandb [DIR]` ask.

The stages call `log_scalars(group, values, step)`; without a sink (the default) that does nothing. A sink is
active inside `with tracking(sink):`. The wandb run is offline unless WANDB_API_KEY is set (WANDB_MODE wins).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
from collections.abc import Iterator
from typing import Protocol

from mmdistill.errors import UserError


class Sink(Protocol):
    def scalars(self, group: str, values: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class TensorBoardSink:
    """torch.utils.tensorboard's SummaryWriter; one tag per value, `group/name`."""

    def __init__(self, folder: str, writer_class=None):
        if writer_class is None:
            from torch.utils.tensorboard import SummaryWriter as writer_class
        self.writer = writer_class(log_dir=folder)

    def scalars(self, group: str, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(f"{group}/{name}", value, step)

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """A wandb run; each group's values are logged with their own step key (`group/step`), since the stages'
    steps (epochs, iterations) are not one shared counter."""

    def __init__(self, folder: str | None, wandb_module=None):
        wandb = wandb_module or importlib.import_module("wandb")
        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        self.run = wandb.init(project="mmdistill", dir=folder, mode=mode)
        self.defined: set[str] = set()

    def scalars(self, group: str, values: dict[str, float], step: int) -> None:
        if group not in self.defined:
            self.run.define_metric(f"{group}/step")
            self.run.define_metric(f"{group}/*", step_metric=f"{group}/step")
            self.defined.add(group)
        self.run.log({f"{group}/step": step, **{f"{group}/{k}": v for k, v in values.items()}})

    def close(self) -> None:
        self.run.finish()


def _require(module: str, extra: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise UserError(f"--log {extra} needs the {module} package: pip install 'mmdistill[{extra}]'")


def open_sink(name: str, folder: str | None = None) -> Sink:
    """The sink `name` writing to `folder`; a missing package is a one-line error naming the extra to install."""
    if name == "tensorboard":
        _require("tensorboard", "tensorboard")
        return TensorBoardSink(folder)
    if name == "wandb":
        _require("wandb", "wandb")
        return WandbSink(folder)
    raise UserError(f"--log: unknown sink {name!r}; choose from tensorboard, wandb")


_active: list[Sink] = []


@contextlib.contextmanager
def tracking(sink: Sink | None) -> Iterator[None]:
    """Send `log_scalars` calls inside the block to `sink` (None: nowhere); the sink is closed at the end."""
    if sink is None:
        yield
        return
    _active.append(sink)
    try:
        yield
    finally:
        _active.remove(sink)
        sink.close()


def log_table(methods: dict) -> None:
    """An evaluation table (results.json's "methods"): each method's numeric entries under `results/<method>`."""
    for name, entry in methods.items():
        log_scalars(
            f"results/{name}",
            {k: v for k, v in entry.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
            0,
        )


def log_scalars(group: str, values: dict, step: int) -> None:
    """Scalars of one step of a stage (e.g. group "distill/phase-0", step = iteration); None values are skipped."""
    if not _active:
        return
    clean = {k: float(v) for k, v in values.items() if v is not None}
    for sink in _active:
        sink.scalars(group, clean, step)
