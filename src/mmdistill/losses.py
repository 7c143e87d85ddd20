"""Contrastive and soft-label losses on logits Z [B,B] with a target similarity S [B,B].

With S = I, `nce` is the CLIP loss. Every loss is differentiable in both Z and S, since S is learned.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Symmetric soft-target InfoNCE: 1/2 [-mean_i sum_j S_ij log softmax(Z)_ij + same on the transposes]."""
    rows = -(target * F.log_softmax(logits, dim=1)).sum(1).mean()
    cols = -(target.T * F.log_softmax(logits.T, dim=1)).sum(1).mean()
    return (rows + cols) / 2


def cwcl(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """InfoNCE with each target row normalised to sum to one (continuously weighted contrastive loss)."""
    rows = target / (target.sum(1, keepdim=True) + 1e-6)
    cols = target.T / (target.T.sum(1, keepdim=True) + 1e-6)
    return (-(rows * F.log_softmax(logits, 1)).sum(1).mean() - (cols * F.log_softmax(logits.T, 1)).sum(1).mean()) / 2


def kl(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1/2 [KL(softmax(10 S) || softmax(Z)) + transpose], element-mean as in the reference."""
    # reduction="sum" / numel: the element mean that torch's reduction="mean" gives today (and warns about)
    forward = F.kl_div(F.log_softmax(logits, 1), F.softmax(10 * target, 1), reduction="sum")
    backward = F.kl_div(F.log_softmax(logits.T, 1), F.softmax(10 * target.T, 1), reduction="sum")
    return (forward + backward) / (2 * logits.numel())


# The reference's BalanceBCE adds this inside the logarithms: log(p + eps), log(1 - p + eps).
WBCE_EPS = 1e-6


def _elementwise_wbce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-(S log(p + eps) + (1 - S) log(1 - p + eps)), p = sigmoid(Z), with the epsilon inside the logarithms.

    Clamping p instead (as this module once did) gives every pair whose probability reaches the clamp a zero
    gradient: at temperature 0.07 that is |cos| > ~0.97, the very pairs the method most needs to move. Here the
    loss stays smooth; 1 - p is computed as sigmoid(-Z), which is the same number without the cancellation.
    """
    return -(
        target * (torch.sigmoid(logits) + WBCE_EPS).log() + (1 - target) * (torch.sigmoid(-logits) + WBCE_EPS).log()
    )


def bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean BCE(sigmoid(Z), S), computed from the logits (exact and smooth at any |Z|)."""
    return F.binary_cross_entropy_with_logits(logits, target)


def wbce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Balanced BCE: the mean over 'positive' entries (S > 0.5) and over the rest, averaged."""
    loss = _elementwise_wbce(logits, target)
    positive = target > 0.5
    pos = loss[positive].mean() if positive.any() else loss.new_zeros(())
    neg = loss[~positive].mean() if (~positive).any() else loss.new_zeros(())
    return (pos + neg) / 2


def mse(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(torch.sigmoid(logits), target)


LOSSES = {"nce": nce, "cwcl": cwcl, "kl": kl, "bce": bce, "wbce": wbce, "mse": mse}
