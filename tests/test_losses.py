"""Every loss against an independent float64 transcription of the reference's formulas, at ordinary and at
saturated logits, values and gradients; gradients also checked by finite differences (gradcheck)."""

import math

import pytest
import torch

from mmdistill.losses import LOSSES, WBCE_EPS

TEMPERATURE_SCALE = 1 / 0.07  # logits = cos / T, as the student computes them


# -- the reference's formulas, written out element by element (no torch.nn.functional) -------------------
def _log_softmax_rows(z):
    return [[z[i][j] - math.log(sum(math.exp(v) for v in z[i])) for j in range(len(z[i]))] for i in range(len(z))]


def _softmax_rows(z):
    return [[math.exp(z[i][j]) / sum(math.exp(v) for v in z[i]) for j in range(len(z[i]))] for i in range(len(z))]


def _transpose(m):
    return [list(row) for row in zip(*m)]


def _sigmoid(x):
    return 1 / (1 + math.exp(-x))


def ref_nce(z, s):
    """1/2 [-mean_i sum_j S_ij log softmax(Z)_ij + the same on Z^T, S^T]."""

    def one(z, s):
        ls = _log_softmax_rows(z)
        return -sum(sum(s[i][j] * ls[i][j] for j in range(len(z))) for i in range(len(z))) / len(z)

    return (one(z, s) + one(_transpose(z), _transpose(s))) / 2


def ref_cwcl(z, s):
    """InfoNCE with each target row divided by (sum_j S_ij + 1e-6)."""

    def rows(s):
        return [[v / (sum(row) + 1e-6) for v in row] for row in s]

    def one(z, s):
        ls = _log_softmax_rows(z)
        return -sum(sum(s[i][j] * ls[i][j] for j in range(len(z))) for i in range(len(z))) / len(z)

    return (one(z, rows(s)) + one(_transpose(z), rows(_transpose(s)))) / 2


def ref_kl(z, s):
    """1/2 [KL(softmax(10 S) || softmax(Z)) + transpose], mean over the elements."""

    def one(z, s):
        q = _softmax_rows([[10 * v for v in row] for row in s])
        lp = _log_softmax_rows(z)
        n = len(z)
        return sum(q[i][j] * (math.log(q[i][j]) - lp[i][j]) for i in range(n) for j in range(n)) / (n * n)

    return (one(z, s) + one(_transpose(z), _transpose(s))) / 2


def ref_bce(z, s):
    """mean BCE(sigmoid(Z), S)."""
    n = len(z)
    return sum(
        -(s[i][j] * math.log(_sigmoid(z[i][j])) + (1 - s[i][j]) * math.log(_sigmoid(-z[i][j])))
        for i in range(n)
        for j in range(n)
    ) / (n * n)


def ref_wbce(z, s):
    """Elementwise BCE with eps 1e-6 inside the logarithms; 1/2 (mean over S > 0.5 + mean over the rest)."""
    n = len(z)
    pos, neg = [], []
    for i in range(n):
        for j in range(n):
            p, one_minus_p = _sigmoid(z[i][j]), _sigmoid(-z[i][j])  # 1 - p without float cancellation
            loss = -(s[i][j] * math.log(p + 1e-6) + (1 - s[i][j]) * math.log(one_minus_p + 1e-6))
            (pos if s[i][j] > 0.5 else neg).append(loss)
    return (sum(pos) / len(pos) + sum(neg) / len(neg)) / 2


def ref_mse(z, s):
    """MSE(sigmoid(Z), S)."""
    n = len(z)
    return sum((_sigmoid(z[i][j]) - s[i][j]) ** 2 for i in range(n) for j in range(n)) / (n * n)


REFERENCE = {"nce": ref_nce, "cwcl": ref_cwcl, "kl": ref_kl, "bce": ref_bce, "wbce": ref_wbce, "mse": ref_mse}


