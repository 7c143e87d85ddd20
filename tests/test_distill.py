"""The phase loop on shapes-tiny: outputs, methods on one engine, NaN recovery, SIGKILL + resume bit-identical,
torchrun == one process."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import mmdistill.distill.engine as distill_module
from mmdistill.config import load_config, with_method
from mmdistill.distill.engine import SyntheticSet, distill, plan_phases
from mmdistill.errors import UserError
from mmdistill.experts.train import train_experts
from mmdistill.synthetic import load_synthetic

pytestmark = pytest.mark.slow  # distillations on trained tiny experts

SRC = Path(__file__).resolve().parents[1] / "src"
ENV = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def config(tiny, *extra):
    return load_config("shapes-tiny", tiny[1] + list(extra))


def cli(tiny, out, *extra, torchrun=False):
    """The `mmdistill distill` command line for shapes-tiny."""
    launcher = [sys.executable] + (["-m", "torch.distributed.run", "--nproc_per_node", "2"] if torchrun else [])
    sets = [arg for item in tiny[1] + list(extra) for arg in ("--set", item)]
    return launcher + [
        "-m",
        "mmdistill",
        "distill",
        "--preset",
        "shapes-tiny",
        *sets,
        "--experts",
        str(tiny[0] / "experts"),
        "--out",
        str(out),
    ]


@pytest.fixture(scope="module")
def distilled(tiny):
    out = tiny[0] / "ptm-st"
    distill(config(tiny), tiny[0] / "experts", out)
    return out


def test_outputs_exist_and_are_finite(tiny, distilled):
    cfg = config(tiny)
    phases = load_synthetic(distilled)
    assert len(phases) == len(plan_phases(cfg)) == 2
    for p, phase in enumerate(phases):
        assert phase["images"].shape == (10, 3, 16, 16) and phase["texts"].shape == (10, 384)
        assert phase["sim_full"].shape == (10, 10) and phase["lr_img"].shape == (1,)
        assert all(torch.isfinite(v).all() for v in phase.values() if torch.is_tensor(v))
        assert phase["similarity"] == "full" and phase["space"] == "pixel" and phase["iterations"] == 4
        assert phase["lr_source"] == "ema" and phase["pairs"] == 10 and phase["image_size"] == 16
        assert min(phase["lr_img"].item(), phase["lr_txt"].item()) > 0
        with (
            Image.open(distilled / f"phase-{p}-images.png") as final,
            Image.open(distilled / f"phase-{p}-initial-images.png") as initial,
        ):  # the report shows the set a phase began from beside the one it ended with
            assert final.size == initial.size and final.tobytes() != initial.tobytes()
        captions = json.loads((distilled / f"phase-{p}-captions.json").read_text())
        assert len(captions) == 10 and {"caption", "similarity"} <= captions[0].keys()
    meta = json.loads((distilled / "meta.json").read_text())
    assert meta["method"] == "ptm-st" and meta["lr_source"] == "ema" and meta["config"]["seed"] == 0
    assert [p["iterations_done"] for p in meta["phases"]] == [4, 4]
    history = [json.loads(line) for line in (distilled / "history.jsonl").read_text().splitlines()]
    assert [(h["phase"], h["iteration"]) for h in history if "loss" in h] == [
        (p, k) for p in range(2) for k in range(4)
    ]
    calibrations = [h for h in history if h.get("event") == "calibration"]
    assert [h["phase"] for h in calibrations] == [0, 1]  # one per phase, before its first iteration
    for phase, record in zip(meta["phases"], calibrations):
        assert phase["calibration"]["lr_init"] == record["lr_init"] > 0 and phase["collapse"] is None
        assert set(phase["calibration"]["reasons"]) == {"lr_init", "lr_images", "lr_texts", "lr_sim"}
    assert not list((distilled / "checkpoints").glob("*.pt"))  # removed once their phase is written


def test_plan_phases_applies_the_method_switches(tiny):
    cfg = config(tiny)
    assert [(p.pairs, p.shortcut_end) for p in plan_phases(cfg)] == [(10, 2), (10, 3)]
    merged = plan_phases(with_method(cfg, "st"))  # no phases: one phase over the union of the windows
    assert [(p.pairs, p.iterations, p.start_epochs, p.shortcut_end) for p in merged] == [(20, 8, [0, 2], 3)]
    assert [p.shortcut_end for p in plan_phases(with_method(cfg, "ptm"))] == [None, None]


@pytest.mark.parametrize(
    "method,phases,sim_keys,mode",
    [
        ("mtt-vl", 1, set(), "unroll"),
        ("lors", 1, {"sim_diag", "sim_left", "sim_right"}, "fd"),
        ("ptm-st", 2, {"sim_full"}, "fd"),
        ("ptm-st+blend", 2, {"sim_full"}, "fd"),
    ],
)
def test_methods_share_one_engine(tiny, tmp_path, monkeypatch, method, phases, sim_keys, mode):
    calls = []
    real = distill_module.matching_gradient
    monkeypatch.setattr(
        distill_module,
        "matching_gradient",
        lambda *a, **kw: calls.append((kw["mode"], a[4].blends[0] is not None)) or real(*a, **kw),
    )
    cfg = with_method(config(tiny, "distill.phases.0.iterations=2", "distill.phases.1.iterations=2"), method)
    distill(cfg, tiny[0] / "experts", tmp_path)
    result = load_synthetic(tmp_path)
    assert len(result) == phases and {k for k in result[0] if k.startswith("sim_") and k != "sim_alpha"} == sim_keys
    assert all(torch.isfinite(v).all() for p in result for v in p.values() if torch.is_tensor(v))
    assert set(calls) == {(mode, method.endswith("blend"))} and len(calls) == 4


# The matching loss of the collapsing set of the robustness issue (shapes-100 with 440 images, one caption each,
# 25 pairs per phase; phase 0 before any update) against the student lr, as the calibration scan recorded it.
COLLAPSE_SCAN = [
    (1e-3, 1.9865),
    (1.78e-3, 1.9753),
    (3.16e-3, 1.9549),
    (5.62e-3, 1.9215),
    (1e-2, 1.8737),
    (1.78e-2, 1.8635),
    (3.16e-2, 2.6456),
    (5.62e-2, 5.6059),
    (0.1, 14.105),
    (0.178, 40.913),
]


def _scan_loss(lr: float) -> float:
    """The recorded loss, linear in lr between the scan's points and extended linearly beyond its ends."""
    points = COLLAPSE_SCAN
    (x0, y0), (x1, y1) = next(((a, b) for a, b in zip(points, points[1:]) if lr < b[0]), points[-2:])
    return y0 + (y1 - y0) * (lr - x0) / (x1 - x0)


