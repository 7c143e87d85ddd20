"""Shortcut trajectories against a direct per-tensor implementation of the formula, on hand-made experts."""

import pytest
import torch

from mmdistill.errors import UserError
from mmdistill.experts.shortcut import export_shortcut, matching_pair, shortcut_window
from mmdistill.experts.store import ExpertStore, expert_path, trajectory_step_norms, write_expert
from mmdistill.model import GROUPS, ParamLayout

# 'img' has a tensor that never moves ('frozen'): its beta must stay 0 without NaN.
LAYOUTS = {
    "img": ParamLayout(("w", "frozen", "b"), ((3, 2), (4,), (2,))),
    "txt": ParamLayout(("p",), ((5,),)),
}
EPOCHS = 6


def make_trajectory(layout: ParamLayout, seed: int) -> torch.Tensor:
    """[EPOCHS+1, P]: a random walk with uneven step sizes; the tensor named 'frozen' stays put."""
    gen = torch.Generator().manual_seed(seed)
    steps = torch.randn(EPOCHS, layout.numel, generator=gen) * torch.rand(EPOCHS, 1, generator=gen) * 3
    trajectory = torch.cat([torch.randn(1, layout.numel, generator=gen), steps]).cumsum(0)
    if "frozen" in layout.names:
        start = sum(layout.sizes[: layout.names.index("frozen")])
        trajectory[:, start : start + 4] = trajectory[0, start : start + 4]
    return trajectory


def spec_shortcut(trajectory: torch.Tensor, layout: ParamLayout, start: int, end: int, t: int) -> torch.Tensor:
    """PTM-ST's shortcut formula, one parameter tensor at a time, in float64."""
    window = trajectory[start : end + 1].double()
    parts = []
    offset = 0
    for size in layout.sizes:
        piece = window[:, offset : offset + size]
        norms = (piece[1:] - piece[:-1]).norm(dim=1)
        beta = norms[:t].sum() / norms.sum() if norms.sum() > 0 else torch.tensor(0.0, dtype=torch.float64)
        parts.append((1 - beta) * piece[0] + beta * piece[-1])
        offset += size
    return torch.cat(parts)


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """float32 results against the float64 formula (`spec_shortcut`)."""
    torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.fixture
def store(tmp_path):
    for expert in range(2):
        trajectories = {g: make_trajectory(LAYOUTS[g], seed=10 * expert + i) for i, g in enumerate(GROUPS)}
        norms = {g: trajectory_step_norms(trajectories[g], LAYOUTS[g]) for g in GROUPS}
        write_expert(expert_path(tmp_path / "experts", expert), trajectories, norms, LAYOUTS, "float32", {})
    return ExpertStore(tmp_path / "experts")


def test_shortcut_matches_spec_formula():
    layout = LAYOUTS["img"]
    trajectory = make_trajectory(layout, seed=0)
    start, end = 1, 5
    norms = trajectory_step_norms(trajectory, layout)[start:end]
    for t in range(end - start + 1):
        point = shortcut_window(trajectory[start], trajectory[end], norms, layout, t)
        assert torch.isfinite(point).all()
        assert_close(point, spec_shortcut(trajectory, layout, start, end, t))


def test_shortcut_endpoints_exact_and_static_tensor_kept():
    layout = LAYOUTS["img"]
    trajectory = make_trajectory(layout, seed=1)
    norms = trajectory_step_norms(trajectory, layout)
    first, last = trajectory[0], trajectory[EPOCHS]
    assert torch.equal(shortcut_window(first, last, norms, layout, 0), first)
    assert torch.equal(shortcut_window(first, last, norms, layout, EPOCHS), last)
    frozen = layout.unflatten(shortcut_window(first, last, norms, layout, 3))["frozen"]
    assert torch.equal(frozen, layout.unflatten(first)["frozen"])
    with pytest.raises(ValueError):
        shortcut_window(first, last, norms, layout, EPOCHS + 1)


def test_shortcut_moves_each_tensor_at_its_own_pace():
    """A tensor that made all its progress in the first step is at its endpoint after one step."""
    layout = ParamLayout(("early", "late"), ((2,), (2,)))
    trajectory = torch.tensor([[0.0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 2, 2]])
    norms = trajectory_step_norms(trajectory, layout)
    point = shortcut_window(trajectory[0], trajectory[3], norms, layout, 1)
    assert torch.equal(point, torch.tensor([1.0, 1, 0, 0]))


def test_matching_pair_plain_and_shortcut(store, monkeypatch):
    start, target = matching_pair(store, 1, start_epoch=2, expert_epochs=2, shortcut_end=None)
    for g in GROUPS:
        assert torch.equal(start[g], store.snapshot(1, 2)[g])
        assert torch.equal(target[g], store.snapshot(1, 4)[g])

    rows_read = []
    real_rows = ExpertStore._rows

    def spy(self, expert, name, rows):
        rows_read.append((name, rows))
        return real_rows(self, expert, name, rows)

    monkeypatch.setattr(ExpertStore, "_rows", spy)
    start, target = matching_pair(store, 1, start_epoch=1, expert_epochs=2, shortcut_end=5)
    assert {rows for name, rows in rows_read if name in GROUPS} == {0, 5}
    trajectory = store.trajectory(1)
    for g in GROUPS:
        assert_close(start[g], spec_shortcut(trajectory[g], LAYOUTS[g], 0, 5, 1))
        assert_close(target[g], spec_shortcut(trajectory[g], LAYOUTS[g], 0, 5, 3))


def test_export_shortcut_native_and_reference(store, tmp_path):
    export_shortcut(store.folder, tmp_path / "native", 1, 4, fmt="native")
    export_shortcut(store.folder, tmp_path / "reference", 1, 4, fmt="reference")
    native = ExpertStore(tmp_path / "native")
    assert len(native) == 2 and native.epochs == 3
    assert native.metadata(0)["shortcut_window"] == "1,4"
    for expert in range(2):
        original = store.trajectory(expert)
        exported = native.trajectory(expert)
        reference = {
            g: torch.load(tmp_path / "reference" / f"{g}_replay_buffer_{expert}.pt", weights_only=True) for g in GROUPS
        }
        for g in GROUPS:
            assert torch.equal(exported[g][0], original[g][1]) and torch.equal(exported[g][3], original[g][4])
            for t in range(4):
                expected = spec_shortcut(original[g], LAYOUTS[g], 1, 4, t)
                assert_close(exported[g][t], expected)
                assert torch.equal(torch.cat([p.reshape(-1) for p in reference[g][0][t]]), exported[g][t])
            torch.testing.assert_close(native.step_norms(expert)[g], trajectory_step_norms(exported[g], LAYOUTS[g]))


def test_export_shortcut_rejects_bad_window(store, tmp_path):
    with pytest.raises(UserError, match="window"):
        export_shortcut(store.folder, tmp_path / "out", 3, EPOCHS + 1)
    with pytest.raises(UserError, match="window"):
        export_shortcut(store.folder, tmp_path / "out", 4, 4)
