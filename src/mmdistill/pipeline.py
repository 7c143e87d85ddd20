"""`run`, `demo`, `ablate` and `bench quality`: the stages end to end, each reused while its inputs are unchanged.

Output folder:
    experts/                 expert trajectories, shared by every command on the folder
    distilled/               the preset method's phases, checkpoints/ inside
    ablation/<name>/         one distillation per Table 4 variant (ablate)
    methods/<name>/          the other engine methods (bench quality)
    budget-<pairs>/<name>/   every method at one budget (bench budgets; the experts are shared)
    stages.json              per stage: fingerprint, finished or not, version, result
    results.json             the evaluated methods and the wall time per stage
    report.md, report.html, figures/ (run); ablation.md, quality.md + bar charts (ablate, bench quality);
    budgets.md + budgets.png (bench budgets)

A stage's fingerprint hashes the config sections it reads and the versions of the stages it reads from. It is
skipped when a finished record has the same fingerprint and its outputs exist; otherwise its stale outputs are
deleted and it runs, under a new version, so everything downstream runs too. With `resume`, an unfinished stage
with the same fingerprint continues from its files (distillation checkpoints) instead. Expert files are keyed one
by one by their own settings, so a rerun of the experts stage always keeps those still valid.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from mmdistill.config import (
    ABLATION,
    METHODS,
    changed_keys,
    flat_keys,
    load_config,
    to_dict,
    total_pairs,
    with_method,
)
from mmdistill.coresets import CORESETS
from mmdistill.distill.engine import distill, distill_keys, plan_phases
from mmdistill.errors import UserError
from mmdistill.evaluation.baselines import evaluate_coreset, full_data_metrics
from mmdistill.evaluation.results import evaluate_distilled, format_table
from mmdistill.evaluation.student import evaluate_phases
from mmdistill.experts.train import train_experts
from mmdistill.io import folder_lock, write_json
from mmdistill.prepare import check_pairs, prepare
from mmdistill.report.document import STAGES, write_budget_report, write_report, write_table_report
from mmdistill.synthetic import load_phase, load_synthetic
from mmdistill.tracking import log_scalars, log_table
from mmdistill.utils import digest

logger = logging.getLogger(__name__)

QUALITY = ("mtt-vl", "lors", "ptm-st", "ptm-st+blend", *CORESETS, "full")
CURVE_POINTS = 4  # intermediate snapshots per phase evaluated for the recall curve (1 run each)


def _sections(cfg, *names: str) -> dict:
    raw = to_dict(cfg)
    return {name: raw[name] for name in names}


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


class Ledger:
    """stages.json: what each stage was computed from, so unchanged stages are reused and stale ones redone."""

    def __init__(self, out: Path, resume: bool = False, restart: bool = False):
        self.path = out / "stages.json"
        self.resume, self.restart = resume, restart
        try:
            self.records = json.loads(self.path.read_text()) if self.path.exists() else {}
        except json.JSONDecodeError as err:
            raise UserError(f"corrupt {self.path} (line {err.lineno}): delete it to recompute every stage") from None
        self.seconds: dict[str, float] = {}  # per stage group ("distill", "evaluate", ...) in this call
        self.reused: dict[str, bool] = {}

    def _save(self, key: str, record: dict) -> None:
        self.records[key] = record
        write_json(self.records, self.path)

    def stage(self, key: str, inputs, fn: Callable[[bool], object], owns=(), needs=(), precious: bool = False) -> dict:
        """Run `fn(resume)` unless the finished record of `key` was made from the same inputs; return the record.

        `owns`: paths deleted before a fresh run; `needs`: files that must exist to reuse the record. The record
        keeps fn's JSON result and a version that the fingerprints of downstream stages include. `precious`: a
        stage too costly to redo unasked (experts, distillation): under `resume` a record made from other inputs
        is refused, naming the inputs that differ, unless the ledger was opened with `restart`.
        """
        fingerprint = digest(inputs)
        old = self.records.get(key, {})
        same = old.get("fingerprint") == fingerprint
        start = time.perf_counter()
        reused = same and old.get("done", False) and all(Path(p).exists() for p in needs)
        if precious and old and not same and self.resume and not self.restart:
            differ = changed_keys(old["inputs"], flat_keys(inputs)) if "inputs" in old else "not recorded"
            raise UserError(
                f"cannot resume stage {key!r} in {self.path.parent}: it was computed with other settings"
                f" ({differ}); undo the change, or start over with --restart"
            )
        if not reused:
            resume = self.resume and same and not self.restart
            # stale from here on, even if interrupted
            self._save(key, {"fingerprint": fingerprint, "done": False, "inputs": flat_keys(inputs)})
            if not resume:
                for path in owns:
                    _remove(Path(path))
            result = fn(resume)
            version = digest([fingerprint, time.time_ns()])
            self._save(
                key,
                {
                    "fingerprint": fingerprint,
                    "done": True,
                    "version": version,
                    "inputs": flat_keys(inputs),
                    "seconds": round(time.perf_counter() - start, 3),
                    "result": result,
                },
            )
        seconds = time.perf_counter() - start
        group = key.split()[0]
        self.seconds[group] = self.seconds.get(group, 0.0) + seconds
        self.reused[group] = self.reused.get(group, True) and reused
        logger.info("%-28s %8.1f s  %s", key, seconds, "reused" if reused else "done")
        return self.records[key]

    def timing(self) -> dict:
        """results.json's timing: seconds per stage in this call, and the stages that were all reused."""
        timing = {f"{s}_s": round(self.seconds[s], 3) for s in STAGES if s in self.seconds}
        timing["reused"] = [s for s in STAGES if self.reused.get(s)]
        return timing


