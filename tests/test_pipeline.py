"""Pipeline: stage reuse and resume (Ledger), and a shapes-tiny `run` end to end, reused, then partly rerun."""

import json
import logging
import shutil

import pytest
from omegaconf import OmegaConf

from mmdistill import pipeline
from mmdistill.bench.cross_arch import STUDENTS, cross_arch_table, pixel_method, run_cross_arch
from mmdistill.config import load_config
from mmdistill.errors import UserError
from mmdistill.model import build_model
from mmdistill.pipeline import STAGES, Ledger, run
from mmdistill.tracking import tracking

pytestmark = pytest.mark.slow  # whole runs of the pipeline on the tiny preset

METRIC_KEYS = {"IR@1", "IR@5", "IR@10", "TR@1", "TR@5", "TR@10", "r_mean", "r_mean_std", "runs"}


# -- Ledger ----------------------------------------------------------------------------------------------
def _counting_stage(ledger, key, inputs, output, calls, upstream=()):
    def fn(resume):
        calls.append((key, resume))
        output.write_text("x")
        return {"value": len(calls)}

    return ledger.stage(key, [inputs, *upstream], fn, owns=[output], needs=[output])


def test_ledger_reuses_finished_stages_and_reruns_downstream_of_a_change(tmp_path):
    calls = []
    for inputs in ({"a": 1}, {"a": 1}, {"a": 2}):
        ledger = Ledger(tmp_path)
        up = _counting_stage(ledger, "experts", inputs, tmp_path / "up.txt", calls)
        _counting_stage(ledger, "distill", {"b": 1}, tmp_path / "down.txt", calls, [up["version"]])
    # first call runs both, second reuses both, a changed upstream input reruns both
    assert [key for key, _ in calls] == ["experts", "distill", "experts", "distill"]
    assert ledger.timing()["reused"] == []
    assert set(ledger.timing()) == {"experts_s", "distill_s", "reused"}


def test_ledger_reruns_a_stage_whose_outputs_are_gone_and_everything_downstream(tmp_path):
    calls = []
    for _ in range(2):
        ledger = Ledger(tmp_path)
        up = _counting_stage(ledger, "experts", {}, tmp_path / "up.txt", calls)
        _counting_stage(ledger, "distill", {}, tmp_path / "down.txt", calls, [up["version"]])
        (tmp_path / "up.txt").unlink()
    assert [key for key, _ in calls] == ["experts", "distill"] * 2


def test_ledger_deletes_stale_outputs_unless_resuming_an_unfinished_stage(tmp_path):
    seen = []

    def fn(resume):
        seen.append((resume, (tmp_path / "stale").exists()))

    (tmp_path / "stale").mkdir()
    Ledger(tmp_path).stage("distill", {"x": 1}, fn, owns=[tmp_path / "stale"])
    interrupted = json.loads((tmp_path / "stages.json").read_text())
    interrupted["distill"]["done"] = False
    (tmp_path / "stages.json").write_text(json.dumps(interrupted))
    (tmp_path / "stale").mkdir()
    Ledger(tmp_path, resume=True).stage("distill", {"x": 1}, fn, owns=[tmp_path / "stale"])
    Ledger(tmp_path, resume=True).stage("distill", {"x": 2}, fn, owns=[tmp_path / "stale"])
    assert seen == [(False, False), (True, True), (False, False)]


# -- shapes-tiny end to end ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    out = tmp_path_factory.mktemp("run")
    cfg = load_config("shapes-tiny", [f"cache_dir={cache}", "device=cpu"])
    with tracking(RecordingSink()):
        results = run(cfg, out)
    return cfg, cache, out, results


class RecordingSink:
    """A metrics sink that keeps what the stages send (the first run of the `tiny` fixture)."""

    scalars_seen: list[tuple[str, dict, int]] = []
    closed = False

    def scalars(self, group, values, step):
        self.scalars_seen.append((group, values, step))

    def close(self):
        RecordingSink.closed = True