def _scan_slope(lr: float) -> float:
    return (_scan_loss(lr * (1 + 1e-6)) - _scan_loss(lr)) / (lr * 1e-6)


@pytest.mark.parametrize("update", ["sgd", "log-adam"])
def test_learned_lrs_on_a_recorded_collapsing_trace(tiny, update):
    """The trace of the issue: a first noisy lr gradient (-2.5 and -5.8: the reference's SGD took the lrs from
    0.01 to 0.035 / 0.068), then the recorded landscape. SGD on the lr jumps between the floor and the cliff
    above the minimum, on average worse than not moving the student at all (loss 2); log-adam stays in the
    valley of the scan."""
    dc = config(tiny, f"distill.lr_update={update}", "distill.lr_lr=0.01", "distill.momentum=0.5").distill
    syn = {
        "images": torch.zeros(2, 3),
        "texts": torch.zeros(2, 3),
        "lr_img": torch.tensor([0.01]),
        "lr_txt": torch.tensor([0.01]),
    }
    state = SyntheticSet(syn, dc, {"images": 1.0, "texts": 1.0, "sim": 1.0})
    zero = {k: torch.zeros_like(v) for k, v in syn.items()}
    state.gradient_step({**zero, "lr_img": torch.tensor([-2.5]), "lr_txt": torch.tensor([-5.8])})
    lrs = []
    for _ in range(100):
        slopes = {key: torch.tensor([_scan_slope(state.syn[key].item())]) for key in ("lr_img", "lr_txt")}
        state.gradient_step({**zero, **slopes})
        lrs += [state.syn["lr_img"].item(), state.syn["lr_txt"].item()]
    in_valley = sum(5e-3 < lr < 3.2e-2 for lr in lrs) / len(lrs)
    mean_loss = sum(map(_scan_loss, lrs)) / len(lrs)
    if update == "sgd":
        assert in_valley < 0.5 and mean_loss > 2.0
    else:
        assert in_valley == 1.0 and mean_loss < 1.9