@dataclass
class Study:
    """What the results rows of every command share: config, folder, ledger, prepared data and experts.

    A method name has one distillation folder and one stage key per output folder, so `run`, `ablate` and
    `bench quality` on the same folder reuse each other's rows (the preset's method, random, full)."""

    cfg: DictConfig
    out: Path
    ledger: Ledger
    bundle: Callable  # -> Prepared, built on first use (the feature cache makes it cheap)
    experts: str  # version of the experts stage
    budget: int | None = None  # bench budgets: this study's rows are one budget's, kept apart from the others

    def distill_dir(self, name: str) -> Path:
        if self.budget is not None:
            return self.out / f"budget-{self.budget}" / name
        if name == self.cfg.distill.method:
            return self.out / "distilled"
        return self.out / ("ablation" if name in ABLATION else "methods") / name

    def row(self, name: str) -> dict:
        """One results row, the same way for every command: distil an engine method (reused when unchanged),
        then evaluate it, a coreset or the full-data experts with one protocol and the same seeds.

        Returns the evaluation stage's record ("result": the results.json entry, "version")."""

        cfg, experts_dir = self.cfg, self.out / "experts"
        upstream = self.experts
        label = name if self.budget is None else f"{name}@{self.budget}"
        if name in METHODS:
            cfg = cfg if name == cfg.distill.method else with_method(cfg, name)
            target = self.distill_dir(name)
            needs = [target / "meta.json"] + [target / f"phase-{p}.safetensors" for p in range(len(plan_phases(cfg)))]
            # the keys that determine the distilled data (distill.checkpoint_every, evaluate.* ... do not)
            upstream = self.ledger.stage(
                f"distill {label}",
                {"config": distill_keys(cfg), "experts": upstream},
                lambda resume: distill(cfg, experts_dir, target, resume=resume),
                owns=[target],
                needs=needs,
                precious=True,
            )["version"]

        def evaluate(resume: bool) -> dict:
            if name == "full":
                return full_data_metrics(experts_dir)
            if name not in METHODS:
                return evaluate_coreset(cfg, self.bundle(), name, experts_dir, cfg.seed)
            phases = load_synthetic(target)
            _recall_curve(cfg, self.bundle(), target, phases)
            return evaluate_distilled(cfg, self.bundle(), phases)

        return self.ledger.stage(f"evaluate {label}", [name, _sections(cfg, "evaluate", "distill"), upstream], evaluate)