def test_run_sends_loss_lrs_recalls_and_the_table_to_the_sink(tiny):
    cfg, _, _, results = tiny
    seen = RecordingSink.scalars_seen
    groups = {group for group, _, _ in seen}
    assert {
        "distill/ptm-st/phase-0",
        "distill/ptm-st/phase-1",
        "experts/expert-0",
        "experts/expert-1",
        "results/ptm-st",
        "results/random",
        "results/full",
    } <= groups
    distill = [(values, step) for group, values, step in seen if group == "distill/ptm-st/phase-0"]
    assert [step for _, step in distill] == list(range(cfg.distill.phases[0].iterations))
    assert all(set(values) == {"loss", "lr_img", "lr_txt"} for values, _ in distill)
    assert [step for group, _, step in seen if group == "experts/expert-0"] == list(range(1, cfg.experts.epochs + 1))
    table = next(values for group, values, _ in seen if group == "results/ptm-st")
    assert table["r_mean"] == results["methods"]["ptm-st"]["r_mean"]
    assert any(group.startswith("recall/ptm-st/") for group in groups)  # the recall-curve snapshots
    assert RecordingSink.closed


def test_run_writes_every_output(tiny):
    cfg, _, out, results = tiny
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == results
    assert set(results) == {"preset", "dataset", "pairs", "seed", "methods", "timing"}
    assert [results[k] for k in ("preset", "dataset", "pairs", "seed")] == ["shapes-tiny", "shapes", 20, 0]
    assert list(results["methods"]) == ["ptm-st", "random", "full"]
    for entry in results["methods"].values():
        assert set(entry) >= METRIC_KEYS
        assert 0.0 <= entry["r_mean"] <= 100.0
    assert results["methods"]["ptm-st"]["runs"] == cfg.evaluate.runs
    assert {f"{s}_s" for s in STAGES} <= set(results["timing"]) and results["timing"]["reused"] == []

    assert (out / "experts" / "summary.json").exists() and list((out / "experts").glob("expert-*.safetensors"))
    distilled = out / "distilled"
    for p in range(2):
        assert (distilled / f"phase-{p}.safetensors").exists()
    assert (distilled / "meta.json").exists() and (distilled / "history.jsonl").exists()
    assert (distilled / "checkpoints").is_dir()  # per-phase checkpoints are deleted once a phase is saved
    assert (out / "report.md").exists() and (out / "report.html").exists()
    assert {"methods.png", "loss.png", "timing.png"} <= {p.name for p in (out / "figures").glob("*.png")}
    html = (out / "report.html").read_text()
    assert all(name in html for name in results["methods"]) and "https://" not in html


def test_second_run_reuses_every_stage(tiny, caplog):
    cfg, _, out, first = tiny
    with caplog.at_level(logging.INFO, logger="mmdistill"):
        again = run(cfg, out)
    assert again["timing"]["reused"] == list(STAGES)
    assert again["methods"] == first["methods"]
    assert sum(again["timing"][f"{s}_s"] for s in STAGES) < 10
    assert caplog.text.count("reused") >= len(STAGES)  # one line per stage


def test_changed_distill_key_reruns_distill_evaluate_and_report_only(tiny, tmp_path):
    _, cache, out, first = tiny
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    experts = {p.name: p.stat().st_mtime_ns for p in (copy / "experts").iterdir()}
    cfg = load_config("shapes-tiny", [f"cache_dir={cache}", "device=cpu", "distill.syn_steps=2"])
    results = run(cfg, copy)
    assert results["timing"]["reused"] == ["prepare", "experts"]
    assert {p.name: p.stat().st_mtime_ns for p in (copy / "experts").iterdir()} == experts
    assert json.loads((copy / "distilled" / "meta.json").read_text())["config"]["distill"]["syn_steps"] == 2


