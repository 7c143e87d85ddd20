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