def test_log_adam_moves_an_lr_by_about_lr_lr_per_step_whatever_the_gradient(tiny):
    dc = config(tiny, "distill.lr_update=log-adam", "distill.lr_lr=0.01").distill
    for gradient in (1e-3, 1.0, 1e6):
        syn = {
            "images": torch.zeros(2, 3),
            "texts": torch.zeros(2, 3),
            "lr_img": torch.tensor([0.1]),
            "lr_txt": torch.tensor([0.1]),
        }
        state = SyntheticSet(syn, dc, {"images": 1.0, "texts": 1.0, "sim": 1.0})
        zero = {k: torch.zeros_like(v) for k, v in syn.items()}
        state.gradient_step({**zero, "lr_img": torch.tensor([gradient]), "lr_txt": torch.tensor([-gradient])})
        assert state.syn["lr_img"].item() == pytest.approx(0.1 * math.exp(-0.01), rel=1e-4)
        assert state.syn["lr_txt"].item() == pytest.approx(0.1 * math.exp(0.01), rel=1e-4)


def test_nan_rolls_back_and_halves_the_data_learning_rates(tiny, tmp_path, monkeypatch):
    calls, real = [], distill_module.matching_gradient

    def once_nan(*args, **kwargs):
        calls.append(1)
        loss, grads = real(*args, **kwargs)
        return (float("nan"), grads) if len(calls) == 3 else (loss, grads)

    monkeypatch.setattr(distill_module, "matching_gradient", once_nan)
    distill(config(tiny, "distill.phases.1.iterations=1"), tiny[0] / "experts", tmp_path)
    meta = json.loads((tmp_path / "meta.json").read_text())
    # iteration 2 failed: back to the state before iteration 1's step, data lrs x0.5, iterations 1..3 again
    assert meta["phases"][0]["recoveries"] == [{"iteration": 2, "restart": 1, "lr_factor": 0.5}]
    assert meta["phases"][1]["recoveries"] == []
    assert len(calls) == 4 + 2 + 1
    history = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert [h.get("event") for h in history].count("recovery") == 1
    assert all(torch.isfinite(v).all() for p in load_synthetic(tmp_path) for v in p.values() if torch.is_tensor(v))


def test_persistent_nan_fails_clearly_and_saves_nothing(tiny, tmp_path, monkeypatch):
    real = distill_module.matching_gradient
    monkeypatch.setattr(distill_module, "matching_gradient", lambda *a, **kw: (float("inf"), real(*a, **kw)[1]))
    with pytest.raises(UserError, match="not finite.*after 3 recoveries"):
        distill(config(tiny), tiny[0] / "experts", tmp_path)
    assert not list(tmp_path.glob("phase-*.safetensors"))


def _phase_bytes(out):
    return [(out / f"phase-{p}.safetensors").read_bytes() for p in range(2)]


def test_sigkill_then_resume_is_bit_identical_and_torchrun_matches(tiny, tmp_path):
    """One uninterrupted run (two trajectories per iteration) is the reference for a run killed with SIGKILL
    after its first checkpoint and resumed, and for the same run on two torchrun processes."""
    extra = ["distill.trajectories_per_iter=2", "distill.phases.0.iterations=12", "distill.checkpoint_every=3"]
    whole, killed, ranks = tmp_path / "whole", tmp_path / "killed", tmp_path / "torchrun"
    subprocess.run(cli(tiny, whole, *extra), env=ENV, check=True, capture_output=True)
    process = subprocess.Popen(cli(tiny, killed, *extra), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = killed / "checkpoints" / "phase-0.pt"
    while not checkpoint.exists() and process.poll() is None:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "phase-0.safetensors").exists()  # killed mid phase 0
    assert torch.load(checkpoint, weights_only=True)["iteration"] < 12
    subprocess.run(cli(tiny, killed, *extra) + ["--resume"], env=ENV, check=True, capture_output=True)
    assert _phase_bytes(killed) == _phase_bytes(whole)

    subprocess.run(cli(tiny, ranks, *extra, torchrun=True), env=ENV, check=True, capture_output=True)
    for one, two in zip(load_synthetic(whole), load_synthetic(ranks)):
        for key, value in one.items():
            if torch.is_tensor(value):
                assert torch.allclose(value, two[key], rtol=1e-4, atol=1e-5), key
    assert json.loads((ranks / "meta.json").read_text())["world_size"] == 2


