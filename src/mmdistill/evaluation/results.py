"""Results entries and tables: one entry per method (mean/std over runs), its status against random, and the
`evaluate` command."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from mmdistill.coresets import CORESETS
from mmdistill.errors import UserError
from mmdistill.evaluation.student import evaluate_phases, with_run_method
from mmdistill.io import folder_lock, read_json, write_json
from mmdistill.metrics import METRICS
from mmdistill.prepare import Prepared, prepare
from mmdistill.synthetic import load_distilled, phases_for
from mmdistill.tracking import log_table

logger = logging.getLogger(__name__)

REFERENCE = "full"  # the full-data upper bound: shown, but not in the competition for the best cell
BASELINES = (*CORESETS, REFERENCE)


def mean_std(entry: dict, metric: str) -> tuple[float, float | None]:
    """A results entry's mean and std of one metric (std None where one run was made)."""
    std = entry.get("std", {}).get(metric)
    if metric == "r_mean":
        std = entry.get("r_mean_std", std)
    return entry[metric], std


# -- command ---------------------------------------------------------------------------------------------
def results_path(out: Path) -> Path:
    """`--out` names a folder (results.json goes inside) or, ending in .json, the file itself."""
    out = Path(out)
    return out if out.suffix == ".json" else out / "results.json"


def unstable_runs(entry: dict) -> str:
    """How many runs diverged or broke down, e.g. "1 diverged, 1 broke down" ("" for none). Their numbers come
    from an earlier checkpoint than the run was trained to, so every table says so beside the runs."""
    counts = {"diverged": entry.get("diverged"), "broke down": entry.get("broke_down")}
    return ", ".join(f"{count} {what}" for what, count in counts.items() if count)


def format_table(methods: dict) -> str:
    """One line per method: the six recalls, r_mean +- std, runs, how many runs diverged or broke down, if any,
    and FAILED / BELOW RANDOM where it applies."""
    header = f"{'method':<16}" + "".join(f"{m:>7}" for m in METRICS[:-1]) + f"{'r_mean':>16}{'runs':>6}  status"
    lines = [header]
    for name, entry in methods.items():
        recalls = "".join(f"{entry[m]:>7.2f}" for m in METRICS[:-1])
        unstable = f"  ({unstable_runs(entry)})" if unstable_runs(entry) else ""
        status = f"  {method_status(entry, methods)}".rstrip()
        lines.append(
            f"{name:<16}{recalls}{entry['r_mean']:>9.2f} ± {entry['r_mean_std']:<4.2f}{entry['runs']:>6}"
            f"{status}{unstable}"
        )
    notes = failure_notes(methods)
    return "\n".join(lines + ([""] + notes if notes else []))


def method_status(entry: dict, methods: dict) -> str:
    """FAILED for a distillation with a collapsed phase, BELOW RANDOM for one under the random coreset."""
    if entry.get("collapsed_phases"):
        return "FAILED"
    random = methods.get("random")
    if "collapsed_phases" in entry and random is not None and entry["r_mean"] < random["r_mean"]:
        return "BELOW RANDOM"
    return ""


def best_coreset(methods: dict) -> str | None:
    """The coreset with the highest r_mean among those evaluated (None without any)."""
    coresets = [name for name in CORESETS if name in methods]
    return max(coresets, key=lambda name: methods[name]["r_mean"], default=None)


def _verdict(holds: bool) -> str:
    return "holds" if holds else "DOES NOT HOLD"


def budget_claims(budgets: dict[str, dict]) -> list[str]:
    """The paper's claims across budgets ({pairs: methods}), each with its verdict: ptm-st's r_mean grows with
    the budget, and ptm-st stays above lors, mtt-vl and the best coreset at every budget."""
    pairs = sorted(budgets, key=int)
    claims = []
    if all("ptm-st" in budgets[b] for b in pairs) and len(pairs) > 1:
        means = [budgets[b]["ptm-st"]["r_mean"] for b in pairs]
        grows = all(a < b for a, b in zip(means, means[1:]))
        shown = " < ".join(f"{m:.1f} ({b})" for m, b in zip(means, pairs))
        claims.append(f"ptm-st grows with the budget, {shown}: {_verdict(grows)}")
    for other in ("lors", "mtt-vl", "the best coreset"):
        # the best coreset is chosen per budget, and named beside its budget
        rivals = {b: best_coreset(budgets[b]) if other == "the best coreset" else other for b in pairs}
        common = [b for b in pairs if rivals[b] in budgets[b] and "ptm-st" in budgets[b]]
        if not common:
            continue
        gaps = {b: budgets[b]["ptm-st"]["r_mean"] - budgets[b][rivals[b]]["r_mean"] for b in common}
        named = {b: f"{b}, {rivals[b]}" if other == "the best coreset" else b for b in common}
        margins = ", ".join(f"{gap:+.1f} ({named[b]})" for b, gap in gaps.items())
        claims.append(f"ptm-st above {other} at every budget, by {margins}: {_verdict(min(gaps.values()) > 0)}")
    return claims


