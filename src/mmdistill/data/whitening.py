"""ZCA whitening of normalised pixels, the MTT line's option for ConvNets trained from scratch.

Fitted once on the training images (after the encoder's mean/std normalisation), it decorrelates the pixels
while staying as close to them as a whitening can (Z = U diag(1 / sqrt(s + epsilon)) U^T of the pixel
covariance, the transform kornia's ZCAWhitening computes for MTT). Experts, students and the distillation all see
whitened images, so the synthetic images are learned in whitened space; `undo` brings them back to normalised
pixels for pictures and exports. The transform is part of a pixel set's contract: a set distilled on whitened
pixels is only meaningful with the same transform, which travels with it as `whitening.safetensors`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from mmdistill.config import ZCA_MAX_IMAGE_SIZE
from mmdistill.errors import UserError
from mmdistill.io import save_tensors

FILE = "whitening.safetensors"
MAX_DIMENSIONS = 3 * ZCA_MAX_IMAGE_SIZE**2


@dataclass
class Whitening:
    mean: torch.Tensor  # [D] mean of the normalised training pixels
    matrix: torch.Tensor  # [D, D] symmetric ZCA transform
    inverse: torch.Tensor  # [D, D] its inverse

    @classmethod
    def fit(cls, chunks: Iterable[torch.Tensor], epsilon: float) -> Whitening:
        """ZCA of normalised images given as chunks [n, 3, H, W] (a file-based set never sits in memory whole),
        regularised by `epsilon` added to the covariance's eigenvalues (small ones would otherwise blow noise up:
        kornia's and MTT's default is 0.1)."""
        count, total, products = 0, None, None
        for chunk in chunks:
            flat = chunk.reshape(len(chunk), -1).double()
            if flat.shape[1] > MAX_DIMENSIONS:
                side = int((flat.shape[1] // 3) ** 0.5)
                raise UserError(f"ZCA whitening needs images of at most {ZCA_MAX_IMAGE_SIZE} px, not {side}")
            if total is None:
                total, products = flat.new_zeros(flat.shape[1]), flat.new_zeros(flat.shape[1], flat.shape[1])
            count, total, products = count + len(flat), total + flat.sum(0), products.addmm_(flat.T, flat)
        if count < 2:
            raise UserError("ZCA whitening needs at least 2 training images")
        mean = total / count
        covariance = (products - count * torch.outer(mean, mean)) / (count - 1)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        eigenvalues = eigenvalues.clamp_min(0) + epsilon
        matrix = (eigenvectors * eigenvalues.rsqrt()) @ eigenvectors.T
        inverse = (eigenvectors * eigenvalues.sqrt()) @ eigenvectors.T
        return cls(mean.float(), matrix.float(), inverse.float())

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """Whitened images of normalised images [N, 3, H, W] (differentiable)."""
        flat = images.reshape(len(images), -1) - self.mean.to(images.device)
        return (flat @ self.matrix.to(images.device)).view_as(images)

    def undo(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images of whitened images [N, 3, H, W]."""
        flat = images.reshape(len(images), -1) @ self.inverse.to(images.device)
        return (flat + self.mean.to(images.device)).view_as(images)

    def matches(self, other: Whitening | None) -> bool:
        """The same transform up to float rounding (a fit at another thread count differs in the last bits)."""
        return (
            other is not None
            and self.matrix.shape == other.matrix.shape
            and torch.allclose(self.mean, other.mean, rtol=1e-4, atol=1e-5)
            and torch.allclose(self.matrix, other.matrix, rtol=1e-3, atol=1e-4 * float(self.matrix.abs().max()))
        )

    def save(self, path: Path) -> None:
        save_tensors({"mean": self.mean, "matrix": self.matrix, "inverse": self.inverse}, path)


def load_whitening(path: Path) -> Whitening | None:
    """The whitening saved at `path` (a set's FILE, or the fit's cache), or None; a damaged file stops with its
    name."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise UserError(f"cannot read {path}: {type(err).__name__}: {err}") from None
    missing = {"mean", "matrix", "inverse"} - set(tensors)
    dims = len(tensors.get("mean", ()))
    if missing or any(tensors[k].shape != (dims, dims) for k in ("matrix", "inverse")):
        raise UserError(f"{path} is not a whitening (needs mean [D], matrix and inverse [D, D])")
    if not all(torch.isfinite(t).all() for t in tensors.values()):
        raise UserError(f"{path} holds NaN or Inf values")
    return Whitening(tensors["mean"], tensors["matrix"], tensors["inverse"])
