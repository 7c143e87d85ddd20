"""The expert trajectory file contract: one safetensors file per expert (flat snapshots per parameter group,
per-tensor step norms, layouts and metadata), written and read only through this module."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from mmdistill import __version__
from mmdistill.errors import UserError
from mmdistill.io import save_tensors
from mmdistill.model import GROUPS, ParamLayout

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
EXPERT_FILE = re.compile(r"expert-(\d+)\.safetensors")


def expert_path(folder: Path, index: int) -> Path:
    return Path(folder) / f"expert-{index:04d}.safetensors"


def expert_files(folder: Path) -> list[tuple[int, Path]]:
    """(index, path) of every expert file in `folder`, by index."""
    return sorted((int(m.group(1)), p) for p in Path(folder).iterdir() if (m := EXPERT_FILE.fullmatch(p.name)))


# ------------------------------------------------------------------------------------------------ file format


def tensor_norms(delta: torch.Tensor, layout: ParamLayout) -> torch.Tensor:
    """L2 norm of each parameter tensor in flat vectors: [..., P] -> [..., n_tensors], float32."""
    parts = delta.float().split(layout.sizes, dim=-1)
    return torch.stack([torch.linalg.vector_norm(part, dim=-1) for part in parts], dim=-1)


def trajectory_step_norms(trajectory: torch.Tensor, layout: ParamLayout) -> torch.Tensor:
    """Per-tensor step norms of a [S, P] trajectory: [S-1, n_tensors]."""
    return torch.stack(
        [
            tensor_norms(trajectory[p + 1].float() - trajectory[p].float(), layout)
            for p in range(trajectory.shape[0] - 1)
        ]
    )


def layouts_json(layouts: dict[str, ParamLayout]) -> str:
    return json.dumps(
        {g: {"names": list(lay.names), "shapes": [list(s) for s in lay.shapes]} for g, lay in layouts.items()}
    )


def parse_layouts(text: str) -> dict[str, ParamLayout]:
    raw = json.loads(text)
    return {g: ParamLayout(tuple(raw[g]["names"]), tuple(tuple(s) for s in raw[g]["shapes"])) for g in GROUPS}


def write_expert(
    path: Path,
    trajectories: dict[str, torch.Tensor],
    step_norms: dict[str, torch.Tensor],
    layouts: dict[str, ParamLayout],
    dtype: str,
    metadata: dict,
) -> None:
    """Write one expert file atomically: trajectories [S, P] per group cast to `dtype`, float32 step norms."""
    tensors = {g: trajectories[g].to(DTYPES[dtype]) for g in GROUPS}
    tensors.update({f"step_norms_{g}": step_norms[g].float() for g in GROUPS})
    header = {
        **metadata,
        "epochs": trajectories["img"].shape[0] - 1,
        "dtype": dtype,
        "version": __version__,
        "layouts": layouts_json(layouts),
    }
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
        self.paths = [p for _, p in expert_files(self.folder)]
        if not self.paths:
            raise UserError(f"no expert files (expert-*.safetensors) in {self.folder}")
        self._metadata = [read_metadata(p) for p in self.paths]
        first = self._metadata[0]
        for path, meta in zip(self.paths[1:], self._metadata[1:]):
            if (meta["layouts"], meta["epochs"]) != (first["layouts"], first["epochs"]):
                raise UserError(
                    f"{path} does not match {self.paths[0]} (other model or epochs); keep one set of experts per folder"
                )
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
