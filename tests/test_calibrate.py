"""`auto` settings measured per phase, the collapse watch, and failed distillations shown as failed."""

import copy
import math

import pytest
import torch

from mmdistill.config import load_config, with_method
from mmdistill.distill.calibrate import (
    LR_GRID,
    LR_MARGIN,
    RELATIVE_STEP,
    SAMPLES,
    _best_lr,
    _windows,
    calibrate,
    expert_epochs_for,
)
from mmdistill.distill.collapse import CollapseWatch, window_for
from mmdistill.distill.engine import Distiller, plan_phases, resolve_expert_epochs
from mmdistill.distill.matching import matching_gradient
from mmdistill.errors import UserError
from mmdistill.evaluation.results import failure_notes, format_table
from mmdistill.experts.store import ExpertStore
from mmdistill.experts.train import train_experts
from mmdistill.prepare import prepare
from mmdistill.similarity import full_matrix

pytestmark = pytest.mark.slow  # calibration scans on trained tiny experts


def _distiller(tiny, cfg):
    bundle = prepare(cfg)
    return Distiller(
        resolve_expert_epochs(cfg, bundle)[0], ExpertStore(tiny[0] / "experts"), bundle, torch.device("cpu")
    )


def _calibrated(distiller):
    """Phase 0, its initial synthetic set, its calibration, and that set at the calibrated lr_init."""
    phase = plan_phases(distiller.cfg)[0]
    syn = distiller.init_synthetic(0, phase)
    result = calibrate(distiller, 0, phase, syn)
    value = torch.full_like(syn["lr_img"], result.lr_init)
    return phase, syn, result, {**syn, "lr_img": value, "lr_txt": value.clone()}


def test_calibration_returns_the_documented_values(tiny):
    cfg = load_config("shapes-tiny", tiny[1])
    distiller = _distiller(tiny, cfg)
    phase, syn, result, at_init = _calibrated(distiller)
    # lr_init: LR_MARGIN x the grid lr with the lowest mean matching loss, which beats a student that stays put
    assert [lr for lr, _ in result.scan] == list(LR_GRID)
    best_lr = min(result.scan, key=lambda item: item[1])[0]
    assert result.lr_init == pytest.approx(LR_MARGIN * best_lr) and min(loss for _, loss in result.scan) < 2.0
    # data lrs: the first SGD step moves each variable by RELATIVE_STEP of its norm, for the mean gradient norm
    # over the same expert windows at lr_init (the pixels, which a trained ConvNet reads here, by what it reads:
    # see the next tests)
    norms = {"texts": [], "sim": []}
    for theta_start, theta_target, plan in _windows(distiller, 0, phase):
        _, grads = matching_gradient(distiller.model, at_init, theta_start, theta_target, plan, **distiller.options)
        norms["texts"].append(grads["texts"].norm().item())
        norms["sim"].append(grads["sim_full"].norm().item())
    assert len(norms["texts"]) == SAMPLES
    for group, key, tensor in (("texts", "lr_texts", "texts"), ("sim", "lr_sim", "sim_full")):
        step = getattr(result, key) * sum(norms[group]) / SAMPLES
        assert step / syn[tensor].norm().item() == pytest.approx(RELATIVE_STEP[group], rel=1e-4)
        assert result.reasons[key].startswith("auto:")


def test_a_low_rank_similarity_is_calibrated_on_the_matrix_it_defines(tiny):
    """LoRS's S = diag(a) + (alpha / r) L R^T: a step on the factors moves S by much more than the factors' own
    norm suggests, so lr_sim is set from the change of the dense S (checked here by finite differences)."""
    cfg = with_method(load_config("shapes-tiny", tiny[1]), "lors")
    distiller = _distiller(tiny, cfg)
    phase, syn, result, at_init = _calibrated(distiller)
    keys = ["sim_diag", "sim_left", "sim_right"]
    n, eps = len(syn["images"]), 1e-3

    def dense(params):
        return full_matrix("lowrank", params, n, cfg.distill.sim_alpha)

    changes = []
    for theta_start, theta_target, plan in _windows(distiller, 0, phase):
        _, grads = matching_gradient(distiller.model, at_init, theta_start, theta_target, plan, **distiller.options)
        moved = dense({k: syn[k].double() + eps * grads[k].double() for k in keys})
        changes.append(((moved - dense({k: syn[k].double() for k in keys})) / eps).norm().item())
    size = dense({k: syn[k] for k in keys}).norm().item()
    relative = result.lr_sim * sum(changes) / len(changes) / size
    assert relative == pytest.approx(RELATIVE_STEP["sim"], rel=1e-2)