def test_feature_space_phases_show_their_nearest_real_images(tmp_path):
    """Feature-space synthetic images have no pixels: the grid shows the nearest real training image of each."""

    cfg = load_config(
        "shapes-tiny",
        [
            f"cache_dir={tmp_path / 'cache'}",
            "model.image_encoder=efficientnet_lite0",
            "data.image_size=32",
            "model.image_trainable=false",
            "distill.space=feature",
            "experts.count=1",
            "distill.phases.0.iterations=1",
            "distill.phases.1.iterations=1",
        ],
    )
    train_experts(cfg, tmp_path / "experts")
    distill(cfg, tmp_path / "experts", tmp_path / "out")
    for p in (0, 1):
        assert not (tmp_path / "out" / f"phase-{p}-images.png").exists()
        with Image.open(tmp_path / "out" / f"phase-{p}-nearest-images.png") as grid:
            size = cfg.data.image_size  # 10 pairs -> one row of 10 tiles (torchvision pads 2 px around each)
            assert grid.size == (10 * (size + 2) + 2, size + 4)


# -- what is loaded is checked -----------------------------------------------------------------------------
def _rewrite(path, **tensors):
    """Rewrite a safetensors file with some tensors replaced, keeping its metadata (save_tensors refuses NaN)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        content, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    save_file({**content, **tensors}, str(path), metadata=metadata)


def test_fewer_phases_into_an_old_folder_leave_no_stale_phase(tiny, distilled, tmp_path):
    """Distilling one phase where two were: the old phase-1 used to stay and be evaluated with the new phase-0."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(distilled, out)
    one = config(tiny, "distill.phases=[{pairs: 10, iterations: 2, start_epochs: [0, 1], shortcut_end: 2}]")
    distill(one, tiny[0] / "experts", out)
    assert [p["iterations"] for p in load_synthetic(out)] == [2]
    assert sorted(p.name for p in out.glob("phase-*")) == [
        "phase-0-captions.json",
        "phase-0-images.png",
        "phase-0-initial-images.png",
        "phase-0.safetensors",
    ]
    shutil.copy(distilled / "phase-1.safetensors", out)  # a phase file of another config, copied in by hand
    with pytest.raises(UserError, match=f"{out / 'phase-1.safetensors'} is not one of the 1 phases"):
        load_synthetic(out)
    shutil.copy(distilled / "phase-0.safetensors", out)
    (out / "phase-1.safetensors").unlink()
    with pytest.raises(UserError, match=f"{out / 'phase-0.safetensors'} was distilled with another config"):
        load_synthetic(out)


def test_an_unfinished_distillation_is_not_evaluated(tiny, tmp_path, monkeypatch):
    real = distill_module.Distiller.run_phase
    monkeypatch.setattr(
        distill_module.Distiller,
        "run_phase",
        lambda self, p, *a: (_ for _ in ()).throw(KeyboardInterrupt) if p == 1 else real(self, p, *a),
    )
    with pytest.raises(KeyboardInterrupt):
        distill(config(tiny), tiny[0] / "experts", tmp_path)
    assert (tmp_path / "phase-0.safetensors").exists()
    with pytest.raises(UserError, match="no finished distillation"):
        load_synthetic(tmp_path)


