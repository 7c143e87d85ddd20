"""Report: Markdown + self-contained HTML + figures from a hand-made results.json and a fake distilled folder."""

import html as html_module
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmdistill.evaluation.results import ablation_claims, budget_claims
from mmdistill.io import save_tensors
from mmdistill.report.document import (
    budget_table,
    markdown_table,
    write_budget_report,
    write_report,
    write_table_report,
)

METHODS = ("ptm-st", "random", "full")


def _entry(scale: float, std: float) -> dict:
    recalls = {
        k: scale * f for k, f in zip(("IR@1", "IR@5", "IR@10", "TR@1", "TR@5", "TR@10"), (0.4, 1.0, 1.4, 0.5, 1.1, 1.5))
    }
    return {
        **recalls,
        "r_mean": sum(recalls.values()) / 6,
        "r_mean_std": std,
        "std": {k: std for k in recalls},
        "runs": 2,
        "protocol": "val (selected on validation)",
    }


def _fake_phase(path: Path, pairs: int, gen: torch.Generator) -> None:
    sim = torch.eye(pairs) + 0.05 * torch.randn(pairs, pairs, generator=gen)
    save_tensors(
        {
            "images": torch.randn(pairs, 3, 8, 8, generator=gen),
            "texts": torch.randn(pairs, 16, generator=gen),
            "sim_full": sim,
            "lr_img": torch.tensor([0.1]),
            "lr_txt": torch.tensor([0.1]),
        },
        path,
        metadata={
            "mmdistill": json.dumps({"similarity": "full", "sim_alpha": 1.0, "pairs": pairs, "fingerprint": "fake"})
        },
    )  # distill.load_phase


@pytest.fixture
def run_dir(tmp_path):
    distilled = tmp_path / "distilled"
    distilled.mkdir()
    gen = torch.Generator().manual_seed(0)
    history = []
    for phase in range(2):
        _fake_phase(distilled / f"phase-{phase}.safetensors", 6, gen)
        Image.new("RGB", (48, 24), (200, 40, 40)).save(distilled / f"phase-{phase}-images.png")
        Image.new("RGB", (48, 24), (40, 40, 200)).save(distilled / f"phase-{phase}-initial-images.png")
        captions = [{"caption": f"a red circle {i}", "caption_id": i, "similarity": 0.9} for i in range(6)]
        (distilled / f"phase-{phase}-captions.json").write_text(json.dumps(captions))
        history += [
            {"phase": phase, "iteration": i, "loss": 1.0 / (i + 1), "lr_img": 0.1, "lr_txt": 0.1, "seconds": 0.1}
            for i in range(30)
        ]
        history.append({"phase": phase, "event": "recovery", "iteration": 3})
    (distilled / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    meta = {"method": "ptm-st", "fingerprint": "fake", "planned_phases": 2, "phases": [{"pairs": 6}] * 2}
    (distilled / "meta.json").write_text(json.dumps(meta))  # distill.load_synthetic checks the phases against it
    write_report(tmp_path, _results())
    return tmp_path


def _results() -> dict:
    return {
        "preset": "shapes-tiny",
        "dataset": "shapes",
        "pairs": 12,
        "seed": 0,
        "methods": {"ptm-st": _entry(30, 1.0), "random": {**_entry(15, 0.5), "lr": 0.03}, "full": _entry(45, 0.2)},
        "timing": {"prepare_s": 1.0, "experts_s": 2.0, "distill_s": 3.0, "evaluate_s": 4.0, "reused": ["prepare"]},
    }


def test_report_writes_markdown_html_and_figures(run_dir):
    figures = {p.name for p in (run_dir / "figures").glob("*.png")}
    assert {
        "methods.png",
        "loss.png",
        "similarity.png",
        "timing.png",
        "phase-0-images.png",
        "phase-1-images.png",
        "phase-0-initial-images.png",
        "phase-1-initial-images.png",
    } <= figures
    assert "recall.png" not in figures  # no recall_curve.json: no plot, and the report says so
    md = (run_dir / "report.md").read_text()
    assert "# mmdistill report: shapes-tiny" in md and "not available" in md
    assert "a red circle 0" in md and "figures/loss.png" in md
    assert "best on validation (random 0.03)" in md  # the coreset's selected lr is stated
    for name in METHODS:
        assert f"| {name} |" in md


def test_html_is_self_contained_and_lists_every_method(run_dir):
    html = (run_dir / "report.html").read_text()
    assert not re.search(r"https?://", html)
    sources = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "url(" not in html and "@import" not in html
    for name in METHODS:
        assert f"{name}</th>" in html


def test_best_cell_is_bold_and_full_data_is_not_ranked():
    table = markdown_table(_results()["methods"])
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()[2:]}
    assert rows["ptm-st"].count("**") == 2 * 7 and "**" not in rows["random"] and "**" not in rows["full"]
    assert "30.0 ± 1.0" in rows["ptm-st"]


