"""Command line: each subcommand parses its arguments, builds the validated config and calls one library function.

User errors (bad preset, key, value, file) print one line `mmdistill: error: ...` and exit with status 2;
failures of the system (read-only folder, full disk) print one line naming the path and the cause, status 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path

from mmdistill import __version__
from mmdistill.errors import UserError

# Named rather than __name__, which is "__main__" under `python -m mmdistill.cli`: outside the "mmdistill" logger
# whose level setup_logging sets, its info messages would be dropped.
logger = logging.getLogger("mmdistill.cli")

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_SINKS = ("tensorboard", "wandb")


def _config(args):
    """The validated config of a command. Called before the command imports torch or anything heavy, so that a
    typo in a key or a value is reported within a fraction of a second."""
    from mmdistill.config import load_config

    overrides = list(args.global_set or []) + list(args.set or [])
    if getattr(args, "seed", None) is not None:
        overrides.append(f"seed={args.seed}")
    if getattr(args, "device", None):
        overrides.append(f"device={args.device}")
    config_file = args.config or args.global_config
    if config_file is None and not args.preset:
        raise UserError(f"{args.command}: give --preset NAME (see `mmdistill presets`) or --config FILE")
    return load_config(args.preset, overrides, config_file)


def _sink(args):
    """The metrics sink named by `--log` (its form was checked with the arguments), or None."""
    spec = getattr(args, "log", None)
    if not spec:
        return None
    from mmdistill.tracking import open_sink

    return open_sink(spec[0], spec[1] if len(spec) > 1 else None)


# -- subcommand bodies (imports are local, after the config is built, so errors in it come fast) ---------
def cmd_presets(args):
    from mmdistill.config import preset_chain, preset_names

    names = preset_names()
    width = max(map(len, names))
    for name in names:
        description = next((raw["description"] for raw in reversed(preset_chain(name)) if "description" in raw), "")
        print(f"{name:<{width}}  {description}")


def cmd_config(args):
    from omegaconf import OmegaConf

    print(OmegaConf.to_yaml(_config(args)), end="")


def cmd_prepare(args):
    cfg = _config(args)
    from mmdistill.prepare import prepare, print_summary

    print_summary(prepare(cfg, verbose=True))


def cmd_experts(args):
    cfg = _config(args)
    with _tracked(args):
        from mmdistill.experts.train import train_experts

        train_experts(cfg, Path(args.out), restart=args.restart)


def cmd_experts_import(args):
    from mmdistill.experts.reference import import_reference

    import_reference(Path(args.source), Path(args.out), fmt=args.format)


def cmd_shortcut(args):
    from mmdistill.experts.shortcut import export_shortcut

    export_shortcut(Path(args.experts), Path(args.out), args.start, args.end, fmt=args.format)


def cmd_distill(args):
    cfg = _config(args)
    with _tracked(args):
        from mmdistill.distill.engine import distill

        distill(cfg, Path(args.experts), Path(args.out), resume=args.resume, restart=args.restart)


def cmd_evaluate(args):
    if args.runs is not None:
        args.set = list(args.set or []) + [f"evaluate.runs={args.runs}"]
    cfg = _config(args)
    with _tracked(args):
        from mmdistill.evaluation.results import evaluate_command

        evaluate_command(cfg, Path(args.synthetic), Path(args.out), fmt=args.format)


def cmd_export(args):
    from mmdistill.synthetic import export, load_distilled

    out = export(load_distilled(Path(args.source)), args.to, Path(args.out), push=args.push)
    logger.info("exported to %s%s", out, f" and pushed to {args.push}" if args.push else "")


def cmd_inspect(args):
    from mmdistill.synthetic import describe, load_distilled

    print(describe(load_distilled(Path(args.source), args.format)))


def cmd_run(args):
    cfg = _config(args)
    with _tracked(args):
        from mmdistill.pipeline import run

        run(cfg, Path(args.out), resume=args.resume, restart=args.restart)


def cmd_demo(args):
    from mmdistill.pipeline import demo

    demo(Path(args.out), device=args.device)


def cmd_ablate(args):
    cfg = _config(args)
    with _tracked(args):
        from mmdistill.pipeline import ablate

        ablate(cfg, Path(args.out))


def cmd_bench(args):
    from mmdistill.bench import commands as bench

    if args.what == "metrics":
        bench.metrics(as_json=args.json)
        return
    if args.what == "robustness":  # its sets bring their own presets
        bench.robustness(out=args.out, as_json=args.json)
        return
    if args.what == "budgets":  # one preset per budget, from the family of --preset
        cfgs = _budget_configs(args)
        with _tracked(args):
            bench.budgets(cfgs, out=Path(args.out) if args.out else None, as_json=args.json)
        return
    cfg = _config(args)
    with _tracked(args):
        getattr(bench, args.what.replace("-", "_"))(cfg, out=Path(args.out) if args.out else None, as_json=args.json)


def _budget_configs(args) -> list:
    """The configs of `bench budgets`: --preset's family (shapes-large-500 -> shapes-large-<N>) at each of
    --budgets, with the same --config and --set applied to each."""
    if not args.preset:
        raise UserError("bench budgets: give --preset NAME-<pairs> (e.g. shapes-large-500), the family of the budgets")
    try:
        budgets = sorted({int(b) for b in args.budgets.split(",") if b.strip()})
    except ValueError:
        raise UserError(f"--budgets: expected pair counts like 100,200,500, got {args.budgets!r}") from None
    family = re.sub(r"-\d+$", "", args.preset)
    return [_config(argparse.Namespace(**{**vars(args), "preset": f"{family}-{pairs}"})) for pairs in budgets]


def _tracked(args):
    """The context in which a command's scalars go to the `--log` sink (none: a no-op context)."""
    from mmdistill.tracking import tracking

    return tracking(_sink(args))


