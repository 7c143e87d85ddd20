"""Reports: results tables (Markdown, HTML) and the figures of a run.

`write_report(run_dir, results)` reads what the stages left in `run_dir` (distilled/history.jsonl, the phase
files, image grids and captions, an optional recall curve, `bench cross-arch`'s cross-arch.json) and writes
`report.md`, a self-contained `report.html` (figures inlined as base64 PNG, CSS inline, nothing fetched) and the
PNGs in `figures/`. Plots that need missing inputs are left out and the report says why.
"""

from __future__ import annotations

import base64
import html
import json
import shutil
from pathlib import Path

import torch

from mmdistill.evaluation.results import (
    METRICS,
    REFERENCE,
    ablation_claims,
    best_coreset,
    budget_claims,
    failure_notes,
    mean_std,
    method_status,
    unstable_runs,
)
from mmdistill.io import write_text
from mmdistill.report.figures import (
    budget_lines,
    colour,
    loss_curve,
    method_bars,
    recall_curve,
    similarity_maps,
    timing_bars,
)
from mmdistill.similarity import full_matrix
from mmdistill.synthetic import load_synthetic, read_captions, read_meta

STAGES = ("prepare", "experts", "distill", "evaluate", "report")  # results.json timing keys, in pipeline order

CAPTION_ROWS = 12


def _cell(entry: dict, metric: str) -> str:
    mean, std = mean_std(entry, metric)
    return f"{mean:.1f}" if std is None else f"{mean:.1f} ± {std:.1f}"


def best_methods(methods: dict) -> dict[str, set[str]]:
    """Per metric, the method(s) with the highest mean, the full-data reference excluded."""
    best = {}
    for metric in METRICS:
        scores = {name: entry[metric] for name, entry in methods.items() if name != REFERENCE}
        top = max(scores.values(), default=None)
        best[metric] = {name for name, score in scores.items() if score == top}
    return best


def _runs(entry: dict) -> str:
    """The runs cell, with the runs that diverged or broke down counted in it."""
    unstable = unstable_runs(entry)
    return f"{entry.get('runs', '')} ({unstable})" if unstable else f"{entry.get('runs', '')}"


def markdown_table(methods: dict) -> str:
    """Mean ± std per metric, best per column (full data excluded) in bold."""
    best = best_methods(methods)
    lines = ["| method | " + " | ".join(METRICS) + " | runs | status |", "|---" * (len(METRICS) + 3) + "|"]
    for name, entry in methods.items():
        cells = [f"**{_cell(entry, m)}**" if name in best[m] else _cell(entry, m) for m in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_runs(entry)} | {method_status(entry, methods)} |")
    return "\n".join(lines)


