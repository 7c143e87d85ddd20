"""`mmdistill bench robustness`: the default settings, untouched, on sets that no preset was tuned on.

Every set is a base preset (shapes-100 or emoji-100: the embedded defaults, with every lr left `auto`) plus
data overrides; each runs at 50 and 100 pairs (two phases of half each), ptm-st against the random coreset and
the full data, 3 evaluation seeds. A set whose data is not installed is listed as skipped, never silently left out.

The real captioned source that no preset has seen is Debian's `tuxpaint-stamps-default` (about 800 PNG stamps of
animals, food, vehicles, ... each with a one-sentence English description), turned into an imagefolder.
"""

from __future__ import annotations

import json
import logging
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mmdistill.config import load_config
from mmdistill.errors import UserError
from mmdistill.io import atomic_path, write_json, write_text
from mmdistill.pipeline import compare
from mmdistill.report.figures import robustness_chart

logger = logging.getLogger(__name__)

TUXPAINT_STAMPS = Path("/usr/share/tuxpaint/stamps")
TUXPAINT_SPLITS = {"train": 0.7, "validation": 0.1, "test": 0.2}
BUDGETS = (50, 100)
METHODS = ("ptm-st", "random", "full")


@dataclass(frozen=True)
class RobustnessSet:
    name: str
    preset: str
    overrides: tuple[str, ...] = ()
    what: str = ""
    needs: tuple[str, ...] = field(default=())  # paths that must exist (else the set is skipped)


def robustness_sets(work: Path) -> list[RobustnessSet]:
    """The sets of the benchmark; `work` holds data built on the fly (the tuxpaint imagefolder)."""
    shapes = ("data.val_images=100",)
    return [
        RobustnessSet(
            "shapes-440-1cap",
            "shapes-100",
            ("data.train_images=440", "data.val_images=63", "data.test_images=126", "data.captions_per_image=1"),
            "440 training images, one caption each (the collapse of the issue)",
        ),
        RobustnessSet(
            "shapes-300",
            "shapes-100",
            (*shapes, "data.train_images=300", "data.test_images=300"),
            "300 training images, 5 captions",
        ),
        RobustnessSet(
            "shapes-3000-3cap",
            "shapes-100",
            (*shapes, "data.train_images=3000", "data.captions_per_image=3", "data.seed=3"),
            "3000 training images, 3 captions, another draw of scenes",
        ),
        RobustnessSet(
            "shapes-32px-2cap",
            "shapes-100",
            (*shapes, "data.image_size=32", "data.captions_per_image=2", "data.seed=5"),
            "32 px images, 2 captions, another draw of scenes",
        ),
        RobustnessSet("emoji-400", "emoji-100", ("data.train_images=400",), "400 training emoji, 5 captions"),
        RobustnessSet("emoji-1cap", "emoji-100", ("data.captions_per_image=1",), "all emoji, one caption each"),
        RobustnessSet(
            "tuxpaint",
            "emoji-100",
            ("data.source=folder", f"data.root={work / 'tuxpaint'}"),
            "Tux Paint stamps (Debian tuxpaint-stamps-default), one real caption each, 70/10/20",
            (str(TUXPAINT_STAMPS),),
        ),
    ]


def build_tuxpaint_folder(out: Path, stamps: Path = TUXPAINT_STAMPS, seed: int = 0) -> Path:
    """An imagefolder of the stamps: each PNG with a sibling .txt whose first line is its English description,
    flattened onto white (stamps are transparent) at 128 px, split 70/10/20 by a seeded permutation."""
    from PIL import Image

    if (out / "test" / "metadata.jsonl").exists():
        return out
    pairs = []
    for image in sorted(stamps.rglob("*.png")):
        caption_file = image.with_suffix(".txt")
        if caption_file.is_file():
            caption = caption_file.read_text(encoding="utf-8", errors="replace").splitlines()[0].strip()
            if caption:
                pairs.append((image, caption))
    if len(pairs) < 100:
        raise UserError(f"found {len(pairs)} captioned stamps in {stamps}; install tuxpaint-stamps-default")
    order = np.random.default_rng(seed).permutation(len(pairs))
    cuts = np.cumsum([round(f * len(pairs)) for f in TUXPAINT_SPLITS.values()])[:-1]
    for split, indices in zip(TUXPAINT_SPLITS, np.split(order, cuts)):
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        rows = []
        for index in indices:
            image, caption = pairs[index]
            name = f"{index:04d}.png"
            with Image.open(image) as source:
                rgba = source.convert("RGBA")
            flat = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            flat.alpha_composite(rgba)
            flat = flat.convert("RGB")
            flat.thumbnail((128, 128))
            with atomic_path(folder / name) as tmp:
                flat.save(tmp, format="png")
            rows.append(json.dumps({"file_name": name, "text": caption}))
        write_text("\n".join(rows) + "\n", folder / "metadata.jsonl")
    return out


