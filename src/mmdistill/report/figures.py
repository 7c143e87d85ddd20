"""The report's figures: one matplotlib function per plot, drawn without pyplot (no global backend)."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import torch
from matplotlib.figure import Figure

from mmdistill.evaluation.results import BASELINES, best_coreset, mean_std

# One colour per method everywhere: distilled methods in saturated colours, coresets in greys, full data green.
COLOURS = {
    "ptm-st": "#1f5fa8",
    "ptm-st+blend": "#3a9bd9",
    "ptm-st+pixels": "#8e44ad",
    "lors": "#e07b1a",
    "mtt-vl": "#c0392b",
    "random": "#9a9a9a",
    "herding": "#7a7a7a",
    "kcenter": "#5c5c5c",
    "forgetting": "#b8b0a4",
    "full": "#2e8b57",
    "best coreset": "#7a7a7a",
}
PHASE_COLOURS = ("#1f5fa8", "#e07b1a", "#2e8b57", "#8e44ad", "#c0392b", "#16a085")


def colour(name: str) -> str:
    """Fixed colour of a method; ablation variants get darker blues the more components they switch on."""
    if name in COLOURS:
        return COLOURS[name]
    parts = [p for p in name.split("+") if p in ("ptm", "st", "ema")]
    return matplotlib.colors.to_hex(matplotlib.colormaps["Blues"](0.35 + 0.2 * len(parts)))


# ----------------------------------------------------------------------------------------------- tables


def new_figure(*grid, figsize, layout=None, **subplot_kw):
    """A figure and its axes, drawn without pyplot: no global backend is chosen or changed for the program that
    imports mmdistill, and nothing is left open in pyplot's figure registry."""
    fig = Figure(figsize=figsize, layout=layout)
    return fig, fig.subplots(*grid, **subplot_kw)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _style(ax, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=11, loc="left")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)


def method_bars(methods: dict, path: Path, title: str = "r_mean on the test split (mean ± std)") -> Path:
    """Horizontal bars of r_mean ± std, one colour per method."""
    names = list(methods)
    means = [methods[n]["r_mean"] for n in names]
    stds = [mean_std(methods[n], "r_mean")[1] or 0.0 for n in names]
    fig, ax = new_figure(figsize=(6.4, 0.45 * len(names) + 1.2))
    ax.barh(names, means, xerr=stds, color=[colour(n) for n in names], capsize=3)
    for y, (mean, std) in enumerate(zip(means, stds)):
        ax.text(mean + std + 0.5, y, f"{mean:.1f}", va="center", fontsize=9)
    ax.invert_yaxis()
    ax.set_xlim(0, max(m + s for m, s in zip(means, stds)) * 1.15 + 1)
    _style(ax, title, "r_mean (%)", "")
    ax.grid(axis="y", visible=False)
    return _save(fig, path)


def budget_lines(budgets: dict[str, dict], methods: tuple[str, ...], path: Path) -> Path:
    """r_mean ± std against the budget, one line per method of `methods`; the best coreset per budget in grey and
    the full data as a dashed line."""
    pairs = sorted(budgets, key=int)
    xs = [int(b) for b in pairs]
    fig, ax = new_figure(figsize=(6.4, 4.2))
    lines = {name: [budgets[b].get(name) for b in pairs] for name in methods}
    bests = [best_coreset(budgets[b]) for b in pairs]
    lines["best coreset"] = [budgets[b][best] if best else None for b, best in zip(pairs, bests)]
    for name, entries in lines.items():
        if None in entries:
            continue
        means = [e["r_mean"] for e in entries]
        stds = [mean_std(e, "r_mean")[1] or 0.0 for e in entries]
        ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=name, color=colour(name))
    full = [budgets[b]["full"]["r_mean"] for b in pairs if "full" in budgets[b]]
    if full:
        ax.axhline(full[-1], color=colour("full"), linestyle="--", label="full data")
    ax.set_xscale("log")
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.minorticks_off()
    _style(ax, "r_mean vs budget (mean ± std)", "synthetic pairs", "r_mean (%)")
    ax.legend(frameon=False, fontsize=9, loc="center left", bbox_to_anchor=(1.0, 0.5))  # off the lines
    return _save(fig, path)


def robustness_chart(rows: list[dict], methods: tuple[str, ...], path: Path) -> Path:
    """Grouped bars: r_mean ± std of each method for every (set, pairs) row."""
    labels = [f"{row['set']}\n{row['pairs']} pairs" for row in rows]
    width = 0.8 / len(methods)
    fig, ax = new_figure(figsize=(max(6.4, 1.1 * len(rows) + 1.5), 4.2))
    for i, name in enumerate(methods):
        means = [row["methods"][name]["r_mean"] for row in rows]
        stds = [mean_std(row["methods"][name], "r_mean")[1] or 0.0 for row in rows]
        positions = [x + (i - (len(methods) - 1) / 2) * width for x in range(len(rows))]
        ax.bar(positions, means, width, yerr=stds, color=colour(name), capsize=2, label=name)
    ax.set_xticks(range(len(rows)), labels, fontsize=8, rotation=30, ha="right")
    _style(ax, "Default settings on sets no preset was tuned on (mean ± std)", "", "r_mean (%)")
    ax.grid(axis="x", visible=False)
    ax.legend(frameon=False, fontsize=9)
    return _save(fig, path)


