"""`bench storage`: bytes per expert in our format against the reference's layout."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch

from mmdistill.bench.models import build_bench_model
from mmdistill.experts.reference import REFERENCE_WINDOWS
from mmdistill.experts.store import trajectory_step_norms, write_expert
from mmdistill.model import GROUPS

logger = logging.getLogger(__name__)


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
