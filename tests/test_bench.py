"""`bench iteration`: each gradient mode timed against plain steps in a process of its own, with its own peak."""

import pytest

from mmdistill.bench.iteration import _time_mode, bench_iteration
from mmdistill.config import load_config, to_dict


def test_time_mode_stops_at_its_budget_after_one_timed_pair():
    timed = _time_mode(to_dict(load_config("shapes-tiny")), "fd", 0.0, 5, 1)
    assert timed["repeats"] == 1  # a spent budget still times one iteration and one set of plain steps
    assert timed["seconds"] > 0 and timed["seconds_plain"] > 0 and timed["cpu_seconds"] > 0
    assert 0.1 < timed["peak_rss_gib"] < 64


def test_pixels_through_a_frozen_encoder_are_timed_against_feature_space():
    frozen = load_config("shapes-tiny", ["model.image_trainable=false"])
    timed = _time_mode(to_dict(frozen), "fd", 0.0, 5, 1, against="feature")
    assert timed["repeats"] == 1 and timed["seconds"] > 0 and timed["seconds_plain"] > 0


@pytest.mark.slow
def test_bench_iteration_reports_each_mode_and_its_own_peak():
    result = bench_iteration(load_config("shapes-tiny"), budget_s=0.0, max_repeats=1)
    for suffix in ("", "_tesla"):
        seconds = result[f"seconds_per_iteration{suffix}"], result[f"seconds_plain_steps{suffix}"]
        assert result[f"ratio{suffix}"] == seconds[0] / seconds[1]
        assert result[f"repeats{suffix}"] == 1 and result[f"peak_rss_gib{suffix}"] > 0.1
        assert result[f"cpu_seconds_per_iteration{suffix}"] > 0
    assert result["gradient"] == "fd" and result["syn_steps"] == 3
    assert result["cores"] >= 1 and result["load_before"] >= 0 and result["load_after"] >= 0  # the load is stated
    # fd keeps one parameter copy per step, unroll the whole graph: both grow from 5 to 20 steps, unroll more
    assert result["memory_ratio_20_vs_5_unroll"] > result["memory_ratio_20_vs_5"] > 0