def test_a_changed_expert_count_keeps_the_trained_experts_and_drops_the_extra_ones(tiny, tmp_path, trained_indices):
    _, cache, out, _ = tiny
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    kept = {p.name: p.read_bytes() for p in (copy / "experts").glob("expert-*.safetensors")}
    assert len(kept) == 2

    def with_count(count):
        return load_config("shapes-tiny", [f"cache_dir={cache}", "device=cpu", f"experts.count={count}"])

    pipeline.open_study(with_count(3), copy)
    assert trained_indices == [2]  # only the new one; the two finished ones of the same settings are kept as is
    assert {p.name: p.read_bytes() for p in (copy / "experts").glob("expert-000[01].safetensors")} == kept
    assert json.loads((copy / "experts" / "summary.json").read_text())["experts"] == 3
    pipeline.open_study(with_count(1), copy)  # distillation reads every file in the folder: the extras must go
    assert trained_indices == [2]
    assert sorted(p.name for p in (copy / "experts").glob("expert-*")) == ["expert-0000.safetensors"]
    shutil.copy(copy / "experts" / "expert-0000.safetensors", copy / "experts" / "expert-0001.safetensors")
    with pytest.raises(UserError, match=r"expert-0001.safetensors is beyond experts.count=1 .*--restart"):
        pipeline.train_experts(with_count(1), copy / "experts")  # the `experts` command without --restart


def test_recall_curve_evaluates_the_snapshots_the_engine_kept(tiny):
    """shapes-tiny keeps the EMA state every 2 iterations: the run evaluates them and plots recall vs iteration."""
    _, _, out, _ = tiny
    kept = sorted(p.name for p in (out / "distilled" / "snapshots").iterdir())
    assert kept == ["phase-0-2.safetensors", "phase-0-4.safetensors", "phase-1-2.safetensors", "phase-1-4.safetensors"]
    curve = json.loads((out / "distilled" / "recall_curve.json").read_text())
    assert [(c["phase"], c["iteration"]) for c in curve] == [(0, 2), (0, 4), (1, 2), (1, 4)]
    assert all(0.0 <= c["r_mean"] <= 100.0 for c in curve)
    assert (out / "figures" / "recall.png").exists()


def test_progress_bar_postfix_redraws_only_after_mininterval():
    """set_postfix on a plain tqdm redraws every call (a line per batch in a log file); ours waits for
    mininterval like update does. A disabled bar (another torchrun rank's) takes set_postfix too."""
    import io

    from mmdistill.utils import progress_bar

    out = io.StringIO()
    with progress_bar(total=100, file=out, mininterval=3600) as bar:
        for step in range(100):
            bar.set_postfix(loss=f"{step:.3f}")
            bar.update(1)
    assert out.getvalue().count("\r") <= 3  # first draw and close
    with progress_bar(total=2, disable=True) as bar:
        bar.set_postfix(loss="1")


def test_cross_arch_trains_other_students_on_the_run_s_images_beside_a_random_coreset(tiny, capsys):
    """The run's distilled images (reused, not distilled again) under two ConvNets unlike the distilling one."""
    cfg, _, out, results = tiny
    students = {
        "convnet depth 1 width 4, scratch": {"image_encoder": "convnet", "convnet": {"depth": 1, "width": 4}},
        "convnet depth 2 width 6, batchnorm": {"convnet": {"depth": 2, "width": 6, "norm": "batchnorm"}},
    }
    cross = run_cross_arch(cfg, out, students)
    assert "distill ptm-st" in json.loads((out / "stages.json").read_text())  # the run's stage, reused
    assert cross["method"] == pixel_method(cfg) == "ptm-st" and list(cross["students"]) == list(students)
    for row in cross["students"].values():
        ours, random = row["ptm-st"], row["random"]
        assert set(ours["val_r_mean_by_lr"]) == {"own", *map(str, cfg.evaluate.coreset_lrs)}
        assert set(random["val_r_mean_by_lr"]) == set(map(str, cfg.evaluate.coreset_lrs))
        for entry in (ours, random):
            assert 0 <= entry["r_mean"] <= 100 and entry["runs"] == cfg.evaluate.runs
            best = max(entry["val_r_mean_by_lr"], key=entry["val_r_mean_by_lr"].get)
            assert ("own" if entry["lr"] is None else str(entry["lr"])) == best
    assert json.loads((out / "cross-arch.json").read_text()) == cross
    table = cross_arch_table(cross)
    assert all(f"| {name} |" in table for name in students) and table in (out / "cross-arch.md").read_text()
    assert capsys.readouterr().out.rstrip().endswith(table)  # the command prints the table last
    page = (out / "report.html").read_text()  # the run's report gains the table
    assert "<h2>Cross-architecture transfer</h2>" in page and all(f"<td>{name}</td>" in page for name in students)
    assert "## Cross-architecture transfer" in (out / "report.md").read_text()


