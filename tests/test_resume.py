"""Resume never silently starts over: distillation, experts, the run ledger and the feature cache are keyed by
what determines their output only; a resume across a change of such a key is refused with the keys that differ,
and `restart` starts over on purpose."""

import json

import pytest
import torch

import mmdistill.distill.engine as distill_module
from mmdistill.config import load_config
from mmdistill.distill.engine import distill, distill_keys
from mmdistill.errors import UserError
from mmdistill.experts.train import train_experts
from mmdistill.pipeline import Ledger
from mmdistill.prepare import prepare
from mmdistill.synthetic import load_synthetic
from mmdistill.utils import digest

pytestmark = pytest.mark.slow  # experts and distillations trained to be resumed


def config(tiny, *extra):
    return load_config("shapes-tiny", tiny[1] + list(extra))


def fingerprint(cfg):
    return digest(distill_keys(cfg))


def test_fingerprint_covers_only_what_determines_the_distilled_data(tiny):
    base = fingerprint(config(tiny))
    for unrelated in (
        "evaluate.runs=7",
        "distill.checkpoint_every=5",
        "distill.snapshot_every=0",
        "distill.max_retries=9",
        "device=cpu",
        "cache_dir=/elsewhere",
    ):
        assert fingerprint(config(tiny, unrelated)) == base, unrelated
    for determining in (
        "distill.lr_init=0.02",
        "distill.phases.0.pairs=12",
        "seed=3",
        "experts.lr_img=0.05",
        "distill.loss=nce",
        "model.temperature=0.1",
    ):
        assert fingerprint(config(tiny, determining)) != base, determining
    assert "evaluate.runs" not in distill_keys(config(tiny))