def test_diverged_and_broken_down_runs_are_counted_in_the_tables(tmp_path):
    results = _results()
    results["methods"]["ptm-st"]["diverged"] = 1
    results["methods"]["random"]["broke_down"] = 1
    rows = {line.split("|")[1].strip(): line for line in markdown_table(results["methods"]).splitlines()[2:]}
    assert rows["ptm-st"].endswith("| 2 (1 diverged) |  |") and rows["random"].endswith("| 2 (1 broke down) |  |")
    write_report(tmp_path, results)
    page = (tmp_path / "report.html").read_text()
    assert "<td>2 (1 diverged)</td>" in page and "<td>2 (1 broke down)</td>" in page


def _r_mean(value: float) -> dict:
    return {**_entry(1.0, 0.5), "r_mean": value}


def _budgets(ptm: tuple, lors: tuple) -> dict:
    return {
        str(pairs): {"ptm-st": _r_mean(p), "lors": _r_mean(q), "random": _r_mean(5.0), "kcenter": _r_mean(7.0)}
        for pairs, p, q in zip((100, 200, 500), ptm, lors)
    }


def test_budget_claims_hold_only_when_ptm_st_grows_and_stays_ahead():
    good = budget_claims(_budgets((20.0, 25.0, 30.0), (18.0, 22.0, 26.0)))
    assert good[0] == "ptm-st grows with the budget, 20.0 (100) < 25.0 (200) < 30.0 (500): holds"
    assert good[1] == "ptm-st above lors at every budget, by +2.0 (100), +3.0 (200), +4.0 (500): holds"
    assert good[2] == (
        "ptm-st above the best coreset at every budget, by +13.0 (100, kcenter), +18.0 (200, kcenter),"
        " +23.0 (500, kcenter): holds"
    )
    bad = budget_claims(_budgets((20.0, 25.0, 24.0), (18.0, 26.0, 20.0)))
    assert bad[0].endswith("DOES NOT HOLD") and bad[1].endswith("DOES NOT HOLD")
    overtaken = _budgets((20.0, 25.0, 30.0), (18.0, 22.0, 26.0))
    overtaken["500"]["random"] = _r_mean(31.0)  # the best coreset changes with the budget: each is checked
    assert budget_claims(overtaken)[2].endswith(
        "+13.0 (100, kcenter), +18.0 (200, kcenter), -1.0 (500, random): DOES NOT HOLD"
    )


def test_ablation_claims_check_the_paper_s_table_4_ordering():
    methods = {name: _r_mean(value) for name, value in [("base", 10), ("ema", 12), ("ptm", 11), ("st", 13)]}
    assert ablation_claims(methods) == []  # without ptm+st+ema there is no claim to check
    methods["ptm+st+ema"] = _r_mean(12.5)
    claims = ablation_claims(methods)
    assert len(claims) == 6
    assert [c for c in claims if c.endswith("DOES NOT HOLD")] == ["ptm+st+ema 12.5 >= st 13.0: DOES NOT HOLD"]


def test_budget_page_has_the_table_the_claims_and_the_figure(tmp_path):
    budgets = _budgets((20.0, 25.0, 30.0), (18.0, 22.0, 26.0))
    table = budget_table(budgets)
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()[2:]}
    assert table.splitlines()[0] == "| method | 100 pairs | 200 pairs | 500 pairs |"
    assert rows["ptm-st"] == "| ptm-st | 20.0 ± 0.5 | 25.0 ± 0.5 | 30.0 ± 0.5 |"
    assert rows["best coreset"] == "| best coreset | 7.0 ± 0.5 (kcenter) | 7.0 ± 0.5 (kcenter) | 7.0 ± 0.5 (kcenter) |"
    results = {"presets": ["s-100", "s-200", "s-500"], "dataset": "shapes", "seed": 0, "budgets": budgets}
    write_budget_report(tmp_path / "budgets.md", results, tmp_path / "budgets.png")
    page = (tmp_path / "budgets.md").read_text()
    assert table in page and "## The paper's claims" in page and "## 500 pairs (s-500)" in page
    assert Image.open(tmp_path / "budgets.png").size[0] > 300


def test_ablation_page_states_the_paper_s_ordering(tmp_path):
    names = ("base", "ema", "ptm", "st", "ptm+ema", "st+ema", "ptm+st", "ptm+st+ema")
    results = {"preset": "p", "dataset": "shapes", "pairs": 500, "seed": 0}
    results["methods"] = {name: _r_mean(10.0 + i) for i, name in enumerate(names)}
    write_table_report(tmp_path / "ablation.md", "Ablation", results, tmp_path / "ablation.png")
    page = (tmp_path / "ablation.md").read_text()
    assert "- ptm+st+ema 17.0 >= ema 11.0: holds" in page and "- st 13.0 >= base 10.0: holds" in page