def test_pixels_through_a_frozen_encoder_are_calibrated_on_their_features(tiny, tmp_path):
    """The student reads the frozen encoder's features: lr_images moves those by RELATIVE_STEP of their norm in
    the first step (checked with central differences through the encoder in float64)."""
    cfg = load_config("shapes-tiny", [*tiny[1], "model.image_trainable=false", "experts.count=1"])
    train_experts(cfg, tmp_path / "experts")
    bundle = prepare(cfg)
    distiller = Distiller(
        resolve_expert_epochs(cfg, bundle)[0], ExpertStore(tmp_path / "experts"), bundle, torch.device("cpu")
    )
    phase, syn, result, at_init = _calibrated(distiller)
    assert "the images' features" in result.reasons["lr_images"]
    encoder = copy.deepcopy(distiller.model.frozen_image_encoder).double()
    pixels, eps = syn["images"].double(), 1e-5
    changes = []
    for theta_start, theta_target, plan in _windows(distiller, 0, phase):
        _, grads = matching_gradient(distiller.model, at_init, theta_start, theta_target, plan, **distiller.options)
        step = eps * grads["images"].double()
        changes.append(((encoder(pixels + step) - encoder(pixels - step)) / (2 * eps)).norm().item())
    relative = result.lr_images * sum(changes) / len(changes) / encoder(pixels).norm().item()
    assert relative == pytest.approx(RELATIVE_STEP["images"], rel=1e-3)


def test_pixels_a_trained_encoder_reads_are_calibrated_on_its_embeddings(tiny):
    """The student reads pixels through its own encoder, which the expert windows start at different parameters:
    lr_images moves the embeddings that encoder gives them at each window's start by RELATIVE_STEP of their
    mean norm in the first step (central differences through a float64 copy of the student). A step of 10 % of
    the pixels' own norm turned shapes-scratch-100's images into noise (see calibrate.py)."""
    cfg = load_config("shapes-tiny", tiny[1])
    distiller = _distiller(tiny, cfg)
    phase, syn, result, at_init = _calibrated(distiller)
    assert "the student encoder's embeddings of the images" in result.reasons["lr_images"]
    student = copy.deepcopy(distiller.model).double()
    pixels, eps = syn["images"].double(), 1e-5
    changes, sizes = [], []
    for theta_start, theta_target, plan in _windows(distiller, 0, phase):
        _, grads = matching_gradient(distiller.model, at_init, theta_start, theta_target, plan, **distiller.options)
        student.set_flat({group: flat.double() for group, flat in theta_start.items()})
        step = eps * grads["images"].double()
        with torch.no_grad():
            moved = (student.encode_image(pixels + step) - student.encode_image(pixels - step)) / (2 * eps)
            sizes.append(student.encode_image(pixels).norm().item())
        changes.append(moved.norm().item())
    assert max(sizes) > 1.01 * min(sizes)  # the windows start at different parameters
    relative = result.lr_images * sum(changes) / sum(sizes)
    assert relative == pytest.approx(RELATIVE_STEP["images"], rel=1e-3)


def test_configured_values_win_and_identity_similarity_needs_no_lr(tiny):
    cfg = with_method(load_config("shapes-tiny", tiny[1] + ["distill.lr_init=0.02", "distill.lr_texts=3"]), "mtt-vl")
    distiller = _distiller(tiny, cfg)
    phase = plan_phases(cfg)[0]
    result = calibrate(distiller, 0, phase, distiller.init_synthetic(0, phase))
    assert result.lr_init == 0.02 and result.lr_texts == 3.0 and result.scan == []
    assert result.reasons["lr_init"] == result.reasons["lr_texts"] == "set in the config"
    assert result.lr_sim == 0.0 and "no parameters" in result.reasons["lr_sim"]  # S = I has nothing to learn
    assert result.lr_images > 0


@pytest.mark.parametrize("text, value", [("auto", "auto"), ("1e-3", 0.001), ("2", 2.0), ("0.5", 0.5)])
def test_auto_settings_parse(text, value):
    assert load_config("shapes-tiny", [f"distill.lr_init={text}"]).distill.lr_init == value


