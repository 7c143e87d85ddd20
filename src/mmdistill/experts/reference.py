"""Interop with the reference code's replay buffers: import them as experts, export experts in their layout."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from mmdistill.errors import UserError
from mmdistill.experts.store import (
    DTYPES,
    ExpertStore,
    expert_files,
    expert_path,
    layouts_json,
    trajectory_step_norms,
    write_expert,
)
from mmdistill.io import load_torch, save_torch
from mmdistill.model import GROUPS, ParamLayout

logger = logging.getLogger(__name__)

REFERENCE_FILE = "{group}_replay_buffer_{n}.pt"
REFERENCE_WINDOWS = (6, 8)  # snapshots in PTM-ST's convexified_0_6 / convexified_0_8 copies


def _check_reference(path: Path, data) -> list[list[list[torch.Tensor]]]:
    """The trajectories of one reference file, or a UserError saying what is wrong with it."""
    if not isinstance(data, (list, tuple)) or not data:
        raise UserError(f"{path}: expected a non-empty list of trajectories, got {type(data).__name__}")
    for k, trajectory in enumerate(data):
        if not isinstance(trajectory, (list, tuple)) or len(trajectory) < 2:
            raise UserError(f"{path}: trajectory {k} is not a list of at least 2 snapshots")
        shapes = None
        for s, snapshot in enumerate(trajectory):
            ok = (
                isinstance(snapshot, (list, tuple))
                and snapshot
                and all(isinstance(t, torch.Tensor) and t.dtype in DTYPES.values() for t in snapshot)
            )
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
    if out.is_dir() and expert_files(out):
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
            raise UserError(
                f"{paths['img']} holds {len(buffers['img'])} trajectories but {paths['txt']} holds"
                f" {len(buffers['txt'])}"
            )
        for position, pair in enumerate(zip(buffers["img"], buffers["txt"])):
            trajectories = dict(zip(GROUPS, pair))
            layouts = {g: _reference_layout([t.shape for t in trajectories[g][0]]) for g in GROUPS}
            dtypes = {t.dtype for g in GROUPS for t in trajectories[g][0]}
            header = (layouts_json(layouts), len(pair[0]), len(pair[1]), dtypes)
            first_header = first_header or header
            if header != first_header:
                raise UserError(
                    f"{paths['img']}: trajectory {position} differs from the first one in parameter"
                    " shapes, snapshot count or dtype"
                )
            flat = {
                g: torch.stack([torch.cat([t.reshape(-1) for t in snap]) for snap in trajectories[g]]) for g in GROUPS
            }
            dtype = next(name for name, d in DTYPES.items() if d == flat["img"].dtype)
            write_expert(
                expert_path(out, index),
                flat,
                {g: trajectory_step_norms(flat[g], layouts[g]) for g in GROUPS},
                layouts,
                dtype,
                {"source": str(source), "reference_file": n, "reference_position": position},
            )
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
            content = [
                [[t.clone() for t in layout.unflatten(row).values()] for row in trajectory[g]]
                for trajectory in trajectories
            ]
            save_torch(content, Path(out) / REFERENCE_FILE.format(group=g, n=n))


def export_reference(experts_dir: Path, out: Path, snapshots: tuple[int, int] | None = None) -> None:
    """Write experts back in the reference layout; `snapshots` = (first, last) limits the rows (inclusive)."""
    store = ExpertStore(experts_dir)
    start, end = snapshots or (0, store.epochs)
    write_reference(store, out, lambda e: store.trajectory(e, start, end))
