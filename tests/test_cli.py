"""CLI: console entry and `python -m`, presets listing, one-line user errors without traceback."""
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
    result = subprocess.run([sys.executable, "-m", "mmdistill", "prepare", "--preset", "shapes-100", "--set",
                             "distill.loss=nope"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "mmdistill: error: bad value 'nope' for 'distill.loss'; choose from nce, cwcl, kl, bce, wbce, mse"]


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