@pytest.mark.parametrize(
    "override",
    [
        "distill.lr_init=0",
        "distill.lr_images=-1",
        "distill.lr_texts=.inf",
        "distill.lr_sim=.nan",
        "distill.lr_init=fast",
        "distill.lr_lr=-0.1",
    ],
)
def test_unusable_lrs_are_rejected_naming_the_key(override):
    with pytest.raises(UserError, match=override.split("=")[0].replace(".", r"\.")):
        load_config("shapes-tiny", [override])


def test_watch_flags_a_flat_loss_at_the_no_move_value():
    watch = CollapseWatch(no_move=2.0, lr_init=0.01, iterations=100)
    window = window_for(100)
    healthy = [2.06, 1.98, 1.95] + [1.9] * 20  # starts above 2 (an overshoot), then learns
    assert not any(watch.update(loss, (0.01, 0.01), k) for k, loss in enumerate(healthy))
    flat = [2.0, 2.0001, 1.9995, 2.3, 2.0] * 4
    fired = [watch.update(loss, (0.01, 0.01), len(healthy) + k) for k, loss in enumerate(flat)]
    # once, after a full window of no progress, and it stays collapsed while the loss stays flat
    assert fired.index("collapsed") == window - 1 and fired.count("collapsed") == 1 and "recovered" not in fired
    assert watch.collapse["iteration"] == len(healthy) + window - 1 and "no-move" in watch.collapse["reason"]


def test_a_phase_that_stalls_then_learns_ends_healthy():
    """shapes-large-500's phase 1 with the shortcut: the loss sat at 2.000 for its first 20 iterations while the
    small calibrated lr grew, then fell to 1.71. It was reported FAILED; only a phase that ends collapsed is."""
    watch = CollapseWatch(no_move=2.0, lr_init=0.003, iterations=200)
    window = window_for(200)
    stalled = [2.0, 1.9995, 2.0001] * 8
    events = [watch.update(loss, (0.003, 0.003), k) for k, loss in enumerate(stalled)]
    assert events.index("collapsed") == window - 1 and watch.collapse is not None
    learning = [1.95, 1.9, 1.8, 1.71]
    events = [watch.update(loss, (0.05, 0.06), len(stalled) + k) for k, loss in enumerate(learning)]
    assert events[0] == "recovered" and events[1:] == [None] * 3 and watch.collapse is None
    for k in range(window):  # flat again for a whole window: collapsed again, the phase's state at its end
        watch.update(2.0, (0.05, 0.06), 100 + k)
    assert watch.collapse is not None and watch.collapse["iteration"] == 100 + window - 1


def test_watch_flags_learned_lrs_that_vanished():
    watch = CollapseWatch(no_move=2.0, lr_init=0.01, iterations=100)
    assert watch.update(1.5, (0.001, 0.0002), 0) is None  # one lr still at a tenth of lr_init
    assert watch.update(1.5, (9e-5, 2e-5), 1) == "collapsed" and "lr_init" in watch.collapse["reason"]
    assert watch.update(1.5, (9e-5, 2e-5), 2) is None and watch.collapse is not None
    assert watch.update(1.5, (0.002, 0.001), 3) == "recovered" and watch.collapse is None  # the lrs grew back


def test_merged_branches_have_a_no_move_value_of_one():
    watch = CollapseWatch(no_move=1.0, lr_init=0.01, iterations=10)
    assert "collapsed" in [watch.update(1.0, (0.01, 0.01), k) for k in range(window_for(10))]


def _entry(r_mean: float, **extra) -> dict:
    metrics = {m: r_mean for m in ("IR@1", "IR@5", "IR@10", "TR@1", "TR@5", "TR@10")}
    return {**metrics, "r_mean": r_mean, "r_mean_std": 0.5, "runs": 3, **extra}


def test_a_collapsed_or_below_random_distillation_is_shown_as_failed():
    collapse = {"phase": 0, "iteration": 12, "reason": "matching loss at or above the no-move value"}
    methods = {
        "ptm-st": _entry(4.7, collapsed_phases=[collapse]),
        "lors": _entry(20.0, collapsed_phases=[]),
        "mtt-vl": _entry(30.0, collapsed_phases=[]),
        "random": _entry(26.5),
        "full": _entry(40.9),
    }
    table = format_table(methods).splitlines()
    rows = {line.split()[0]: line for line in table[1:6]}
    assert rows["ptm-st"].endswith("FAILED") and rows["lors"].endswith("BELOW RANDOM")
    assert not rows["mtt-vl"].endswith("RANDOM") and not rows["random"].endswith("RANDOM")
    notes = failure_notes(methods)
    assert any("ptm-st FAILED: phase 0 collapsed at iteration 12" in note for note in notes)
    assert any("lors r_mean 20.0 is below the random coreset's 26.5" in note for note in notes)
    assert all(note in table for note in notes) and not any(math.isnan(e["r_mean"]) for e in methods.values())


