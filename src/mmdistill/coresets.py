"""Coreset baselines: k real image-caption pairs chosen from the training set, at the distillation budget.

These are the baselines of Wu et al., "Vision-Language Dataset Distillation". Items are caption ids (one
pair = one caption and its image). For herding and k-center the caller passes one feature row per pair: the
concatenation of the L2-normalised image and text embeddings from a model trained on the full data.
All functions are pure and deterministic given their torch.Generator.
"""

from __future__ import annotations

import torch

CORESETS = ("random", "herding", "kcenter", "forgetting")


def _check_budget(k: int, n: int) -> None:
    if not 1 <= k <= n:
        raise ValueError(f"coreset size k must be in [1, {n}] (the number of items), got {k}")


def random_pairs(num_captions: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """k distinct caption ids drawn uniformly."""
    _check_budget(k, num_captions)
    return torch.randperm(num_captions, generator=generator)[:k]


def herding(features: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy herding (Welling 2009): each pick brings the mean of the picks closest to the mean of all items.

    With t = j * mean - (sum of the j-1 earlier picks), step j minimises ||t - x||^2 = ||x||^2 - 2 x.t + const,
    so each step costs one matrix-vector product. Ties go to the smallest index.
    """
    n = features.shape[0]
    _check_budget(k, n)
    features = features.float()
    sq_norms = features.pow(2).sum(1)
    dot_mean = features @ features.mean(0)
    dot_picked = torch.zeros_like(dot_mean)  # x . (sum of picks so far)
    available = torch.ones(n, dtype=torch.bool, device=features.device)
    picks = []
    for step in range(1, k + 1):
        cost = sq_norms - 2 * (step * dot_mean - dot_picked)
        pick = int(torch.where(available, cost, float("inf")).argmin())
        picks.append(pick)
        available[pick] = False
        dot_picked += features @ features[pick]
    return torch.tensor(picks, dtype=torch.long)


def _sq_distances(features: torch.Tensor, center: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Squared distances to one center, chunk_size rows at a time to bound the n x d temporary."""
    return torch.cat([(block - center).pow(2).sum(1) for block in features.split(chunk_size)])


def kcenter(features: torch.Tensor, k: int, generator: torch.Generator, chunk_size: int = 65536) -> torch.Tensor:
    """Greedy k-center (farthest-first traversal) from a random start: each pick is the item farthest from
    all earlier picks, which covers outlying regions that random or herding would miss. Ties go to the
    smallest index; picks are distinct even when items coincide."""
    n = features.shape[0]
    _check_budget(k, n)
    features = features.float()
    picks = [int(torch.randint(n, (1,), generator=generator))]
    nearest = torch.full((n,), float("inf"), device=features.device)
    for _ in range(k - 1):
        nearest = torch.minimum(nearest, _sq_distances(features, features[picks[-1]], chunk_size))
        nearest[picks[-1]] = -1.0  # below every distance, so a duplicate of a pick can still be chosen
        picks.append(int(nearest.argmax()))
    return torch.tensor(picks, dtype=torch.long)


def forgetting(correct_history: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """The k most forgotten items (Toneva et al. 2019), ties broken at random.

    correct_history[e, i] says whether item i was predicted correctly after epoch e. A forgetting event is a
    correct -> incorrect transition between consecutive epochs; items never predicted correctly count as
    infinitely forgotten, as in the paper.
    """
    if correct_history.ndim != 2 or correct_history.shape[0] < 1:
        raise ValueError(f"correct_history must be [epochs >= 1, items], got shape {tuple(correct_history.shape)}")
    history = correct_history.bool()
    n = history.shape[1]
    _check_budget(k, n)
    events = (history[:-1] & ~history[1:]).sum(0).double()
    events[~history.any(0)] = float("inf")
    shuffle = torch.randperm(n, generator=generator).to(history.device)
    order = torch.argsort(events[shuffle], descending=True, stable=True)
    return shuffle[order[:k]].cpu()


def select_coreset(
    method: str,
    k: int,
    *,
    generator: torch.Generator,
    features: torch.Tensor | None = None,
    correct_history: torch.Tensor | None = None,
    num_items: int | None = None,
) -> torch.Tensor:
    """Run one of CORESETS; each method needs only its own input (num_items, features or correct_history)."""
    needs = {
        "random": ("num_items", num_items),
        "herding": ("features", features),
        "kcenter": ("features", features),
        "forgetting": ("correct_history", correct_history),
    }
    if method not in needs:
        raise ValueError(f"unknown coreset method {method!r}; valid: {', '.join(CORESETS)}")
    name, value = needs[method]
    if value is None:
        raise ValueError(f"coreset method {method!r} needs {name}")
    if method == "random":
        return random_pairs(num_items, k, generator)
    if method == "herding":
        return herding(features, k)
    if method == "kcenter":
        return kcenter(features, k, generator)
    return forgetting(correct_history, k, generator)