def _recall_curve(cfg, bundle, target: Path, phases: list[dict]) -> None:
    """target/recall_curve.json: r_mean (1 run) after the earlier phases plus an intermediate snapshot of a phase.

    Only when the distillation kept snapshots (snapshots/phase-<p>-<iteration>.safetensors); at most
    CURVE_POINTS per phase, spread over the iterations, so the curve stays a small part of the evaluation.
    """

    found: dict[int, list[tuple[int, Path]]] = {}
    for path in (target / "snapshots").glob("phase-*-*.safetensors"):
        _, phase, iteration = path.stem.split("-")
        found.setdefault(int(phase), []).append((int(iteration), path))
    if not found:
        return
    curve = []
    for phase, snapshots in sorted(found.items()):
        snapshots.sort()
        if len(snapshots) > CURVE_POINTS:
            snapshots = [snapshots[round(i * (len(snapshots) - 1) / (CURVE_POINTS - 1))] for i in range(CURVE_POINTS)]
        for iteration, path in snapshots:
            entry = evaluate_phases(cfg, bundle, phases[:phase] + [load_phase(path)], runs=1, seed=cfg.seed)
            curve.append({"phase": phase, "iteration": iteration, "r_mean": entry["r_mean"]})
            log_scalars(f"recall/{cfg.distill.method}/phase-{phase}", {"r_mean": entry["r_mean"]}, iteration)
    write_json(curve, target / "recall_curve.json")


def open_study(cfg, out: Path, resume: bool = False, restart: bool = False, budgets=()) -> Study:
    """The stages every command starts with: prepared data (feature cache), then the experts in out/experts.

    `budgets`: more configs whose budgets the data must hold (bench budgets), checked before the experts."""

    out.mkdir(parents=True, exist_ok=True)
    ledger = Ledger(out, resume, restart)
    bundle = functools.cache(functools.partial(prepare, cfg, verbose=True))
    prepared = ledger.stage("prepare", _sections(cfg, "data", "model"), lambda resume: {"seconds": bundle().seconds})
    # the coreset baselines and the methods without phases take the whole budget at once: checked before the experts
    for checked in [cfg, *budgets]:
        check_pairs(checked, bundle().splits["train"], whole_budget=True)
    experts = ledger.stage(
        "experts",
        {"config": _sections(cfg, "seed", "experts"), "prepared": prepared["version"]},
        # each expert file carries its own settings: a stale stage keeps the experts still valid (a changed
        # experts.count trains only the new ones) and replaces or deletes the rest
        lambda resume: train_experts(cfg, out / "experts", restart=not resume),
        needs=[out / "experts" / "summary.json"],
        precious=True,
    )
    return Study(cfg, out, ledger, bundle, experts["version"])


def _finish(study: Study, rows: dict[str, dict], key: str, outputs: list[Path], write: Callable[[dict], None]) -> dict:
    """Report stage `key` (reused when no row changed), then results.json with the timing of every stage."""

    cfg, out = study.cfg, study.out
    results = {
        "preset": cfg.name,
        "dataset": cfg.data.source,
        "pairs": total_pairs(cfg),
        "seed": cfg.seed,
        "methods": {name: row["result"] for name, row in rows.items()},
        "timing": study.ledger.timing(),
    }
    study.ledger.stage(
        key,
        [cfg.name, [row["version"] for row in rows.values()]],
        lambda resume: write(results),
        owns=outputs,
        needs=outputs,
    )
    results["timing"] = study.ledger.timing()
    write_json(results, out / "results.json")
    log_table(results["methods"])
    print(format_table(results["methods"]))
    logger.info("results: %s; report: %s", out / "results.json", outputs[0])
    return results


def _locked(command: Callable) -> Callable:
    """Hold the lock of the output folder (the command's second argument) while the command runs, so that a
    second command on the same folder stops at once instead of deleting the stages this one is running."""

    @functools.wraps(command)
    def locked(cfg, out, *args, **kwargs):
        with folder_lock(out):
            return command(cfg, out, *args, **kwargs)

    return locked


@_locked
def run(cfg, out: Path, resume: bool = False, restart: bool = False) -> dict:
    """prepare -> experts -> distill -> evaluate (the preset's method and baselines) -> report. `restart`: redo
    experts and distillations whose inputs changed, which `resume` refuses to do unasked."""
    out = Path(out)
    study = open_study(cfg, out, resume, restart)
    rows = {name: study.row(name) for name in dict.fromkeys([cfg.distill.method, *cfg.evaluate.baselines])}
    outputs = [out / "report.html", out / "report.md", out / "figures"]
    return _finish(study, rows, "report", outputs, lambda results: write_report(out, results))


