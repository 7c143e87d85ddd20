"""Metrics sinks: TensorBoard event files read back, wandb through an injected module, and the no-sink default."""

import importlib.util

import pytest

from mmdistill.errors import UserError
from mmdistill.tracking import TensorBoardSink, WandbSink, log_scalars, log_table, open_sink, tracking


def test_tensorboard_sink_writes_scalars_that_tensorboard_reads(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with tracking(open_sink("tensorboard", str(tmp_path))):
        for step, loss in enumerate([2.0, 1.5, 1.25]):
            log_scalars("distill/ptm-st/phase-0", {"loss": loss, "lr_img": 0.01, "skipped": None}, step)
        log_table({"ptm-st": {"r_mean": 38.1, "runs": 3, "protocol": "val", "std": {"r_mean": 0.2}}})
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {
        "distill/ptm-st/phase-0/loss",
        "distill/ptm-st/phase-0/lr_img",
        "results/ptm-st/r_mean",
        "results/ptm-st/runs",
    }
    assert [(e.step, e.value) for e in events.Scalars("distill/ptm-st/phase-0/loss")] == [(0, 2.0), (1, 1.5), (2, 1.25)]
    assert events.Scalars("results/ptm-st/r_mean")[0].value == pytest.approx(38.1)


class FakeWandb:
    """What WandbSink uses of the wandb module: init -> run with define_metric, log, finish."""

    def __init__(self):
        self.calls = []

    def init(self, **kwargs):
        self.calls.append(("init", kwargs))
        return self

    def define_metric(self, name, step_metric=None):
        self.calls.append(("define_metric", name, step_metric))

    def log(self, values):
        self.calls.append(("log", values))

    def finish(self):
        self.calls.append(("finish",))


def test_wandb_sink_is_offline_by_default_and_steps_each_group(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    fake = FakeWandb()
    with tracking(WandbSink(str(tmp_path), wandb_module=fake)):
        log_scalars("experts/expert-0", {"loss": 1.0}, 1)
        log_scalars("experts/expert-0", {"loss": 0.5}, 2)
    assert fake.calls == [
        ("init", {"project": "mmdistill", "dir": str(tmp_path), "mode": "offline"}),
        ("define_metric", "experts/expert-0/step", None),
        ("define_metric", "experts/expert-0/*", "experts/expert-0/step"),
        ("log", {"experts/expert-0/step": 1, "experts/expert-0/loss": 1.0}),
        ("log", {"experts/expert-0/step": 2, "experts/expert-0/loss": 0.5}),
        ("finish",),
    ]


def test_no_sink_is_a_no_op_and_a_missing_package_names_the_extra(tmp_path):
    log_scalars("distill/x", {"loss": 1.0}, 0)  # outside `tracking`: nothing to write to, nothing happens
    with tracking(None):
        log_scalars("distill/x", {"loss": 1.0}, 0)
    if importlib.util.find_spec("wandb") is None:  # as here: wandb is an optional extra
        with pytest.raises(UserError, match=r"--log wandb needs the wandb package: pip install 'mmdistill\[wandb\]'"):
            open_sink("wandb", str(tmp_path))


def test_tensorboard_sink_takes_an_injected_writer(tmp_path):
    written = []

    class Writer:
        def __init__(self, log_dir):
            written.append(("dir", log_dir))

        def add_scalar(self, tag, value, step):
            written.append((tag, value, step))

        def close(self):
            written.append("closed")

    with tracking(TensorBoardSink(str(tmp_path), writer_class=Writer)):
        log_scalars("experts/expert-1", {"val_r_mean": 12}, 3)
    assert written == [("dir", str(tmp_path)), ("experts/expert-1/val_r_mean", 12.0, 3), "closed"]
