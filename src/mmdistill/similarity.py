"""The learnable soft similarity matrix S of a synthetic set (LoRS): identity, full, or low rank.

Parameters live in a dict of tensors so they can be optimised, EMA'd and saved like the synthetic data.
A mini-batch B uses the block S[B, B].
- identity: no parameters, S = I.
- full: one N x N parameter initialised to I.
- lowrank: S = diag(a) + (alpha / r) L R^T with a = 1, L ~ N(0, 1), R = 0 (so S = I at init).
"""

from __future__ import annotations

import torch


def init_similarity(
    kind: str, n: int, rank: int = 10, generator: torch.Generator | None = None
) -> dict[str, torch.Tensor]:
    if kind == "identity":
        return {}
    if kind == "full":
        return {"sim_full": torch.eye(n)}
    if kind == "lowrank":
        return {
            "sim_diag": torch.ones(n),
            "sim_left": torch.randn(n, rank, generator=generator),
            "sim_right": torch.zeros(n, rank),
        }
    raise ValueError(f"unknown similarity kind {kind!r}")


def similarity_block(
    kind: str, params: dict[str, torch.Tensor], index: torch.Tensor, alpha: float = 1.0
) -> torch.Tensor:
    """S[index, index], differentiable in the parameters."""
    if kind == "identity":
        return torch.eye(len(index))
    if kind == "full":
        return params["sim_full"][index][:, index]
    if kind == "lowrank":
        rank = params["sim_left"].shape[1]
        left, right = params["sim_left"][index], params["sim_right"][index]
        return torch.diag(params["sim_diag"][index]) + (alpha / rank) * left @ right.T
    raise ValueError(f"unknown similarity kind {kind!r}")


def full_matrix(kind: str, params: dict[str, torch.Tensor], n: int, alpha: float = 1.0) -> torch.Tensor:
    """The whole N x N matrix (for reports and heat maps)."""
    return similarity_block(kind, params, torch.arange(n), alpha)