def ref_gradient(fn, z, s, h=1e-6):
    """Central differences of the transcription, in Z and in S (float64 Python floats)."""

    def partials(matrix, call):
        out = [[0.0] * len(matrix) for _ in matrix]
        for i in range(len(matrix)):
            for j in range(len(matrix)):
                up = [row[:] for row in matrix]
                down = [row[:] for row in matrix]
                up[i][j] += h
                down[i][j] -= h
                out[i][j] = (call(up) - call(down)) / (2 * h)
        return out

    return (
        torch.tensor(partials(z, lambda m: fn(m, s)), dtype=torch.float64),
        torch.tensor(partials(s, lambda m: fn(z, m)), dtype=torch.float64),
    )


def _inputs(saturated: bool, n: int = 5, seed: int = 0):
    """Logits of a student at temperature 0.07 and a soft target (identity plus off-diagonal mass, kept away from
    WBCE's 0.5 split so that finite differences never cross it). Saturated: cosines near +-1 (|Z| ~ 14) and a
    few beyond what float32 resolves (|Z| 20-40)."""
    gen = torch.Generator().manual_seed(seed)
    if saturated:
        cos = torch.where(torch.rand(n, n, generator=gen) < 0.5, 0.97, -0.97) + 0.03 * torch.rand(n, n, generator=gen)
        z = TEMPERATURE_SCALE * cos.double()
        z[0, 1], z[1, 0], z[2, 2] = 25.0, -40.0, 30.0
    else:
        z = (torch.rand(n, n, generator=gen, dtype=torch.float64) * 2 - 1) * 3
    s = torch.eye(n, dtype=torch.float64) * 0.6 + 0.3 + 0.05 * torch.rand(n, n, generator=gen, dtype=torch.float64)
    s = torch.where(s > 0.5, s, 0.1 * torch.rand(n, n, generator=gen, dtype=torch.float64))  # off-diagonal < 0.5
    return z, s


@pytest.mark.parametrize("saturated", [False, True], ids=["ordinary", "saturated"])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_matches_transcription(name, saturated):
    z, s = _inputs(saturated)
    zl, sl = z.tolist(), s.tolist()
    z_leaf, s_leaf = z.clone().requires_grad_(), s.clone().requires_grad_()
    value = LOSSES[name](z_leaf, s_leaf)
    assert value.item() == pytest.approx(REFERENCE[name](zl, sl), rel=1e-10, abs=1e-12)
    grad_z, grad_s = torch.autograd.grad(value, [z_leaf, s_leaf])
    ref_z, ref_s = ref_gradient(REFERENCE[name], zl, sl)
    assert torch.allclose(grad_z, ref_z, rtol=1e-5, atol=1e-9), (grad_z - ref_z).abs().max()
    assert torch.allclose(grad_s, ref_s, rtol=1e-5, atol=1e-8), (grad_s - ref_s).abs().max()


@pytest.mark.parametrize("saturated", [False, True], ids=["ordinary", "saturated"])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_gradcheck(name, saturated):
    z, s = _inputs(saturated, n=4, seed=1)
    assert torch.autograd.gradcheck(LOSSES[name], (z.requires_grad_(), s.requires_grad_()), eps=1e-6, atol=1e-7)


def test_wbce_moves_saturated_pairs():
    """A negative pair (S = 0) whose cosine is 0.99 at temperature 0.07 (p = 1 - 1e-6) must still be pushed
    apart: with the probabilities clamped to [1e-6, 1 - 1e-6] its gradient was exactly zero."""
    for dtype in (torch.float32, torch.float64):
        z = torch.tensor([[3.0, TEMPERATURE_SCALE * 0.99], [-2.0, 3.0]], dtype=dtype, requires_grad=True)
        s = torch.eye(2, dtype=dtype)
        (grad,) = torch.autograd.grad(LOSSES["wbce"](z, s), [z])
        p = torch.sigmoid(z[0, 1].detach().double())
        # d/dz of -log(1 - p + eps) = p (1 - p) / (1 - p + eps), weighted 1/2 (pair in the negatives' mean of 2)
        expected = 0.5 / 2 * p * (1 - p) / (1 - p + WBCE_EPS)
        assert grad[0, 1].item() > 0
        assert grad[0, 1].item() == pytest.approx(expected.item(), rel=1e-3)