# -- parser --------------------------------------------------------------------------------------------
def _config_options(p):
    """--preset, --config and --set: the options that make a command's config (shared by every command)."""
    p.add_argument("--preset", help="shipped preset name (see `mmdistill presets`)")
    p.add_argument(
        "--config",
        metavar="FILE.yaml",
        help="your own preset: same keys as a shipped one, merged over --preset, then --set",
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config key, e.g. distill.phases.0.pairs=25 (repeatable)",
    )


def _common(p, out_required=False, out=True):
    _config_options(p)
    p.add_argument("--seed", type=int, help="global seed (config key `seed`)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    if out:
        p.add_argument("--out", required=out_required, help="output folder")
        p.add_argument(
            "--log",
            nargs="+",
            metavar=("SINK", "DIR"),
            help="also send scalars to `tensorboard DIR` or `wandb [DIR]` (offline without WANDB_API_KEY)",
        )


def _log_level_option(p, default):
    p.add_argument(
        "--log-level",
        type=str.lower,
        choices=LOG_LEVELS,
        default=default,
        help="messages shown: debug, info (default, or $MMDISTILL_LOG_LEVEL), warning, error",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmdistill", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--version", action="version", version=f"mmdistill {__version__}", help="print the version and exit"
    )
    _log_level_option(parser, None)
    # --set / --config before the command name are allowed too; they merge with the command's own
    parser.add_argument(
        "--set",
        dest="global_set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config key for the command that follows (repeatable)",
    )
    parser.add_argument(
        "--config", dest="global_config", metavar="FILE.yaml", help="your own preset file for the command that follows"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, help, func):
        p = sub.add_parser(name, help=help, description=help)
        _log_level_option(p, argparse.SUPPRESS)  # given here it wins; absent, the global one stays
        p.set_defaults(func=func)
        return p

    command("presets", "list the shipped presets", cmd_presets)

    p = command("config", "print the resolved config (preset + --config file + --set) as YAML", cmd_config)
    _common(p, out=False)

    p = command("prepare", "materialise a data source and its cached frozen features", cmd_prepare)
    _common(p, out=False)  # everything prepare makes goes to the cache (config key `cache_dir`)

    p = command("experts", "train expert trajectories (torchrun shards them over ranks)", cmd_experts)
    experts_sub = p.add_subparsers(dest="experts_command", metavar="[import]")
    _common(p, out_required=False)
    p.add_argument(
        "--restart",
        action="store_true",
        help="retrain the experts in OUT made with other settings"
        " (without it they are refused, naming the keys that differ)",
    )
    q = experts_sub.add_parser("import", help="import published reference-format replay buffers")
    q.add_argument("--from", dest="source", required=True, help="folder with {img,txt}_replay_buffer_N.pt")
    q.add_argument("--format", default="reference", choices=["reference"], help="layout of the files (reference)")
    q.add_argument("--out", required=True, help="folder for the imported experts")
    q.set_defaults(func=cmd_experts_import)

    p = command("shortcut", "export shortcut (interpolated) trajectories for a snapshot window", cmd_shortcut)
    p.add_argument("--experts", required=True, help="expert folder (from `mmdistill experts`)")
    p.add_argument("--start", type=int, required=True, help="first snapshot of the window")
    p.add_argument("--end", type=int, required=True, help="last snapshot, inclusive")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--format",
        default="native",
        choices=["native", "reference"],
        help="native (safetensors per expert) or reference (replay-buffer .pt files)",
    )

    p = command("distill", "distil the phases of a preset from expert trajectories", cmd_distill)
    _common(p, out_required=True)
    p.add_argument("--experts", required=True, help="expert folder (from `mmdistill experts`)")
    again = p.add_mutually_exclusive_group()
    again.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUT/checkpoints (refused if a key that shapes the distilled data changed)",
    )
    again.add_argument("--restart", action="store_true", help="discard what an earlier distillation left in OUT")

    p = command("evaluate", "train fresh students on synthetic phases and report retrieval recall", cmd_evaluate)
    _common(p, out_required=True)
    p.add_argument(
        "--synthetic",
        required=True,
        help="distilled set: run or distillation folder, an export, or another code base's .pt (--format)",
    )
    p.add_argument(
        "--format",
        default="mmdistill",
        choices=["mmdistill", "ptm-st", "lors"],
        help="layout of --synthetic: mmdistill's own (default) or the PTM-ST / LoRS reference .pt",
    )
    p.add_argument("--runs", type=int, help="students trained per phase set (config key evaluate.runs)")

    p = command("export", "export a distilled set as a Hugging Face imagefolder or datasets.Dataset", cmd_export)
    p.add_argument("source", metavar="RUN_OR_DIR", help="run folder, distillation folder or export")
    p.add_argument(
        "--to",
        required=True,
        choices=["folder", "hf"],
        help="folder: imagefolder layout; hf: datasets.Dataset.save_to_disk (needs mmdistill[hf])",
    )
    p.add_argument("out", metavar="OUT", help="new output folder")
    p.add_argument("--push", metavar="REPO_ID", help="then upload to the Hugging Face Hub as this dataset repo")

    p = command("inspect", "one-screen summary of a distilled set", cmd_inspect)
    p.add_argument("source", metavar="RUN_OR_DIR", help="run folder, distillation folder, export or .pt")
    p.add_argument(
        "--format",
        default="mmdistill",
        choices=["mmdistill", "ptm-st", "lors"],
        help="layout of RUN_OR_DIR: mmdistill's own (default) or the PTM-ST / LoRS reference .pt",
    )

    p = command("run", "prepare -> experts -> distill -> evaluate -> report", cmd_run)
    _common(p, out_required=True)
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue unfinished stages from their files (refused for"
        " experts or a distillation made with other settings)",
    )
    p.add_argument(
        "--restart",
        action="store_true",
        help="with --resume: redo the experts and distillations whose settings changed",
    )

    p = command("demo", "the embedded default end to end (shapes-100), with a summary table", cmd_demo)
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")

    p = command("ablate", "the paper's Table 4 ablation grid", cmd_ablate)
    _common(p, out_required=True)

    p = command(
        "bench", "benchmarks: storage | iteration | quality | budgets | cross-arch | robustness | metrics", cmd_bench
    )
    p.add_argument(
        "what",
        choices=["storage", "iteration", "quality", "budgets", "cross-arch", "robustness", "metrics"],
        help="which benchmark",
    )
    _common(p)
    p.add_argument(
        "--budgets",
        default="100,200,500",
        help="bench budgets: pair counts, one preset of --preset's family each (default 100,200,500)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def _log_level(args) -> int:
    """--log-level, else $MMDISTILL_LOG_LEVEL, else info."""
    name = args.log_level or os.environ.get("MMDISTILL_LOG_LEVEL", "").strip().lower() or "info"
    if name not in LOG_LEVELS:
        raise UserError(f"bad value {name!r} for MMDISTILL_LOG_LEVEL: choose from {', '.join(LOG_LEVELS)}")
    return getattr(logging, name.upper())


class _TqdmHandler(logging.Handler):
    """Messages to stdout through tqdm.write, so that an open progress bar is cleared first and redrawn after,
    instead of the message continuing the bar's line. sys.stdout is looked up per message (it may be replaced)."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stdout)
        except Exception:  # a logging handler must not raise (logging's own contract)
            self.handleError(record)


def setup_logging(level: int) -> None:
    """mmdistill's messages at `level`; other libraries' only from warnings up (their info lines are noise)."""
    root = logging.getLogger()
    if not any(isinstance(h, _TqdmHandler) for h in root.handlers):
        handler = _TqdmHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("mmdistill").setLevel(level)


def _check_log_option(parser, args) -> None:
    spec = getattr(args, "log", None)
    if not spec:
        return
    if spec[0] not in LOG_SINKS:
        parser.error(f"--log: unknown sink {spec[0]!r}; choose from {', '.join(LOG_SINKS)}")
    if spec[0] == "tensorboard" and len(spec) != 2:
        parser.error("--log tensorboard needs one DIR, e.g. --log tensorboard runs/tb")
    if spec[0] == "wandb" and len(spec) > 2:
        parser.error("--log wandb takes at most one DIR (where wandb keeps its files)")


def _end_progress_bars() -> None:
    """Close the progress bars an error left open: an open bar has no line end, so the one-line error message
    would continue the bar's line."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.func is cmd_experts and not ((args.preset or args.config or args.global_config) and args.out):
        parser.error("experts: --preset (or --config) and --out are required")
    if (
        args.func is cmd_bench
        and args.what not in ("metrics", "robustness")
        and not (args.preset or args.config or args.global_config)
    ):
        parser.error(f"bench {args.what}: --preset (or --config) is required")
    _check_log_option(parser, args)
    if (args.global_set or args.global_config) and not hasattr(args, "preset"):
        parser.error(f"{args.command} takes no config: --set and --config apply to the commands that do")
    try:
        setup_logging(_log_level(args))
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