def test_non_finite_phase_is_refused_by_evaluate_and_resume(tiny, distilled, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(distilled, out)
    images = load_synthetic(out)[1]["images"].clone()
    images[0, 0, 0, 0] = float("nan")
    _rewrite(out / "phase-1.safetensors", images=images)
    message = f"synthetic phase {out / 'phase-1.safetensors'} holds NaN or Inf values in 'images'"
    with pytest.raises(UserError, match=message):
        load_synthetic(out)
    with pytest.raises(UserError, match=message):  # resume used to take it for a finished phase
        distill(config(tiny), tiny[0] / "experts", out, resume=True)
    _rewrite(out / "phase-1.safetensors", images=torch.zeros(10, 3, 8, 8))
    with pytest.raises(UserError, match=r"'images' has shape \(10, 3, 8, 8\), expected \(10, 3, 16, 16\)"):
        load_synthetic(out)


def test_a_nan_in_an_expert_file_is_reported_as_that_file(tiny, tmp_path):
    import shutil

    experts = tmp_path / "experts"
    shutil.copytree(tiny[0] / "experts", experts)
    from safetensors.torch import load_file

    img = load_file(str(experts / "expert-0001.safetensors"))["img"]
    img[0, 0] = float("nan")  # snapshot 0: every phase of shapes-tiny reads it
    _rewrite(experts / "expert-0001.safetensors", img=img)
    with pytest.raises(UserError, match=f"expert file {experts / 'expert-0001.safetensors'} holds non-finite"):
        distill(config(tiny), experts, tmp_path / "out")


def test_nan_at_the_start_blames_lr_init_and_later_only_the_lrs_that_exist(tiny, tmp_path, monkeypatch):
    with pytest.raises(
        UserError, match="iteration 0 after 3 recoveries; it fails before any update: lower distill.lr_init"
    ) as err:
        distill(config(tiny, "distill.lr_init=1.0e30"), tiny[0] / "experts", tmp_path / "a")
    assert "lr_images" not in str(err.value)
    calls, real = [], distill_module.matching_gradient

    def nan_from_the_second(*args, **kwargs):
        calls.append(1)
        loss, grads = real(*args, **kwargs)
        return (float("nan"), grads) if len(calls) > 1 else (loss, grads)

    monkeypatch.setattr(distill_module, "matching_gradient", nan_from_the_second)
    with pytest.raises(
        UserError, match="iteration 0 after 3 recoveries; lower distill.lr_images / distill.lr_texts \\(halved"
    ) as err:
        distill(with_method(config(tiny), "mtt-vl"), tiny[0] / "experts", tmp_path / "b")
    assert "lr_sim" not in str(err.value)  # mtt-vl learns no similarity matrix


def test_checkpoint_holds_the_state_of_its_iteration_and_a_bad_one_is_named(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(distill_module.Distiller, "save_phase", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):  # stopped after phase 0's last iteration, before it is saved
        distill(config(tiny), tiny[0] / "experts", tmp_path)
    monkeypatch.undo()
    checkpoint = tmp_path / "checkpoints" / "phase-0.pt"
    assert torch.load(checkpoint, weights_only=True)["iteration"] == 2  # checkpoint_every=2: saved after 2 steps
    checkpoint.write_bytes(checkpoint.read_bytes()[:300])  # truncated
    with pytest.raises(UserError) as err:
        distill(config(tiny), tiny[0] / "experts", tmp_path, resume=True)
    message = str(err.value)
    assert message.startswith(f"cannot read checkpoint {checkpoint}: ") and "\n" not in message
    assert "weights_only" not in message


def test_a_phase_that_never_moves_the_student_ends_collapsed_and_says_so(tiny, tmp_path):
    """lrs so small that no step moves anything: the loss stays at the no-move value 2.000 for the whole phase,
    which ends collapsed (meta.json, a history event at the first full window)."""
    still = [f"distill.{key}=1e-9" for key in ("lr_init", "lr_lr", "lr_images", "lr_texts", "lr_sim")]
    one_phase = "distill.phases=[{pairs: 10, iterations: 12, start_epochs: [0, 1], shortcut_end: 2}]"
    out = tmp_path / "still"
    distill(config(tiny, *still, one_phase), tiny[0] / "experts", out)
    collapse = json.loads((out / "meta.json").read_text())["phases"][0]["collapse"]
    assert collapse["iteration"] == 9 and "no-move value 2.000 for 10 iterations" in collapse["reason"]
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [h["iteration"] for h in history if h.get("event") == "collapse"] == [9]
    assert not [h for h in history if h.get("event") == "collapse-ended"]