def test_recall_curve_is_plotted_when_the_pipeline_measured_it(run_dir):
    curve = [{"phase": p, "iteration": i, "r_mean": 10.0 + p + i / 10} for p in range(2) for i in (0, 10, 29)]
    (run_dir / "distilled" / "recall_curve.json").write_text(json.dumps(curve))
    write_report(run_dir, _results())
    assert (run_dir / "figures" / "recall.png").exists()
    assert "not available" not in (run_dir / "report.md").read_text()


# What the browser sees: a wrapper page loads the report in a frame and writes what it finds into its own DOM, which
# `--dump-dom` prints once the page (and every image in it) has loaded.
_PROBE = """<!doctype html><html><body><pre id="probe">loading</pre>
<iframe id="report" src="report.html" style="width:1280px;height:1600px"></iframe>
<script>
document.getElementById("report").addEventListener("load", () => {
  const doc = document.getElementById("report").contentDocument;
  const images = [...doc.images];
  document.getElementById("probe").textContent = JSON.stringify({
    headings: [...doc.querySelectorAll("h1, h2")].map(h => h.textContent),
    methods: [...doc.querySelectorAll("table.results tbody tr th, table.results tbody tr td:first-child")]
      .map(cell => cell.textContent),
    images: images.map(i => ({alt: i.alt, width: i.naturalWidth, shown: i.getBoundingClientRect().width})),
    text: doc.body.innerText});
});
</script></body></html>"""

_CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _chromium(profile: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["chromium", *_CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )


def _probe(folder: Path, profile: str) -> subprocess.CompletedProcess:
    """Load `folder`/report.html in the probe page. `--enable-logging=stderr --v=0` is what makes Chromium write
    the pages' console messages to stderr (without it a console.error leaves no trace there)."""
    (folder / "probe.html").write_text(_PROBE)
    return _chromium(
        profile,
        "--allow-file-access-from-files",
        "--enable-logging=stderr",
        "--v=0",
        "--virtual-time-budget=10000",
        "--dump-dom",
        (folder / "probe.html").as_uri(),
    )


def _console_errors(stderr: str) -> list[str]:
    """The lines of a probe's stderr that report a console message or an uncaught exception of the pages, e.g.
    `[...:INFO:CONSOLE:1] "Uncaught Error: bang", source: file:///.../report.html (1)`."""
    return [line for line in stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]


_NEEDS_CHROMIUM = pytest.mark.skipif(
    shutil.which("chromium") is None,
    reason="Debian's chromium is not installed: `make setup` installs it when it runs as root or with sudo",
)


@pytest.mark.slow
@_NEEDS_CHROMIUM
def test_html_renders_in_headless_chromium(run_dir):
    with tempfile.TemporaryDirectory() as profile:
        probe = _probe(run_dir, profile)
        shown = json.loads(html_module.unescape(re.search(r'<pre id="probe">(.*?)</pre>', probe.stdout, re.S)[1]))
        screenshot = run_dir / "screenshot.png"
        _chromium(profile, f"--screenshot={screenshot}", "--window-size=1280,1600", (run_dir / "report.html").as_uri())
    assert not _console_errors(probe.stderr)
    assert shown["headings"][0] == "mmdistill report: shapes-tiny"
    assert set(METHODS) <= {m.strip() for m in shown["methods"]}  # the results table, one row per method
    assert "30.0 ± 1.0" in shown["text"]
    images = {i["alt"]: i for i in shown["images"]}
    assert len(images) >= 6 and all(i["width"] > 0 and i["shown"] > 0 for i in images.values())  # decoded, on screen
    grids = [alt for alt in images if alt.startswith("Synthetic images of phase")]
    assert len(grids) == 2  # one grid of synthetic images per phase
    starts = [alt for alt in images if alt.startswith("The images phase")]
    assert len(starts) == 2  # beside each, the images the phase started from
    assert any("similarity" in alt.lower() for alt in images)
    image = Image.open(screenshot).convert("L")
    assert image.size == (1280, 1600)
    low, high = image.getextrema()
    assert high - low > 100  # text and figures on the page, not a blank screen


@pytest.mark.slow
@_NEEDS_CHROMIUM
def test_the_console_check_catches_a_page_error(tmp_path):
    """The check above can fail: a report that logs an error and throws one is caught through the same probe."""
    (tmp_path / "report.html").write_text(
        '<!doctype html><html><body><p>page</p><script>console.error("boom")</script>'
        '<script>throw new Error("bang")</script></body></html>'
    )
    with tempfile.TemporaryDirectory() as profile:
        errors = _console_errors(_probe(tmp_path, profile).stderr)
    assert any('"boom"' in line for line in errors)
    assert any("Uncaught Error: bang" in line for line in errors)