@pytest.mark.parametrize("captions, batch, expected", [(440, 128, 2), (5000, 128, 1), (100, 128, 4), (40, 128, 4)])
def test_auto_expert_epochs_hold_as_many_expert_steps_as_synthetic_steps(captions, batch, expected):
    cfg = load_config("shapes-100", [f"experts.batch_size={batch}"])  # 8 synthetic steps; windows leave room for 4
    value, reason = expert_epochs_for(cfg, plan_phases(cfg), captions)
    assert value == expected and reason.startswith("auto:")
    if captions == 40:  # 1 step per epoch would want 8 epochs; phase 1 (start < 3, end 7) leaves room for 5,
        assert "room" in reason  # phase 0 (start < 2, end 5) for 4
    fixed, why = expert_epochs_for(load_config("shapes-100", ["distill.expert_epochs=3"]), plan_phases(cfg), 40)
    assert fixed == 3 and why == "set in the config"


def test_a_scan_where_no_lr_beats_standing_still_starts_at_the_edge_of_the_cliff():
    """The recorded phase-1 scan of shapes with 3,000 images: the minimum is the smallest lr (2.000), where the
    phase would never start (it was flagged as collapsed); the largest lr within 1 % of 2.000 is taken instead."""
    scan = [
        (1e-6, 2.0000),
        (1e-4, 2.0002),
        (1e-3, 2.0034),
        (5.6e-3, 2.0144),
        (1e-2, 2.0132),
        (1.8e-2, 2.0046),
        (3.2e-2, 2.0037),
        (5.6e-2, 2.0960),
        (0.1, 2.5439),
    ]
    lr, why = _best_lr(scan, 2.0)
    assert lr == 3.2e-2 and "no lr" in why
    healthy = [(1e-3, 1.9865), (1e-2, 1.8737), (1.8e-2, 1.8635), (3.2e-2, 2.6456)]
    assert _best_lr(healthy, 2.0)[0] == 1.8e-2  # an lr that beats standing still: the plain minimum


def test_a_later_phase_that_nothing_beats_starts_at_its_predecessors_lr(tiny, monkeypatch):
    """The scan rises from the no-move loss at every lr (shapes-large's phase 1): the edge rule alone would start
    at a tenth of phase 0's lr; the phase starts at phase 0's lr instead. A scan that beats standing still, or
    a first phase, keeps its own measurement."""
    cfg = load_config("shapes-tiny", tiny[1])
    distiller = _distiller(tiny, cfg)
    phase = plan_phases(cfg)[1]
    syn = distiller.init_synthetic(1, phase)
    rising = lambda d, s, w, lr: 2.0 + 0.03 * (lr / 0.01) ** 2  # noqa: E731 - 2.03 at 0.01, 2.0095 at 5.6e-3
    monkeypatch.setattr("mmdistill.distill.calibrate._mean_loss", rising)
    edge = calibrate(distiller, 1, phase, syn)
    assert edge.lr_init == pytest.approx(LR_MARGIN * 10 ** (-9 / 4))  # the largest lr within 1 %: 5.6e-3
    floored = calibrate(distiller, 1, phase, syn, previous_lr_init=0.028)
    assert floored.lr_init == 0.028 and "the lr phase 0 started at" in floored.reasons["lr_init"]
    assert floored.lr_images != edge.lr_images  # the data lrs are measured at the lr the phase starts at
    below = calibrate(distiller, 1, phase, syn, previous_lr_init=1e-4)
    assert below.lr_init == edge.lr_init  # a floor under the edge's lr changes nothing
    falling = lambda d, s, w, lr: 2.0 - lr  # noqa: E731 - every lr beats standing still
    monkeypatch.setattr("mmdistill.distill.calibrate._mean_loss", falling)
    assert calibrate(distiller, 1, phase, syn, previous_lr_init=0.028).lr_init == pytest.approx(LR_MARGIN * 1.0)
