"""CLI: console entry and `python -m`, presets listing, one-line user errors without traceback."""

import json
import subprocess
import sys

from mmdistill.cli import main


def test_presets_lists_one_line_each(capsys):
    assert main(["presets"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    names = [line.split()[0] for line in lines]
    assert "shapes-100" in names and "flickr30k-500" in names
    assert all(len(line.split(maxsplit=1)) == 2 for line in lines)


def test_user_errors_exit_nonzero_with_one_line(capsys):
    assert main(["prepare", "--preset", "shapes-100", "--set", "data.sorce=shapes"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmdistill: error: unknown config key 'data.sorce'") and "\n" not in err
    assert main(["prepare", "--preset", "nope"]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err


def test_python_dash_m_works_like_the_console_script():
    result = subprocess.run(
        [sys.executable, "-m", "mmdistill", "prepare", "--preset", "shapes-100", "--set", "distill.loss=nope"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "mmdistill: error: bad value 'nope' for 'distill.loss'; choose from nce, cwcl, kl, bce, wbce, mse"
    ]


def test_prepare_has_no_out_option(capsys):
    """prepare writes only to the cache; an --out it silently ignored suggested otherwise."""
    import pytest

    with pytest.raises(SystemExit) as exit_:
        main(["prepare", "--preset", "shapes-tiny", "--out", "somewhere"])
    assert exit_.value.code == 2 and "unrecognized arguments: --out somewhere" in capsys.readouterr().err


def test_os_errors_are_one_line_naming_the_path(monkeypatch, capsys):
    import errno

    import mmdistill.cli as cli

    def fail(args):
        raise OSError(errno.ENOSPC, "No space left on device", "/runs/x/phase-0.safetensors")

    monkeypatch.setattr(cli, "cmd_presets", fail)
    assert main(["presets"]) == 1
    assert capsys.readouterr().err == "mmdistill: error: /runs/x/phase-0.safetensors: no space left on device\n"


def test_version(capsys):
    import pytest

    from mmdistill import __version__

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"mmdistill {__version__}\n"


def test_config_file_equals_the_same_keys_given_by_set(tmp_path, capsys):
    """A --config file is a user preset: its keys give the same config as the same keys as --set, whether it
    names its base preset itself (`inherit`) or --preset does."""
    import yaml

    keys = {
        "distill.method": "lors",
        "distill.use_ema": True,
        "experts.count": 3,
        "data.source": "folder",
        "data.root": str(tmp_path),
        "distill.phases": [{"pairs": 12, "iterations": 2, "start_epochs": [0, 1], "shortcut_end": 2}],
    }
    nested: dict = {}
    for key, value in keys.items():
        section, name = key.split(".")
        nested.setdefault(section, {})[name] = value
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(nested))
    (tmp_path / "based.yaml").write_text(yaml.safe_dump({"inherit": "shapes-tiny", **nested}))
    sets = [arg for key, value in keys.items() for arg in ("--set", f"{key}={json.dumps(value)}")]

    def resolved(*args):
        assert main(["config", *args]) == 0
        return yaml.safe_load(capsys.readouterr().out)

    by_set = resolved("--preset", "shapes-tiny", *sets)
    assert by_set["distill"]["method"] == "lors" and by_set["distill"]["use_ema"] is True
    assert resolved("--preset", "shapes-tiny", "--config", str(tmp_path / "mine.yaml")) == by_set
    assert resolved("--config", str(tmp_path / "based.yaml")) == {**by_set, "name": "based"}
    later = resolved("--preset", "shapes-tiny", "--config", str(tmp_path / "mine.yaml"), "--set", "experts.count=5")
    assert later["experts"]["count"] == 5  # --set comes after the file


def test_config_file_errors_name_the_file_and_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("distill:\n  bogus: 1\n")
    assert main(["run", "--preset", "shapes-tiny", "--config", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert (
        capsys.readouterr().err == f"mmdistill: error: {bad}: unknown config key 'distill.bogus' (did you mean"
        " distill.loss, distill.use_ema, distill?)\n"
    )
    bad.write_text("experts: {count: -1}\n")
    assert main(["config", "--preset", "shapes-tiny", "--config", str(bad)]) == 2
    assert capsys.readouterr().err.startswith(
        f"mmdistill: error: bad value -1 for 'experts.count': must be > 0 (config file {bad})"
    )
    bad.write_text("distill: [1\n")
    assert main(["config", "--config", str(bad)]) == 2
    assert capsys.readouterr().err.startswith(f"mmdistill: error: {bad}:2: invalid YAML")
    assert main(["config", "--config", str(tmp_path / "none.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert main(["run", "--out", str(tmp_path / "o")]) == 2
    assert "give --preset NAME" in capsys.readouterr().err


def test_config_typo_is_reported_before_torch_is_imported():
    """The command parses and validates its config before importing anything heavy, so a typo takes a fraction
    of a second (the time itself is measured in the closing note, not asserted on a loaded machine)."""
    code = (
        "import sys; from mmdistill.cli import main; "
        "rc = main(['--set', 'distill.bogus=1', 'run', '--preset', 'shapes-100', '--out', 'x']); "
        "print(rc, 'torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.split() == ["2", "False"], result.stderr
    assert result.stderr.startswith("mmdistill: error: unknown config key 'distill.bogus'")


def test_log_level_option_and_environment(monkeypatch, capsys):
    import logging

    logger = logging.getLogger("mmdistill")
    assert main(["--log-level", "warning", "config", "--preset", "shapes-tiny"]) == 0
    assert logger.level == logging.WARNING
    assert main(["config", "--preset", "shapes-tiny", "--log-level", "DEBUG"]) == 0
    assert logger.level == logging.DEBUG
    monkeypatch.setenv("MMDISTILL_LOG_LEVEL", "error")
    assert main(["config", "--preset", "shapes-tiny"]) == 0
    assert logger.level == logging.ERROR
    monkeypatch.setenv("MMDISTILL_LOG_LEVEL", "loud")
    assert main(["config", "--preset", "shapes-tiny"]) == 2
    assert "bad value 'loud' for MMDISTILL_LOG_LEVEL" in capsys.readouterr().err
    monkeypatch.delenv("MMDISTILL_LOG_LEVEL")
    main(["config", "--preset", "shapes-tiny"])
    assert logger.level == logging.INFO


def test_every_option_has_help():
    import argparse

    from mmdistill.cli import build_parser

    def parsers(parser):
        yield parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for child in action.choices.values():
                    yield from parsers(child)

    for parser in parsers(build_parser()):
        for action in parser._actions:
            if not isinstance(action, argparse._SubParsersAction):
                assert action.help and "\n" not in action.help, (parser.prog, action.dest)


def test_flat_folder_of_own_data_runs_to_a_report(tmp_path, capsys):
    """A new user's data: metadata.csv (file_name,text) and images under img/; validation and test are carved."""
    import csv

    import numpy as np
    from PIL import Image

    root = tmp_path / "mine"
    (root / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(60):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / "img" / f"{i}.png")
        rows.append([f"img/{i}.png", f"a picture of thing {i % 7} with a {['red', 'blue', 'green'][i % 3]} hue"])
    with open(root / "metadata.csv", "w", newline="") as f:
        csv.writer(f).writerows([["file_name", "text"], *rows])
    out = tmp_path / "out"
    # shapes-tiny sizes its procedural splits (40 validation, 80 test images); emoji-100, as a user would run
    # it, leaves them at 0, so the fractions apply: the same here
    assert (
        main(
            [
                "run",
                "--preset",
                "shapes-tiny",
                "--set",
                "data.source=folder",
                "--set",
                f"data.root={root}",
                "--set",
                "data.val_images=0",
                "--set",
                "data.test_images=0",
                "--set",
                f"cache_dir={tmp_path / 'cache'}",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert (
        "prepared folder in" in printed
        and f"train 48 images / 48 captions ({root / 'metadata.csv'}, less the"
        " carved images); validation 6 images / 6 captions (carved from train: 6 of 60 images, seed 0); test 6"
        " images / 6 captions (carved from train: 6 of 60 images, seed 0)"
        in printed
    )
    assert (out / "report.html").exists() and json.loads((out / "results.json").read_text())["dataset"] == "folder"


def test_set_before_a_command_without_config_is_an_error(capsys):
    import pytest

    with pytest.raises(SystemExit) as exit_:
        main(["--set", "seed=1", "presets"])
    assert exit_.value.code == 2 and "presets takes no config" in capsys.readouterr().err


def test_bench_budgets_errors_are_one_line(tmp_path, capsys):
    """The family of --preset at each of --budgets: a bad list or a missing member is refused before any work."""
    assert main(["bench", "budgets", "--preset", "shapes-large-500", "--budgets", "100,x"]) == 2
    assert "--budgets: expected pair counts like 100,200,500, got '100,x'" in capsys.readouterr().err
    assert main(["bench", "budgets", "--preset", "shapes-large-500", "--budgets", "100,300"]) == 2
    assert "unknown preset 'shapes-large-300'" in capsys.readouterr().err
    mine = tmp_path / "mine.yaml"
    mine.write_text("inherit: shapes-tiny\n")
    assert main(["bench", "budgets", "--config", str(mine)]) == 2  # a config file names no family
    assert "bench budgets: give --preset NAME-<pairs>" in capsys.readouterr().err
