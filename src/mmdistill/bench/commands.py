"""`mmdistill bench ...`: benchmarks print ratios measured side by side in one run (not timed tests)."""

from __future__ import annotations

import json
from pathlib import Path


def _show(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
        return
    width = max(len(k) for k in result)
    for key, value in result.items():
        shown = f"{value:.4g}" if isinstance(value, float) else value
        print(f"{key:<{width}}  {shown}")


def storage(cfg, out=None, as_json: bool = False) -> dict:
    """Bytes per expert in our format (fp32, half) against the reference layout (+ its convexified copies)."""
    from mmdistill.bench.storage import bench_storage

    result = bench_storage(cfg)
    _show(result, as_json)
    return result


def iteration(cfg, out=None, as_json: bool = False) -> dict:
    """Seconds per distillation iteration vs plain training steps, and memory at syn_steps 5 vs 20."""
    from mmdistill.bench.iteration import bench_iteration

    result = bench_iteration(cfg)
    _show(result, as_json)
    return result


def quality(cfg, out=None, as_json: bool = False) -> dict:
    """All methods and coresets side by side, same seeds."""
    from mmdistill.pipeline import bench_quality

    result = bench_quality(cfg, out)
    if as_json:
        print(json.dumps(result))
    return result


def budgets(cfgs, out=None, as_json: bool = False) -> dict:
    """The methods of bench quality at several budgets (one preset each) on one set of experts."""
    from mmdistill.pipeline import bench_budgets

    family = cfgs[-1].name.rsplit("-", 1)[0]
    result = bench_budgets(cfgs, Path(out) if out else Path("runs") / f"budgets-{family}")
    if as_json:
        print(json.dumps(result))
    return result


def cross_arch(cfg, out=None, as_json: bool = False) -> dict:
    """Images distilled through the preset's encoder, trained on by other students, beside a random coreset."""
    from mmdistill.bench.cross_arch import run_cross_arch

    result = run_cross_arch(cfg, Path(out) if out else Path("runs") / f"cross-arch-{cfg.name}")
    if as_json:
        print(json.dumps(result))
    return result


def robustness(cfg=None, out=None, as_json: bool = False) -> dict:
    """The default settings on sets no preset was tuned on, 50 and 100 pairs: ptm-st vs random vs full data."""
    from mmdistill.bench.robustness import run_robustness

    result = run_robustness(Path(out) if out else Path("runs") / "robustness")
    if as_json:
        print(json.dumps(result))
    return result


def metrics(as_json: bool = False) -> dict:
    """Retrieval metrics by counting vs per-row argsort loops on 1000 x 5000, and alone on 5000 x 25000."""
    from mmdistill.bench.metrics import bench_metrics

    result = bench_metrics()
    _show(result, as_json)
    return result
