"""Bad inputs end to end on shapes-tiny: every case must fail with exit status != 0, one line on stderr naming the
file or key, no traceback, and no output that a later command would take for a valid result.

Each case is run through `mmdistill.cli.main` (what `python -m mmdistill` runs) with stderr captured at the file
descriptor, so DataLoader workers and warnings would show too. Progress bars are not error output and are left out.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import mmdistill.io as io_module
from mmdistill.cli import main

pytestmark = pytest.mark.slow  # every case runs a command end to end on a trained tiny world

PROGRESS = re.compile(r"\d+/\d+ \[")  # a tqdm bar: "phase 0:  25%|##  | 1/4 [00:00<...]"
# Another command holding a folder: io.folder_lock's protocol written out, so the case also runs on code without it.
HOLD = """import fcntl, os, sys, time
fd = os.open(os.path.join(sys.argv[1], ".mmdistill.lock"), os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.pwrite(fd, f"{os.getpid()}\\n".encode(), 0)
print("held", flush=True)
time.sleep(60)
"""


class World:
    """Shared inputs: a tiny run's experts and distilled phases, and a small image-file dataset."""

    def __init__(self, root: Path):
        self.root = root
        self.sets = ["--set", f"cache_dir={root / 'cache'}", "--device", "cpu"]
        self.experts, self.distilled = root / "experts", root / "distilled"
        assert main(["experts", "--preset", "shapes-tiny", *self.sets, "--out", str(self.experts)]) == 0
        assert (
            main(
                [
                    "distill",
                    "--preset",
                    "shapes-tiny",
                    *self.sets,
                    "--experts",
                    str(self.experts),
                    "--out",
                    str(self.distilled),
                ]
            )
            == 0
        )

    def cmd(self, command: str, *args) -> list[str]:
        return [command, "--preset", "shapes-tiny", *self.sets, *map(str, args)]

    def copy(self, source: Path, target: Path) -> Path:
        shutil.copytree(source, target, ignore=shutil.ignore_patterns(".mmdistill.lock"))
        return target

    def image_folder(self, target: Path) -> Path:
        """The `folder` layout: 12 train, 4 validation, 4 test images (16x16 PNGs), one caption each."""
        for split, count in (("train", 12), ("validation", 4), ("test", 4)):
            (target / split).mkdir(parents=True)
            rows = []
            for i in range(count):
                pixels = np.full((16, 16, 3), 20 * i, np.uint8)
                Image.fromarray(pixels).save(target / split / f"{i}.png")
                rows.append(json.dumps({"file_name": f"{i}.png", "text": f"a square of shade {i}"}))
            (target / split / "metadata.jsonl").write_text("\n".join(rows) + "\n")
        return target

    def folder_sets(self, data: Path) -> list[str]:
        return ["--set", "data.source=folder", "--set", f"data.root={data}"]


def rewrite(path: Path, **tensors) -> None:
    """A safetensors file with some tensors replaced, metadata kept (save_tensors would refuse a NaN)."""
    with safe_open(str(path), framework="pt") as f:
        content, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    save_file({**content, **tensors}, str(path), metadata=metadata)


def with_nan(path: Path, name: str) -> None:
    with safe_open(str(path), framework="pt") as f:
        tensor = f.get_tensor(name).clone()
    tensor.view(-1)[0] = float("nan")
    rewrite(path, **{name: tensor})


def fails(argv) -> bool:
    """A later command reads the folder as invalid (any non-zero exit)."""
    return main(argv) != 0


class Payload:
    marker = None

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# -- the cases --------------------------------------------------------------------------------------------------
# Each takes (world, tmp_path, fx: monkeypatch and lock holders) and returns (argv, what the error line must name,
# a check that nothing a later command would accept was left).
def config_value(override, key):
    def case(world, tmp, fx):
        out = tmp / "run"
        args = ["--device", override[len("device=") :]] if override.startswith("device=") else ["--set", override]
        return world.cmd("run", "--out", out, *args), [key], lambda: not out.exists()

    return case


def too_many_pairs(world, tmp, fx):
    out = tmp / "run"
    return (
        world.cmd("run", "--out", out, "--set", "distill.phases.0.pairs=5000"),
        ["'distill.phases.0.pairs'"],
        lambda: not (out / "experts").exists() and not (out / "results.json").exists(),
    )


def corrupt_image(command):
    def case(world, tmp, fx):
        data = world.image_folder(tmp / "data")
        bad = data / "train" / "3.png"
        bad.write_bytes(bad.read_bytes()[:40])
        out = tmp / "experts"
        argv = world.cmd(command, *world.folder_sets(data)) + (["--out", str(out)] if command == "experts" else [])
        return argv, [str(bad)], lambda: not list(out.glob("expert-*.safetensors"))

    return case


def missing_image(world, tmp, fx):
    data = world.image_folder(tmp / "data")
    (data / "validation" / "2.png").unlink()
    return world.cmd("prepare", *world.folder_sets(data)), [str(data / "validation" / "2.png")], lambda: True


def empty_caption(world, tmp, fx):
    data = world.image_folder(tmp / "data")
    metadata = data / "test" / "metadata.jsonl"
    lines = metadata.read_text().splitlines()
    lines[2] = json.dumps({"file_name": "2.png", "text": "  ...  "})
    metadata.write_text("\n".join(lines) + "\n")
    return world.cmd("prepare", *world.folder_sets(data)), [f"{metadata}:3"], lambda: True


def nan_expert(world, tmp, fx):
    experts = world.copy(world.experts, tmp / "experts")
    with_nan(experts / "expert-0001.safetensors", "img")
    out = tmp / "distilled"
    return (
        world.cmd("distill", "--experts", experts, "--out", out),
        [str(experts / "expert-0001.safetensors")],
        lambda: fails(world.cmd("evaluate", "--synthetic", out, "--out", tmp / "results.json")),
    )


def truncated_expert(world, tmp, fx):
    experts = world.copy(world.experts, tmp / "experts")
    path = experts / "expert-0000.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    out = tmp / "distilled"
    return (world.cmd("distill", "--experts", experts, "--out", out), [str(path)], lambda: not out.exists())


def nan_phase(command):
    def case(world, tmp, fx):
        distilled = world.copy(world.distilled, tmp / "distilled")
        with_nan(distilled / "phase-1.safetensors", "texts")
        results = tmp / "results.json"
        if command == "evaluate":
            argv = world.cmd("evaluate", "--synthetic", distilled, "--out", results)
        else:
            argv = world.cmd("distill", "--experts", world.experts, "--out", distilled, "--resume")
        return (
            argv,
            [str(distilled / "phase-1.safetensors")],
            lambda: not results.exists() and fails(world.cmd("evaluate", "--synthetic", distilled, "--out", results)),
        )

    return case


def extra_phase(world, tmp, fx):
    distilled = world.copy(world.distilled, tmp / "distilled")
    shutil.copy(distilled / "phase-1.safetensors", distilled / "phase-2.safetensors")
    results = tmp / "results.json"
    return (
        world.cmd("evaluate", "--synthetic", distilled, "--out", results),
        [str(distilled / "phase-2.safetensors")],
        lambda: not results.exists(),
    )


def unfinished(world, tmp, fx):
    distilled = world.copy(world.distilled, tmp / "distilled")
    (distilled / "meta.json").unlink()
    results = tmp / "results.json"
    return (
        world.cmd("evaluate", "--synthetic", distilled, "--out", results),
        [str(distilled)],
        lambda: not results.exists(),
    )


def corrupt_meta(world, tmp, fx):
    distilled = world.copy(world.distilled, tmp / "distilled")
    (distilled / "meta.json").write_text('{"method": "ptm-st", "phases": [')
    results = tmp / "results.json"
    return (
        world.cmd("evaluate", "--synthetic", distilled, "--out", results),
        [str(distilled / "meta.json")],
        lambda: not results.exists(),
    )


def bad_checkpoint(kind):
    def case(world, tmp, fx):
        distilled = world.copy(world.distilled, tmp / "distilled")
        for path in distilled.glob("phase-1*"):
            path.unlink()
        checkpoint = distilled / "checkpoints" / "phase-1.pt"
        if kind == "truncated":
            torch.save({"iteration": 2, "syn": {"images": torch.zeros(10, 3, 16, 16)}}, checkpoint)
            checkpoint.write_bytes(checkpoint.read_bytes()[:500])
        else:
            Payload.marker = tmp / "executed"
            torch.save({"fingerprint": Payload()}, checkpoint)
        argv = world.cmd("distill", "--experts", world.experts, "--out", distilled, "--resume")
        return (
            argv,
            [str(checkpoint)],
            lambda: (
                not (tmp / "executed").exists()
                and fails(world.cmd("evaluate", "--synthetic", distilled, "--out", tmp / "results.json"))
            ),
        )

    return case


def locked(command):
    def case(world, tmp, fx):
        out = tmp / "out"
        out.mkdir()
        holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
        fx.holders.append(holder)
        assert holder.stdout.readline().strip() == "held"
        if command == "run":
            argv = world.cmd("run", "--out", out)
        else:
            argv = world.cmd("distill", "--experts", world.experts, "--out", out)

        def untouched():
            return sorted(p.name for p in out.iterdir()) == [".mmdistill.lock"]

        return argv, [str(out), f"pid {holder.pid}"], untouched

    return case


def read_only(world, tmp, fx):
    real = io_module.tempfile.mkstemp
    out = tmp / "distilled"

    def mkstemp(*args, dir=None, **kwargs):  # what a read-only mount answers inside `out`
        if Path(dir).is_relative_to(out):
            raise OSError(30, "Read-only file system", str(dir))
        return real(*args, dir=dir, **kwargs)

    fx.monkeypatch.setattr(io_module.tempfile, "mkstemp", mkstemp)
    return (
        world.cmd("distill", "--experts", world.experts, "--out", out),
        [str(out), "read-only file system"],
        lambda: not (out / "meta.json").exists(),
    )


def full_disk(world, tmp, fx):
    def save_file_full(*args, **kwargs):  # what safetensors raises on a full disk (seen on a 64 KiB tmpfs)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    fx.monkeypatch.setattr(io_module, "save_file", save_file_full)
    out = tmp / "distilled"
    return (
        world.cmd("distill", "--experts", world.experts, "--out", out),
        [str(out), "no space left on device"],
        lambda: not (out / "meta.json").exists(),
    )


CASES = {
    "lr_init nan": config_value("distill.lr_init=nan", "'distill.lr_init'"),
    "lr_init 0": config_value("distill.lr_init=0", "'distill.lr_init'"),
    "lr_init negative": config_value("distill.lr_init=-0.1", "'distill.lr_init'"),
    "lr_images negative": config_value("distill.lr_images=-1", "'distill.lr_images'"),
    "lr_texts inf": config_value("distill.lr_texts=inf", "'distill.lr_texts'"),
    "experts.lr_img nan": config_value("experts.lr_img=nan", "'experts.lr_img'"),
    "max_retries negative": config_value("distill.max_retries=-1", "'distill.max_retries'"),
    "device tpu": config_value("device=tpu", "'device'"),
    "unknown key": config_value("distill.lr_imgs=1", "'distill.lr_imgs'"),
    "pairs beyond the training set": too_many_pairs,
    "corrupt image, prepare": corrupt_image("prepare"),
    "corrupt image, experts": corrupt_image("experts"),
    "missing image": missing_image,
    "empty caption": empty_caption,
    "NaN in an expert file": nan_expert,
    "truncated expert file": truncated_expert,
    "NaN phase, evaluate": nan_phase("evaluate"),
    "NaN phase, distill --resume": nan_phase("distill"),
    "phase file beyond meta.json": extra_phase,
    "unfinished distillation": unfinished,
    "corrupt meta.json": corrupt_meta,
    "truncated checkpoint": bad_checkpoint("truncated"),
    "malicious checkpoint": bad_checkpoint("malicious"),
    "locked folder, distill": locked("distill"),
    "locked folder, run": locked("run"),
    "read-only output folder": read_only,
    "full disk": full_disk,
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return World(tmp_path_factory.mktemp("world"))


@pytest.fixture
def holders():
    started = []
    yield started
    for holder in started:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("name", CASES)
def test_bad_input_fails_with_one_line_and_leaves_nothing_valid(name, world, tmp_path, capfd, monkeypatch, holders):
    fx = SimpleNamespace(monkeypatch=monkeypatch, holders=holders)
    argv, names, nothing_valid = CASES[name](world, tmp_path, fx)
    capfd.readouterr()
    status = main(argv)
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not PROGRESS.search(line)]
    assert status != 0, err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("mmdistill: error: "), err
    assert all(part in lines[0] for part in names), lines[0]
    monkeypatch.undo()
    assert nothing_valid()
