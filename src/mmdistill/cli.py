"""Command line: each subcommand parses its arguments, builds the validated config and calls one library function.

User errors (bad preset, key, value, file) print one line `mmdistill: error: ...` and exit with status 2;
failures of the system (read-only folder, full disk) print one line naming the path and the cause, status 1.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .errors import UserError


def _config(args):
    from .config import load_config

    overrides = list(args.set or [])
    if getattr(args, "seed", None) is not None:
        overrides.append(f"seed={args.seed}")
    if getattr(args, "device", None):
        overrides.append(f"device={args.device}")
    return load_config(args.preset, overrides)


# -- subcommand bodies (imports are local so `mmdistill presets` starts fast) ------------------------------
def cmd_presets(args):
    from .config import _preset_chain, preset_names

    names = preset_names()
    width = max(map(len, names))
    for name in names:
        description = next((raw["description"] for raw in reversed(_preset_chain(name)) if "description" in raw), "")
        print(f"{name:<{width}}  {description}")


def cmd_prepare(args):
    from .prepare import prepare, print_summary

    cfg = _config(args)
    print_summary(prepare(cfg, verbose=True))


def cmd_experts(args):
    from .experts import train_experts

    cfg = _config(args)
    train_experts(cfg, Path(args.out))


def cmd_experts_import(args):
    from .experts import import_reference

    import_reference(Path(args.source), Path(args.out), fmt=args.format)


def cmd_shortcut(args):
    from .trajectory import export_shortcut

    export_shortcut(Path(args.experts), Path(args.out), args.start, args.end, fmt=args.format)


def cmd_distill(args):
    from .distill import distill

    cfg = _config(args)
    distill(cfg, Path(args.experts), Path(args.out), resume=args.resume)


def cmd_evaluate(args):
    from .evaluate import evaluate_command

    if args.runs is not None:
        args.set = list(args.set or []) + [f"evaluate.runs={args.runs}"]
    cfg = _config(args)
    evaluate_command(cfg, Path(args.synthetic), Path(args.out), fmt=args.format)


def cmd_export(args):
    from .synthetic import export, load_distilled

    out = export(load_distilled(Path(args.source)), args.to, Path(args.out), push=args.push)
    print(f"exported to {out}" + (f" and pushed to {args.push}" if args.push else ""))


def cmd_inspect(args):
    from .synthetic import describe, load_distilled

    print(describe(load_distilled(Path(args.source), args.format)))


def cmd_run(args):
    from .pipeline import run

    run(_config(args), Path(args.out), resume=args.resume)


def cmd_demo(args):
    from .pipeline import demo

    demo(Path(args.out), device=args.device)


def cmd_ablate(args):
    from .pipeline import ablate

    ablate(_config(args), Path(args.out))


def cmd_bench(args):
    from . import bench

    if args.what == "metrics":
        bench.metrics(as_json=args.json)
        return
    if args.what == "robustness":  # its sets bring their own presets
        bench.robustness(out=args.out, as_json=args.json)
        return
    cfg = _config(args)
    getattr(bench, args.what)(cfg, out=Path(args.out) if args.out else None, as_json=args.json)


# -- parser --------------------------------------------------------------------------------------------
def _common(p, preset_required=True, out_required=False, out=True):
    p.add_argument("--preset", required=preset_required, help="preset name (see `mmdistill presets`)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config key, e.g. distill.phases.0.pairs=25 (repeatable)")
    p.add_argument("--seed", type=int, help="global seed (config key `seed`)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    if out:
        p.add_argument("--out", required=out_required, help="output folder")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmdistill", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("presets", help="list the shipped presets")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("prepare", help="materialise a data source and its cached frozen features")
    _common(p, out=False)  # everything prepare makes goes to the cache (config key `cache_dir`)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("experts", help="train expert trajectories (torchrun shards them over ranks)")
    experts_sub = p.add_subparsers(dest="experts_command", metavar="[import]")
    _common(p, preset_required=False, out_required=False)
    p.set_defaults(func=cmd_experts)
    q = experts_sub.add_parser("import", help="import published reference-format replay buffers")
    q.add_argument("--from", dest="source", required=True, help="folder with {img,txt}_replay_buffer_N.pt")
    q.add_argument("--format", default="reference", choices=["reference"])
    q.add_argument("--out", required=True)
    q.set_defaults(func=cmd_experts_import)

    p = sub.add_parser("shortcut", help="export shortcut (interpolated) trajectories for a snapshot window")
    p.add_argument("--experts", required=True)
    p.add_argument("--start", type=int, required=True)
    p.add_argument("--end", type=int, required=True, help="last snapshot, inclusive")
    p.add_argument("--out", required=True)
    p.add_argument("--format", default="native", choices=["native", "reference"])
    p.set_defaults(func=cmd_shortcut)

    p = sub.add_parser("distill", help="distil the phases of a preset from expert trajectories")
    _common(p, out_required=True)
    p.add_argument("--experts", required=True)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("evaluate", help="train fresh students on synthetic phases and report retrieval recall")
    _common(p, out_required=True)
    p.add_argument("--synthetic", required=True,
                   help="distilled set: run or distillation folder, an export, or another code base's .pt (--format)")
    p.add_argument("--format", default="mmdistill", choices=["mmdistill", "ptm-st", "lors"],
                   help="layout of --synthetic: mmdistill's own (default) or the PTM-ST / LoRS reference .pt")
    p.add_argument("--runs", type=int)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("export", help="export a distilled set as a Hugging Face imagefolder or datasets.Dataset")
    p.add_argument("source", metavar="RUN_OR_DIR", help="run folder, distillation folder or export")
    p.add_argument("--to", required=True, choices=["folder", "hf"],
                   help="folder: imagefolder layout; hf: datasets.Dataset.save_to_disk (needs mmdistill[hf])")
    p.add_argument("out", metavar="OUT", help="new output folder")
    p.add_argument("--push", metavar="REPO_ID", help="then upload to the Hugging Face Hub as this dataset repo")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("inspect", help="one-screen summary of a distilled set")
    p.add_argument("source", metavar="RUN_OR_DIR", help="run folder, distillation folder, export or .pt")
    p.add_argument("--format", default="mmdistill", choices=["mmdistill", "ptm-st", "lors"])
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("run", help="prepare -> experts -> distill -> evaluate -> report")
    _common(p, out_required=True)
    p.add_argument("--resume", action="store_true")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo", help="the embedded default end to end (shapes-100), with a summary table")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--device")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("ablate", help="the paper's Table 4 ablation grid")
    _common(p, out_required=True)
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser("bench", help="benchmarks: storage | iteration | quality | robustness | metrics")
    p.add_argument("what", choices=["storage", "iteration", "quality", "robustness", "metrics"])
    _common(p, preset_required=False)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_bench)
    return parser


def _end_progress_bars() -> None:
    """Close the progress bars an error left open: an open bar has no line end, so the one-line error message
    would continue the bar's line."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    if args.func is cmd_experts and not (args.preset and args.out):
        parser.error("experts: --preset and --out are required")
    if args.func is cmd_bench and args.what not in ("metrics", "robustness") and not args.preset:
        parser.error(f"bench {args.what}: --preset is required")
    try:
        args.func(args)
    except UserError as err:
        _end_progress_bars()
        print(f"mmdistill: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        _end_progress_bars()
        cause = (err.strerror or str(err)).strip()
        where = f"{err.filename}: " if err.filename else ""
        print(f"mmdistill: error: {where}{cause[:1].lower()}{cause[1:]}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        _end_progress_bars()
        print("mmdistill: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