def _by_phase(records: list[dict], value: str) -> dict[int, tuple[list[int], list[float]]]:
    phases: dict[int, tuple[list[int], list[float]]] = {}
    for record in records:
        xs, ys = phases.setdefault(record["phase"], ([], []))
        xs.append(record["iteration"])
        ys.append(record[value])
    return phases


def phase_offsets(records: list[dict]) -> tuple[dict[int, int], int]:
    """Where each phase starts on one axis of total iterations (phases back to back), and where the last ends."""
    ends: dict[int, int] = {}
    for record in records:
        ends[record["phase"]] = max(ends.get(record["phase"], 0), record["iteration"] + 1)
    offsets, total = {}, 0
    for phase in sorted(ends):
        offsets[phase], total = total, total + ends[phase]
    return offsets, total


def _phase_lines(ax, phases: dict, offsets: dict[int, int], smooth: int = 1) -> None:
    """One line per phase on the shared iteration axis, with the phase boundaries dashed."""
    for phase, (xs, ys) in sorted(phases.items()):
        shifted = [offsets[phase] + x for x in xs]
        col = PHASE_COLOURS[phase % len(PHASE_COLOURS)]
        if smooth > 1 and len(ys) > smooth:
            ax.plot(shifted, ys, color=col, alpha=0.25, lw=0.8)
            kernel = torch.ones(1, 1, smooth) / smooth
            smoothed = torch.nn.functional.conv1d(torch.tensor(ys).view(1, 1, -1), kernel).flatten()
            ax.plot(shifted[smooth - 1 :], smoothed.tolist(), color=col, lw=1.8, label=f"phase {phase}")
        else:
            ax.plot(shifted, ys, color=col, lw=1.8, marker="o" if len(ys) < 30 else None, ms=4, label=f"phase {phase}")
        if offsets[phase]:
            ax.axvline(offsets[phase], color="#888", ls="--", lw=0.8)


def loss_curve(history: list[dict], path: Path) -> Path:
    """Matching loss against iteration, one colour per phase (raw faint, moving average solid)."""
    phases = _by_phase(history, "loss")
    longest = max(len(ys) for _, ys in phases.values())
    fig, ax = new_figure(figsize=(6.4, 3.4))
    _phase_lines(ax, phases, phase_offsets(history)[0], smooth=max(1, longest // 20))
    ax.legend(frameon=False, fontsize=9)
    _style(ax, "Distillation: trajectory-matching loss", "iteration (phases back to back)", "loss")
    return _save(fig, path)


def recall_curve(curve: list[dict], history: list[dict], methods: dict, method: str | None, path: Path) -> Path:
    """r_mean of students trained on intermediate synthetic sets (1 run each), the final evaluation of the
    distilled method as a star at the end, and the baselines as dotted lines."""
    offsets, end = phase_offsets(history or curve)
    fig, ax = new_figure(figsize=(6.4, 3.4))
    _phase_lines(ax, _by_phase(curve, "r_mean"), offsets)
    if method in methods:
        entry = methods[method]
        ax.errorbar(
            [end],
            [entry["r_mean"]],
            yerr=[entry.get("r_mean_std", 0.0)],
            fmt="*",
            ms=11,
            capsize=3,
            color=colour(method),
            label=f"{method}, final ({entry.get('runs', '?')} runs)",
        )
    for name, entry in methods.items():
        if name in BASELINES:
            ax.axhline(entry["r_mean"], color=colour(name), ls=":", lw=1.2)
            ax.annotate(
                name,
                (1.0, entry["r_mean"]),
                xycoords=("axes fraction", "data"),
                fontsize=8,
                color=colour(name),
                va="bottom",
                ha="right",
            )
    ax.legend(frameon=False, fontsize=9)
    _style(ax, "Recall of the synthetic set during distillation", "iteration (phases back to back)", "r_mean (%)")
    return _save(fig, path)


def similarity_maps(matrices: list[torch.Tensor], path: Path) -> Path:
    """Heat maps of the learned S per phase, colour range set by the off-diagonal entries (diagonal clipped)."""
    off = torch.cat([(m - torch.diag(torch.diag(m))).flatten() for m in matrices]).abs()
    limit = max(off.quantile(0.995).item(), 1e-3)
    fig, axes = new_figure(
        1, len(matrices), figsize=(3.6 * len(matrices) + 0.8, 3.4), squeeze=False, layout="constrained"
    )
    for phase, (ax, matrix) in enumerate(zip(axes[0], matrices)):
        image = ax.imshow(matrix.numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
        ax.set_title(f"phase {phase}: S ({matrix.shape[0]}×{matrix.shape[0]})", fontsize=10)
        ax.set_xlabel("synthetic text")
    axes[0, 0].set_ylabel("synthetic image")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.85)
    return _save(fig, path)


def timing_bars(rows: list[tuple[str, float, bool]], path: Path) -> Path:
    fig, ax = new_figure(figsize=(5.2, 0.4 * len(rows) + 1.1))
    names = [f"{stage} (reused)" if reused else stage for stage, _, reused in rows]
    ax.barh(names, [s for _, s, _ in rows], color=["#c8c8c8" if r else "#1f5fa8" for _, _, r in rows])
    ax.invert_yaxis()
    _style(ax, "Wall time per stage", "seconds", "")
    ax.grid(axis="y", visible=False)
    return _save(fig, path)
