import pytest
import torch

from mmdistill.coresets import CORESETS, forgetting, herding, kcenter, random_pairs, select_coreset


def gen(seed):
    return torch.Generator().manual_seed(seed)


def features(n=200, d=16, seed=0):
    return torch.randn(n, d, generator=gen(seed))


def assert_valid(picks, k, n):
    assert picks.dtype == torch.long and picks.shape == (k,)
    assert len(set(picks.tolist())) == k
    assert picks.min() >= 0 and picks.max() < n


@pytest.mark.parametrize("method", CORESETS)
def test_distinct_exact_size_and_deterministic(method):
    x = features()
    history = torch.rand(6, 200, generator=gen(1)) > 0.4
    kwargs = dict(features=x, correct_history=history, num_items=200)
    picks = select_coreset(method, 30, generator=gen(7), **kwargs)
    assert_valid(picks, 30, 200)
    assert torch.equal(picks, select_coreset(method, 30, generator=gen(7), **kwargs))


@pytest.mark.parametrize("select", [lambda g: random_pairs(200, 20, g), lambda g: kcenter(features(), 20, g)])
def test_seed_changes_selection(select):
    assert not torch.equal(select(gen(0)), select(gen(1)))


def test_whole_set_is_a_permutation():
    x = features(n=25)
    for picks in (herding(x, 25), kcenter(x, 25, gen(0)), random_pairs(25, 25, gen(0))):
        assert sorted(picks.tolist()) == list(range(25))


def test_herding_first_pick_is_closest_to_mean():
    x = features()
    assert herding(x, 1).item() == (x - x.mean(0)).norm(dim=1).argmin().item()


def test_herding_mean_tracks_full_mean():
    x = features(n=500)
    herded = (x[herding(x, 20)].mean(0) - x.mean(0)).norm()
    random = torch.stack([(x[random_pairs(500, 20, gen(s))].mean(0) - x.mean(0)).norm() for s in range(20)])
    assert herded < random.min()


def test_kcenter_covers_planted_far_cluster():
    blob = torch.randn(300, 8, generator=gen(0))
    far = torch.randn(5, 8, generator=gen(1)) * 0.1 + 50.0
    x = torch.cat([blob, far])
    for seed in range(5):
        picks = kcenter(x, 2, gen(seed)).tolist()
        assert sum(p >= 300 for p in picks) == 1


def test_kcenter_distinct_when_items_coincide():
    assert_valid(kcenter(torch.ones(10, 4), 10, gen(0)), 10, 10)


def test_forgetting_orders_never_learned_then_most_forgotten():
    # Columns are items; rows are epochs.
    history = torch.tensor(
        [
            [1, 1, 0, 0, 1, 1],
            [0, 1, 1, 0, 0, 1],
            [1, 1, 0, 0, 1, 1],
            [0, 1, 1, 0, 1, 1],
        ],
        dtype=torch.bool,
    )
    # Forgetting events: item 0 -> 2, item 2 -> 1, item 4 -> 1, items 1 and 5 -> 0; item 3 never learned.
    assert forgetting(history, 2, gen(0)).tolist() == [3, 0]
    seen_ties = {tuple(forgetting(history, 3, gen(s)).tolist()) for s in range(20)}
    assert seen_ties == {(3, 0, 2), (3, 0, 4)}


def test_unknown_method_and_missing_input():
    with pytest.raises(ValueError, match="random, herding, kcenter, forgetting"):
        select_coreset("gradmatch", 5, generator=gen(0), num_items=10)
    with pytest.raises(ValueError, match="features"):
        select_coreset("kcenter", 5, generator=gen(0), num_items=10)


@pytest.mark.parametrize("k", [0, 11])
def test_rejects_bad_budget(k):
    with pytest.raises(ValueError):
        random_pairs(10, k, gen(0))
    with pytest.raises(ValueError):
        herding(features(n=10), k)


def test_herding_matches_brute_force_greedy():
    x = features(n=40, d=5)
    picks = []
    for _ in range(8):
        gap = torch.stack([(x[picks + [i]].mean(0) - x.mean(0)).norm() for i in range(40)])
        gap[picks] = float("inf")
        picks.append(int(gap.argmin()))
    assert herding(x, 8).tolist() == picks