def _html_table(methods: dict) -> str:
    best = best_methods(methods)
    head = "".join(f"<th>{m}</th>" for m in METRICS)
    rows = []
    for name, entry in methods.items():
        cells = "".join(
            f'<td class="best">{_cell(entry, m)}</td>' if name in best[m] else f"<td>{_cell(entry, m)}</td>"
            for m in METRICS
        )
        swatch = f'<span class="swatch" style="background:{colour(name)}"></span>'
        css = ' class="reference"' if name == REFERENCE else ""
        status = method_status(entry, methods)
        status_cell = f'<td class="failed">{status}</td>' if status else "<td></td>"
        rows.append(f"<tr{css}><th>{swatch}{html.escape(name)}</th>{cells}<td>{_runs(entry)}</td>{status_cell}</tr>")
    return (
        f'<table class="results"><thead><tr><th>method</th>{head}<th>runs</th><th>status</th></tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _timing_rows(results: dict) -> list[tuple[str, float, bool]]:
    timing = results.get("timing", {})
    reused = set(timing.get("reused", []))
    return [(s, timing[f"{s}_s"], s in reused) for s in STAGES if f"{s}_s" in timing]


# ---------------------------------------------------------------------------------------------- figures


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _phase_files(distilled: Path) -> list[int]:
    return sorted(int(p.stem.split("-")[1]) for p in distilled.glob("phase-*.safetensors"))


def _captions(path: Path) -> list[list]:
    """Rows [#, nearest real caption, cosine] for the first synthetic texts ({"caption", "similarity"} records)."""

    items = (read_captions(path) or [])[:CAPTION_ROWS]
    return [[i, item["caption"], f"{item['similarity']:.2f}"] for i, item in enumerate(items)]


def _similarities(distilled: Path) -> list[torch.Tensor]:
    """The learned S of each phase; empty when the method learns none (identity)."""

    phases = load_synthetic(distilled)
    if not phases or phases[0]["similarity"] == "identity":
        return []
    return [full_matrix(p["similarity"], p, len(p["images"]), p["sim_alpha"]).float() for p in phases]


class _Document:
    """Collects the report's sections once and renders them as Markdown and as HTML."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.md: list[str] = []
        self.html: list[str] = []

    def heading(self, text: str, level: int = 2) -> None:
        self.md.append(f"{'#' * level} {text}\n")
        self.html.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def note(self, text: str) -> None:
        self.md.append(f"{text}\n")
        self.html.append(f'<p class="note">{html.escape(text)}</p>')

    def figure(self, path: Path, caption: str, css_class: str = "plot") -> None:
        relative = path.relative_to(self.run_dir).as_posix()
        data = base64.b64encode(path.read_bytes()).decode()
        self.md.append(f"![{caption}]({relative})\n\n*{caption}*\n")
        self.html.append(
            f'<figure class="{css_class}"><img alt="{html.escape(caption)}"'
            f' src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )

    def raw(self, markdown: str, html_text: str) -> None:
        self.md.append(markdown + "\n")
        self.html.append(html_text)

    def table(self, header: list[str], rows: list[list], css_class: str) -> None:
        """A plain table of text cells (escaped in HTML, pipes replaced in Markdown)."""

        def md_row(cells):
            return "| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |"

        def html_row(cells, tag):
            return "<tr>" + "".join(f"<{tag}>{html.escape(str(c))}</{tag}>" for c in cells) + "</tr>"

        self.md.append("\n".join([md_row(header), md_row(["---"] * len(header))] + [md_row(r) for r in rows]) + "\n")
        self.html.append(
            f'<table class="{css_class}"><thead>{html_row(header, "th")}</thead><tbody>'
            + "".join(html_row(r, "td") for r in rows)
            + "</tbody></table>"
        )

    def begin(self, css_class: str) -> None:
        """Lay out what follows side by side in the HTML (until `end`); Markdown stays linear."""
        self.html.append(f'<div class="{css_class}">')

    def end(self) -> None:
        self.html.append("</div>")


def cross_arch_caption(results: dict) -> str:
    """What the cross-architecture table (`bench cross-arch`'s cross-arch.json) shows."""
    return (
        f"Images distilled by {results['method']} through {results['distilled_with']} ({results['pairs']} pairs),"
        " trained on by each student; r_mean on test, mean ± std over the runs, each set at the lr its students"
        " score best on validation."
    )


def cross_arch_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """The cross-architecture table's header and one row per student: the distilled set and the random coreset,
    each with the runs that diverged or broke down, where any did, and their ratio."""

    def cell(entry: dict) -> str:
        unstable = unstable_runs(entry)
        return f"{entry['r_mean']:.1f} ± {entry['r_mean_std']:.1f}" + (f" ({unstable})" if unstable else "")

    method = results["method"]
    rows = []
    for name, row in results["students"].items():
        ours, random = row[method], row["random"]
        ratio = f"{ours['r_mean'] / random['r_mean']:.2f}x" if random["r_mean"] > 0 else "-"
        rows.append([name, cell(ours), str(ours["lr"] or "own"), cell(random), str(random["lr"]), ratio])
    return ["student", method, "lr", "random coreset", "lr", "ratio"], rows


def _protocol_note(methods: dict) -> str:
    """Which checkpoint selection the numbers use; the reference protocol is flagged as biased."""
    protocols = sorted({e["protocol"] for e in methods.values() if e.get("protocol")})
    note = f"Protocol: {'; '.join(protocols)}." if protocols else ""
    if any(p.startswith("reference") for p in protocols):
        note += (
            " The reference protocol picks the epoch on the test split (as the published code does): biased"
            " upward, for comparison with published numbers only."
        )
    coreset_lrs = [f"{name} {entry['lr']:g}" for name, entry in methods.items() if entry.get("lr") is not None]
    if coreset_lrs:
        note += f" Coresets train at the lr that is best on validation ({', '.join(coreset_lrs)})."
    return note


def write_report(run_dir: Path, results: dict) -> None:
    """report.md, a self-contained report.html and figures/*.png for a finished run."""
    run_dir = Path(run_dir)
    figures = run_dir / "figures"
    distilled = run_dir / "distilled"
    methods = results["methods"]
    doc = _Document(run_dir)

    doc.heading("Retrieval on the test split")
    for warning in failure_notes(methods):
        doc.raw(f"**Warning:** {warning}", f'<p class="warning">{html.escape(warning)}</p>')
    doc.raw(markdown_table(methods), _html_table(methods))
    doc.note(
        "Mean ± std over the evaluation runs (seeds). IR = text→image, TR = image→text, recall in %. Best "
        "per column in bold; full data is the upper reference and is not ranked. " + _protocol_note(methods)
    )

    doc.heading("Comparison and training curves")
    doc.begin("grid")
    doc.figure(method_bars(methods, figures / "methods.png"), "r_mean per method (mean ± std over runs)")
    history = _read_jsonl(distilled / "history.jsonl") if (distilled / "history.jsonl").exists() else []
    history = [record for record in history if "loss" in record]  # recovery events carry no loss
    if history:
        doc.figure(
            loss_curve(history, figures / "loss.png"),
            "Trajectory-matching loss per distillation iteration, one colour per phase",
        )
    else:
        doc.note("No distillation history (distilled/history.jsonl) was found.")
    curve = distilled / "recall_curve.json"
    if curve.exists():
        method = read_meta(distilled).get("method") if (distilled / "meta.json").exists() else None
        doc.figure(
            recall_curve(json.loads(curve.read_text()), history, methods, method, figures / "recall.png"),
            "r_mean of students trained on intermediate synthetic snapshots, 1 run each (star: the final"
            " evaluation; dotted: baselines)",
        )
    else:
        doc.note("Recall vs iteration: not available (the distillation kept no intermediate snapshots).")
    doc.end()

    phases = _phase_files(distilled)
    if phases:
        doc.heading("Synthetic set")
        similarities = _similarities(distilled)
        for phase in phases:
            doc.heading(f"Phase {phase}", level=3)
            grid = distilled / f"phase-{phase}-images.png"
            grid_caption = f"Synthetic images of phase {phase} (EMA)"
            if not grid.exists():
                grid = distilled / f"phase-{phase}-nearest-images.png"
                grid_caption = (
                    f"Phase {phase} distils image features, not pixels: the nearest real training image"
                    " (cosine) of each synthetic feature vector"
                )
            captions = _captions(distilled / f"phase-{phase}-captions.json")
            if not (grid.exists() or captions):
                doc.note("No image grid or captions were saved for this phase.")
                continue
            doc.begin("row")
            initial = distilled / f"phase-{phase}-initial-images.png"
            for shown, caption in ((initial, f"The images phase {phase} started from"), (grid, grid_caption)):
                if shown.exists():
                    copy = figures / shown.name
                    copy.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(shown, copy)
                    doc.figure(copy, caption, css_class="pixels")
            if captions:
                doc.table(["#", "nearest real caption of the synthetic text", "cosine"], captions, "captions")
            doc.end()
        if similarities:
            doc.figure(
                similarity_maps(similarities, figures / "similarity.png"),
                "Learned similarity S per phase (rows: synthetic images, columns: synthetic texts); the colour"
                " range follows the off-diagonal entries, so the diagonal (≈1) is clipped",
            )
        else:
            doc.note("The method learns no similarity matrix (S = I).")

    cross_arch = run_dir / "cross-arch.json"
    if cross_arch.exists():
        transfer = json.loads(cross_arch.read_text())
        doc.heading("Cross-architecture transfer")
        doc.note(cross_arch_caption(transfer))
        doc.table(*cross_arch_rows(transfer), "cross-arch")

    rows = _timing_rows(results)
    if rows:
        doc.heading("Timing")
        doc.begin("row")
        doc.table(["stage", "seconds", ""], [[s, f"{t:.1f}", "reused" if r else ""] for s, t, r in rows], "timing")
        doc.figure(timing_bars(rows, figures / "timing.png"), "Wall time per stage (grey: reused from an earlier run)")
        doc.end()

    title = f"mmdistill report: {results['preset']}"
    subtitle = (
        f"dataset {results['dataset']} · {results['pairs']} synthetic pairs · seed {results['seed']} · "
        f"{len(methods)} methods"
    )
    write_text(f"# {title}\n\n{subtitle}\n\n" + "\n".join(doc.md), run_dir / "report.md")
    write_text(
        _HTML.format(title=html.escape(title), subtitle=html.escape(subtitle), body="\n".join(doc.html)),
        run_dir / "report.html",
    )


def _claims_section(claims: list[str]) -> str:
    return "## The paper's claims\n\n" + "".join(f"- {claim}\n" for claim in claims) + "\n" if claims else ""


def write_table_report(path: Path, title: str, results: dict, chart: Path) -> None:
    """A Markdown page with one results table and its bar chart (ablation.md, quality.md); with the Table 4
    variants, the paper's ordering of them checked."""
    method_bars(results["methods"], chart)
    write_text(
        f"# {title}\n\n{results['preset']} · dataset {results['dataset']} · {results['pairs']} pairs · "
        f"seed {results['seed']}\n\n{markdown_table(results['methods'])}\n\n"
        f"{_protocol_note(results['methods'])} Mean ± std over runs; best per column in bold.\n\n"
        f"{_claims_section(ablation_claims(results['methods']))}"
        f"![r_mean per method]({chart.relative_to(path.parent).as_posix()})\n",
        path,
    )


BUDGET_ROWS = ("ptm-st", "lors", "mtt-vl", "ptm-st+blend")


def budget_table(budgets: dict[str, dict]) -> str:
    """r_mean ± std per method (rows) and budget (columns); the best coreset of each budget named in its cell."""
    pairs = sorted(budgets, key=int)
    lines = ["| method | " + " | ".join(f"{b} pairs" for b in pairs) + " |", "|---" * (len(pairs) + 1) + "|"]
    for name in BUDGET_ROWS:
        if all(name in budgets[b] for b in pairs):
            lines.append(f"| {name} | " + " | ".join(_cell(budgets[b][name], "r_mean") for b in pairs) + " |")
    cells = []
    for b in pairs:
        best = best_coreset(budgets[b])
        cells.append(f"{_cell(budgets[b][best], 'r_mean')} ({best})" if best else "")
    lines.append("| best coreset | " + " | ".join(cells) + " |")
    if all(REFERENCE in budgets[b] for b in pairs):
        lines.append(f"| {REFERENCE} | " + " | ".join(_cell(budgets[b][REFERENCE], "r_mean") for b in pairs) + " |")
    return "\n".join(lines)


def write_budget_report(path: Path, results: dict, chart: Path) -> None:
    """budgets.md: r_mean per method and budget, the claims across budgets checked, the figure, then every
    budget's full table."""
    budgets = results["budgets"]
    budget_lines(budgets, BUDGET_ROWS, chart)
    sections = [
        f"## {pairs} pairs ({preset})\n\n{markdown_table(budgets[pairs])}\n\n{_protocol_note(budgets[pairs])}\n"
        for pairs, preset in zip(sorted(budgets, key=int), results["presets"])
    ]
    write_text(
        f"# Budgets: {', '.join(results['presets'])}\n\ndataset {results['dataset']} · seed {results['seed']} · "
        f"one set of experts for every budget\n\n"
        f"r_mean on the test split, mean ± std over runs:\n\n{budget_table(budgets)}\n\n"
        f"{_claims_section(budget_claims(budgets))}"
        f"![r_mean vs budget]({chart.relative_to(path.parent).as_posix()})\n\n" + "\n".join(sections),
        path,
    )


_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
  body {{ margin: 0; background: #f6f7f9; color: #1d2330; font: 15px/1.5 -apple-system, "Segoe UI", Roboto,
         "Helvetica Neue", Arial, sans-serif; }}
  main {{ max-width: 1040px; margin: 0 auto; padding: 32px 28px 48px; background: #fff; min-height: 100vh;
         box-shadow: 0 0 24px rgba(0,0,0,.06); }}
  h1 {{ margin: 0 0 4px; font-size: 26px; }}
  .warning {{ background: #fdecea; border-left: 4px solid #c62828; padding: 8px 12px; color: #8e1c1c; }}
  td.failed {{ color: #c62828; font-weight: 600; }}
  .subtitle {{ margin: 0 0 24px; color: #5b6475; }}
  h2 {{ margin: 36px 0 12px; padding-bottom: 6px; border-bottom: 1px solid #e3e6eb; font-size: 19px; }}
  h3 {{ margin: 24px 0 8px; font-size: 16px; color: #3a4252; }}
  table {{ border-collapse: collapse; margin: 8px 0 12px; font-variant-numeric: tabular-nums; }}
  th, td {{ padding: 6px 10px; border-bottom: 1px solid #eceff3; text-align: right; white-space: nowrap; }}
  thead th {{ background: #f1f3f6; font-weight: 600; }}
  tbody th {{ text-align: left; font-weight: 500; }}
  thead th:first-child, td:first-child {{ text-align: left; }}
  td.best {{ font-weight: 700; color: #0d3f7a; }}
  tr.reference {{ color: #5b6475; font-style: italic; }}
  .swatch {{ display: inline-block; width: 10px; height: 10px; border-radius: 2px; margin-right: 8px; }}
  table.captions td, table.captions th {{ text-align: left; white-space: normal; }}
  table.captions td:first-child {{ color: #8a93a3; width: 2em; }}
  table.captions td:last-child, table.captions th:last-child {{ text-align: right; color: #5b6475; }}
  .note {{ color: #5b6475; font-size: 13px; max-width: 900px; }}
  .grid {{ display: grid; grid-template-columns: 1fr 1fr; gap: 8px 24px; align-items: start; }}
  .row {{ display: flex; flex-wrap: wrap; gap: 8px 28px; align-items: flex-start; }}
  .row > table {{ margin-top: 16px; }}
  figure {{ margin: 16px 0; }}
  figure img {{ max-width: 100%; height: auto; border: 1px solid #eceff3; border-radius: 4px; }}
  figure.pixels img {{ width: 420px; max-width: 100%; image-rendering: pixelated; }}
  figcaption {{ color: #5b6475; font-size: 13px; margin-top: 4px; }}
</style></head>
<body><main>
<h1>{title}</h1>
<p class="subtitle">{subtitle}</p>
{body}
</main></body></html>
"""