def run_robustness(out: Path, budgets=BUDGETS, names: list[str] | None = None) -> dict:
    """Every set x budget through `run`'s stages (ptm-st, random, full); results.json + robustness.md + chart."""

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sets = [s for s in robustness_sets(out / "data") if names is None or s.name in names]
    rows, skipped = [], []
    for rset in sets:
        missing = [path for path in rset.needs if not Path(path).exists()]
        if missing:
            skipped.append(
                {
                    "set": rset.name,
                    "reason": f"{missing[0]} not found (apt-get install"
                    " tuxpaint-stamps-default, or `make bench-robustness`)",
                }
            )
            logger.warning("skipping %s: %s", rset.name, skipped[-1]["reason"])
            continue
        if rset.name == "tuxpaint":
            build_tuxpaint_folder(out / "data" / "tuxpaint")
        for pairs in budgets:
            half = pairs // 2
            cfg = load_config(
                rset.preset,
                [
                    *rset.overrides,
                    f"distill.phases.0.pairs={half}",
                    f"distill.phases.1.pairs={pairs - half}",
                    "distill.snapshot_every=0",
                ],
            )
            logger.info("== %s, %d pairs", rset.name, pairs)
            results = compare(
                cfg, out / f"{rset.name}-{pairs}", "quality", METHODS, f"Robustness: {rset.name}, {pairs} pairs"
            )
            rows.append(
                {
                    "set": rset.name,
                    "pairs": pairs,
                    "what": rset.what,
                    "methods": results["methods"],
                    "collapsed": bool(results["methods"]["ptm-st"]["collapsed_phases"]),
                }
            )
    summary = summarize(rows)
    results = {"rows": rows, "skipped": skipped, "summary": summary}
    write_json(results, out / "results.json")
    write_robustness_report(out, results)
    return results


def summarize(rows: list[dict]) -> dict:
    """The acceptance figures: ptm-st above random everywhere, its median ratio to random, collapses."""
    ratios = [
        row["methods"]["ptm-st"]["r_mean"] / row["methods"]["random"]["r_mean"]
        for row in rows
        if row["methods"]["random"]["r_mean"] > 0
    ]
    return {
        "rows": len(rows),
        "above_random": sum(r["methods"]["ptm-st"]["r_mean"] > r["methods"]["random"]["r_mean"] for r in rows),
        "median_ratio_to_random": statistics.median(ratios) if ratios else None,
        "collapsed": sum(r["collapsed"] for r in rows),
    }


def write_robustness_report(out: Path, results: dict) -> None:
    """robustness.md: one table (r_mean ± std per method, ratio to random, collapsed) and a grouped bar chart."""

    lines = [
        "# Robustness: default settings on sets no preset was tuned on",
        "",
        "| set | pairs | ptm-st | random coreset | full data | ptm-st / random | collapsed |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        m = row["methods"]
        cells = [f"{m[name]['r_mean']:.1f} ± {m[name]['r_mean_std']:.1f}" for name in METHODS]
        ratio = m["ptm-st"]["r_mean"] / m["random"]["r_mean"] if m["random"]["r_mean"] > 0 else float("nan")
        lines.append(
            f"| {row['set']} | {row['pairs']} | "
            + " | ".join(cells)
            + f" | {ratio:.2f}x | {'YES' if row['collapsed'] else 'no'} |"
        )
    summary = results["summary"]
    if summary["rows"]:
        lines += [
            "",
            f"ptm-st above the random coreset in {summary['above_random']} of {summary['rows']} rows;"
            f" median ratio to random {summary['median_ratio_to_random']:.2f}x;"
            f" collapsed phases in {summary['collapsed']} rows.",
        ]
    for skip in results["skipped"]:
        lines.append(f"\nSkipped {skip['set']}: {skip['reason']}")
    lines += ["", "Sets: " + "; ".join(f"`{s.name}` = {s.preset} + {s.what}" for s in robustness_sets(out / "data"))]
    if results["rows"]:
        chart = robustness_chart(results["rows"], METHODS, out / "robustness.png")
        lines += ["", f"![r_mean per set and budget]({chart.name})"]
    write_text("\n".join(lines) + "\n", out / "robustness.md")
    print("\n".join(lines[2:]))