def test_the_cross_arch_table_counts_unstable_runs():
    entry = {"r_mean": 20.0, "r_mean_std": 1.0, "lr": None, "diverged": 0, "broke_down": 1}
    results = {"method": "ptm-st", "distilled_with": "convnet", "pairs": 10}
    results["students"] = {"resnet": {"ptm-st": entry, "random": {**entry, "r_mean": 8.0, "lr": 0.1, "broke_down": 0}}}
    assert cross_arch_table(results).endswith("| resnet | 20.0 ± 1.0 (1 broke down) | own | 8.0 ± 1.0 | 0.1 | 2.50x |")


def test_the_cross_arch_students_build_offline_and_read_pixels():
    import torch

    cfg = load_config("shapes-100")
    assert pixel_method(cfg) == "ptm-st+pixels"  # a feature-space preset distils pixels for the transfer table
    for name, overrides in STUDENTS.items():
        model = build_model(OmegaConf.merge(cfg.model, overrides), text_dim=384, image_size=32, seed=0)
        logits = model(torch.randn(2, 3, 32, 32), torch.randn(2, 384))
        assert logits.shape == (2, 2) and torch.isfinite(logits).all(), name
        # at the preset's own size the text projection stays small enough to train on a CPU (a 16,384-d joint
        # embedding made it a 268M-weight layer)
        model = build_model(OmegaConf.merge(cfg.model, overrides), text_dim=384, image_size=64, seed=0)
        assert sum(p.numel() for p in model.text_projection.parameters()) < 20_000_000, name


# -- bench budgets ---------------------------------------------------------------------------------------
def test_bench_budgets_trains_one_set_of_experts_for_every_budget(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "QUALITY", ("ptm-st", "lors", "random", "full"))
    common = [f"cache_dir={tmp_path / 'cache'}", "device=cpu", "evaluate.runs=1"]
    one_phase = "distill.phases=[{pairs: 10, iterations: 3, start_epochs: [0, 1], shortcut_end: 2}]"
    cfgs = [load_config("shapes-tiny", common), load_config("shapes-tiny", [*common, one_phase])]  # 20 and 10
    out = tmp_path / "budgets"
    results = pipeline.bench_budgets(cfgs, out)

    assert list(results["budgets"]) == ["10", "20"]  # sorted by budget
    assert all(list(methods) == ["ptm-st", "lors", "random", "full"] for methods in results["budgets"].values())
    stages = json.loads((out / "stages.json").read_text())
    assert [key for key in stages if key.startswith("experts")] == ["experts"]
    assert {"distill ptm-st@10", "distill ptm-st@20", "distill lors@10", "evaluate random@20"} <= set(stages)
    assert (out / "budget-10/ptm-st/phase-0.safetensors").exists()
    assert not (out / "budget-10/ptm-st/phase-1.safetensors").exists()  # 10 pairs: one phase
    assert (out / "budget-20/ptm-st/phase-1.safetensors").exists()
    page = (out / "budgets.md").read_text()
    assert "| method | 10 pairs | 20 pairs |" in page and "| best coreset |" in page
    assert "ptm-st grows with the budget" in page and (out / "budgets.png").stat().st_size > 0
    assert json.loads((out / "results.json").read_text()) == results

    again = pipeline.bench_budgets(cfgs, out)  # every stage reused
    assert set(again["timing"]["reused"]) >= {"prepare", "experts", "distill", "evaluate"}
    assert again["budgets"] == results["budgets"]


def test_bench_budgets_refuses_budgets_that_cannot_share_experts(tmp_path):
    common = [f"cache_dir={tmp_path / 'cache'}", "device=cpu"]
    cfgs = [load_config("shapes-tiny", common), load_config("shapes-tiny", [*common, "experts.epochs=4"])]
    with pytest.raises(UserError, match="must share seed, data, model and experts"):
        pipeline.bench_budgets(cfgs, tmp_path / "out")
    with pytest.raises(UserError, match="budgets in common"):
        pipeline.bench_budgets([cfgs[0], cfgs[0]], tmp_path / "out")
    assert not (tmp_path / "out" / "experts").exists()  # refused before any work