def ablation_claims(methods: dict) -> list[str]:
    """The paper's Table 4 ordering, each with its verdict: all three components (ptm+st+ema) at least each
    single one (ema, ptm, st), and each single one at least the base. Empty unless those variants were run."""
    singles = ("ema", "ptm", "st")
    if not all(name in methods for name in ("base", "ptm+st+ema", *singles)):
        return []
    r = {name: methods[name]["r_mean"] for name in ("base", "ptm+st+ema", *singles)}
    claims = [
        f"ptm+st+ema {r['ptm+st+ema']:.1f} >= {name} {r[name]:.1f}: {_verdict(r['ptm+st+ema'] >= r[name])}"
        for name in singles
    ]
    claims += [f"{name} {r[name]:.1f} >= base {r['base']:.1f}: {_verdict(r[name] >= r['base'])}" for name in singles]
    return claims


def failure_notes(methods: dict) -> list[str]:
    """Plain sentences for every distilled set that failed or lost to the random coreset."""
    notes, random = [], methods.get("random")
    for name, entry in methods.items():
        for collapse in entry.get("collapsed_phases", []):
            notes.append(
                f"{name} FAILED: phase {collapse['phase']} collapsed at iteration {collapse['iteration']}"
                f" ({collapse['reason']}); its distilled set is not a result."
            )
        if random is not None and "collapsed_phases" in entry and entry["r_mean"] < random["r_mean"]:
            notes.append(
                f"{name} r_mean {entry['r_mean']:.1f} is below the random coreset's {random['r_mean']:.1f}:"
                " the distilled set is worse than the same number of random real pairs."
            )
        fallen = [run["broke_down"] for run in entry.get("per_run", []) if run.get("broke_down")]
        if fallen:
            falls = "; ".join(
                f"{f['best_val_r_mean']:.1f} -> {f['val_r_mean']:.1f} in phase {f['phase']}, epoch {f['epoch']}"
                for f in fallen
            )
            notes.append(
                f"{name}: {len(fallen)} of {entry['runs']} students broke down (validation r_mean {falls}); each"
                " reports the checkpoint the protocol selected. The lrs they train with are at the edge of stability."
            )
    return notes


def evaluate_distilled(cfg, bundle: Prepared, phases: list[dict]) -> dict:
    """A distilled set's results entry: evaluate_phases with the config's runs and seed, plus the collapse
    records of its phases (`collapsed_phases`, empty when every phase learned), which the tables mark FAILED."""
    entry = evaluate_phases(cfg, bundle, phases, runs=cfg.evaluate.runs, seed=cfg.seed)
    return {
        **entry,
        "collapsed_phases": [
            {"phase": p, **phase["collapse"]} for p, phase in enumerate(phases) if phase.get("collapse")
        ],
    }


def evaluate_command(cfg, synthetic: Path, out_path: Path, fmt: str = "mmdistill") -> dict:
    """`mmdistill evaluate`: evaluate a distilled set (any layout `synthetic.load_distilled` reads, or another code
    base's with `fmt`) and merge its entry into results.json."""

    distilled = load_distilled(synthetic, fmt)
    method = distilled.method
    cfg = with_run_method(cfg, distilled.meta)
    bundle = prepare(cfg)
    phases = phases_for(distilled, cfg, bundle)
    path = results_path(out_path)
    with folder_lock(path.parent):
        results = {
            "preset": cfg.name,
            "dataset": cfg.data.source,
            "pairs": sum(len(p["texts"]) for p in phases),
            "seed": cfg.seed,
            "methods": {},
            "timing": {"evaluate_s": 0.0},
        }
        if path.exists():
            old = read_json(path)
            if any(old.get(k) != results[k] for k in ("preset", "dataset", "pairs", "seed")):
                raise UserError(
                    f"{path} holds results of another preset, dataset, budget or seed; choose another --out"
                )
            results.update(methods=old.get("methods", {}), timing=old.get("timing", results["timing"]))
        start = time.perf_counter()
        results["methods"][method] = evaluate_distilled(cfg, bundle, phases)
        results["timing"]["evaluate_s"] = results["timing"].get("evaluate_s", 0.0) + time.perf_counter() - start
        write_json(results, path)
    log_table(results["methods"])
    print(format_table(results["methods"]))
    return results