@pytest.fixture
def interrupted(tiny, tmp_path, monkeypatch):
    """A distillation stopped after phase 0's last iteration, before it was saved (a checkpoint at iteration 2)."""
    monkeypatch.setattr(distill_module.Distiller, "save_phase", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        distill(config(tiny), tiny[0] / "experts", tmp_path)
    monkeypatch.undo()
    assert torch.load(tmp_path / "checkpoints" / "phase-0.pt", weights_only=True)["iteration"] == 2
    return tmp_path


def _history(out):
    return [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_resume_after_changing_an_evaluation_key_continues(tiny, interrupted):
    distill(
        config(tiny, "evaluate.runs=1", "distill.checkpoint_every=3"), tiny[0] / "experts", interrupted, resume=True
    )
    phase0 = [h["iteration"] for h in _history(interrupted) if h["phase"] == 0 and "loss" in h]
    assert phase0 == [0, 1, 2, 3]  # iterations 0, 1 kept from before the interruption, 2 and 3 resumed
    assert len(load_synthetic(interrupted)) == 2


@pytest.mark.slow
def test_resume_after_changing_a_distillation_key_is_refused_naming_it(tiny, interrupted):
    checkpoint = interrupted / "checkpoints" / "phase-0.pt"
    with pytest.raises(UserError) as err:
        distill(
            config(tiny, "distill.lr_init=0.02", "distill.ema_decay=0.9"), tiny[0] / "experts", interrupted, resume=True
        )
    message = str(err.value)
    assert message.startswith(f"cannot resume: {checkpoint} was distilled with other settings (")
    assert "distill.ema_decay: 0.95 -> 0.9" in message and "distill.lr_init: 'auto' -> 0.02" in message
    assert "--restart" in message and "\n" not in message
    assert checkpoint.exists()  # nothing was thrown away


@pytest.mark.slow
def test_an_unfinished_distillation_is_not_overwritten_without_restart(tiny, interrupted):
    with pytest.raises(
        UserError, match="holds an unfinished distillation; continue it with --resume, or discard it with --restart"
    ):
        distill(config(tiny), tiny[0] / "experts", interrupted)
    distill(config(tiny, "distill.lr_init=0.02"), tiny[0] / "experts", interrupted, restart=True)
    phase0 = [h["iteration"] for h in _history(interrupted) if h["phase"] == 0 and "loss" in h]
    assert phase0 == [0, 1, 2, 3]  # started over: one record per iteration, none left from the earlier run
    assert json.loads((interrupted / "meta.json").read_text())["config"]["distill"]["lr_init"] == 0.02


@pytest.mark.slow
def test_resume_refuses_finished_phases_of_other_settings(tiny, tmp_path):
    cfg = config(tiny, "distill.phases.1.iterations=1")
    distill(cfg, tiny[0] / "experts", tmp_path)
    with pytest.raises(
        UserError,
        match=r"phase-0.safetensors was distilled with other settings \("
        r"distill.phases.1.iterations: 1 -> 4\)",
    ):
        distill(config(tiny), tiny[0] / "experts", tmp_path, resume=True)
    distill(
        config(tiny, "distill.phases.1.iterations=1", "evaluate.runs=1"), tiny[0] / "experts", tmp_path, resume=True
    )  # nothing to do: both phases are this config's


def test_experts_of_other_settings_are_refused_naming_the_keys_and_retrained_with_restart(tiny, tmp_path):
    import shutil

    out = tmp_path / "experts"
    shutil.copytree(tiny[0] / "experts", out)
    before = (out / "expert-0000.safetensors").read_bytes()
    train_experts(config(tiny, "evaluate.runs=1", "distill.lr_init=0.5"), out)  # not expert keys: kept as is
    assert (out / "expert-0000.safetensors").read_bytes() == before
    with pytest.raises(UserError) as err:
        train_experts(config(tiny, "experts.lr_img=0.05"), out)
    assert "expert-0000.safetensors was trained with other settings (experts.lr_img: 0.1 -> 0.05)" in str(err.value)
    assert "--restart" in str(err.value)
    train_experts(config(tiny, "experts.lr_img=0.05", "experts.count=1"), out, restart=True)
    assert (out / "expert-0000.safetensors").read_bytes() != before
    train_experts(config(tiny, "experts.lr_img=0.05", "experts.count=1"), out)  # now these settings' experts


def test_ledger_refuses_to_resume_a_precious_stage_of_other_inputs(tmp_path):
    calls = []

    def fn(resume):
        calls.append(resume)
        return {}

    Ledger(tmp_path).stage("distill x", {"config": {"distill.lr_init": 0.1}}, fn, precious=True)
    with pytest.raises(
        UserError,
        match=r"cannot resume stage 'distill x' .*\(config.distill.lr_init: 0.1 -> 0.2\);"
        r" undo the change, or start over with --restart",
    ):
        Ledger(tmp_path, resume=True).stage("distill x", {"config": {"distill.lr_init": 0.2}}, fn, precious=True)
    Ledger(tmp_path, resume=True, restart=True).stage(
        "distill x", {"config": {"distill.lr_init": 0.2}}, fn, precious=True
    )
    Ledger(tmp_path, resume=True).stage("evaluate x", {"runs": 1}, fn)
    Ledger(tmp_path, resume=True).stage("evaluate x", {"runs": 2}, fn)  # not precious: recomputed
    assert calls == [False, False, False, False]


@pytest.mark.slow
def test_feature_cache_is_keyed_by_what_the_features_depend_on(tmp_path):
    shrink = [
        "data.train_images=30",
        "data.val_images=6",
        "data.test_images=6",
        f"cache_dir={tmp_path}",
        "model.image_trainable=false",
        "model.image_encoder=efficientnet_lite0",
        "distill.space=feature",
    ]

    def cached(*extra):
        prepare(load_config("shapes-tiny", shrink + list(extra)))
        return {p.name: p.stat().st_mtime_ns for p in (tmp_path / "features").glob("*.safetensors")}

    first = cached()
    assert len(first) == 6  # text and image features of three splits
    assert cached("distill.lr_init=0.5", "evaluate.runs=1", "experts.lr_img=0.05", "seed=4") == first  # reused
    grown = cached("model.pretrained=false")  # other image features; the text features and the old files stay
    assert set(first) < set(grown) and len(grown) == 9
    assert all(grown[name] == stamp for name, stamp in first.items())