def demo(out: Path = Path("runs/demo"), device: str | None = None) -> dict:
    """`run` on the embedded default (shapes-100: ptm-st vs a random coreset vs full data), with a summary."""
    start = time.perf_counter()
    cfg = load_config("shapes-100", [f"device={device}"] if device else [])
    results = run(cfg, Path(out))
    methods = results["methods"]
    distilled, random, full = (methods[m]["r_mean"] for m in (cfg.distill.method, "random", "full"))
    if random > 0 and full > 0:
        logger.info(
            "%s r_mean = %.1fx the random coreset's and %.2fx the full data's",
            cfg.distill.method,
            distilled / random,
            distilled / full,
        )
    logger.info("demo finished in %.0f s; open %s in a browser", time.perf_counter() - start, Path(out) / "report.html")
    return results


@_locked
def compare(cfg, out: Path, page: str, names, title: str) -> dict:
    """Every named method on the same experts, protocol and seeds: results.json + <page>.md + bar chart."""
    out = Path(out)
    study = open_study(cfg, out)
    rows = {name: study.row(name) for name in names}
    markdown, chart = out / f"{page}.md", out / f"{page}.png"
    return _finish(
        study,
        rows,
        f"report {page}",
        [markdown, chart],
        lambda results: write_table_report(markdown, title, results, chart),
    )


def ablate(cfg, out: Path) -> dict:
    """The paper's Table 4: PTM-ST with phases, shortcut and EMA switched on and off."""
    return compare(cfg, out, "ablation", ABLATION, f"Ablation of PTM-ST components ({cfg.name})")


def bench_quality(cfg, out: Path | None = None) -> dict:
    """All engine methods, coresets and the full data side by side; on a feature-space preset also PTM-ST on
    synthetic pixels through the same frozen encoder (`ptm-st+pixels`)."""
    out = Path(out) if out else Path("runs") / f"quality-{cfg.name}"
    names = list(QUALITY)
    if cfg.distill.space == "feature":
        names.insert(names.index("ptm-st+blend") + 1, "ptm-st+pixels")
    return compare(cfg, out, "quality", names, f"Quality benchmark ({cfg.name})")


@_locked
def bench_budgets(cfgs: list[DictConfig], out: Path) -> dict:
    """The methods and baselines of `bench quality` (QUALITY) at several budgets, one preset each (e.g.
    shapes-large-100/200/500), all trained on one set of experts: results.json, budgets.md (one table, r_mean vs
    budget, the paper's claims checked) and budgets.png."""
    out = Path(out)
    names = ", ".join(cfg.name for cfg in cfgs)
    shared = [_sections(cfg, "seed", "data", "model", "experts") for cfg in cfgs]
    if any(sections != shared[0] for sections in shared):
        raise UserError(f"bench budgets: {names} must share seed, data, model and experts (one set of experts)")
    if len({total_pairs(cfg) for cfg in cfgs}) < len(cfgs):
        raise UserError(f"bench budgets: {names} have budgets in common; give each budget once")
    cfgs = sorted(cfgs, key=total_pairs)
    study = open_study(cfgs[-1], out, budgets=cfgs[:-1])
    rows = {}
    for cfg in cfgs:
        at_budget = dataclasses.replace(study, cfg=cfg, budget=total_pairs(cfg))
        rows[str(total_pairs(cfg))] = {name: at_budget.row(name) for name in QUALITY}
    results = {
        "presets": [cfg.name for cfg in cfgs],
        "dataset": cfgs[0].data.source,
        "seed": cfgs[0].seed,
        "budgets": {pairs: {name: row["result"] for name, row in by_name.items()} for pairs, by_name in rows.items()},
    }
    markdown, chart = out / "budgets.md", out / "budgets.png"
    study.ledger.stage(
        "report budgets",
        [results["presets"], [row["version"] for by_name in rows.values() for row in by_name.values()]],
        lambda resume: write_budget_report(markdown, results, chart),
        owns=[markdown, chart],
        needs=[markdown, chart],
    )
    results["timing"] = study.ledger.timing()
    write_json(results, out / "results.json")
    print(markdown.read_text())
    logger.info("results: %s; report: %s", out / "results.json", markdown)
    return results
