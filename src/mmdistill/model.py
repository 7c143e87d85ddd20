"""The dual-encoder student and its two flat trajectory parameter groups ('img' and 'txt').

Trajectory matching treats each group as one flat vector: experts store flat snapshots, the inner loop updates
flat vectors, and `DualEncoder.logits_at` maps them back to named tensors for `torch.func.functional_call`.
The module is built once; only the flat vectors change.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from mmdistill.encoders import build_frozen_image_encoder, build_image_encoder, has_random_weights

GROUPS = ("img", "txt")


class ProjectionHead(nn.Module):
    """LayerNorm(p + Dropout(Linear(GELU(p)))) with p = Linear(x): the reference's projection head."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.1):
        super().__init__()
        self.projection = nn.Linear(in_dim, out_dim)
        self.fc = nn.Linear(out_dim, out_dim)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.projection(x)
        return self.norm(p + self.dropout(self.fc(F.gelu(p))))


@dataclass(frozen=True)
class ParamLayout:
    """Names and shapes of one parameter group, in flat-vector order."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @property
    def sizes(self) -> list[int]:
        return [int(torch.Size(s).numel()) for s in self.shapes]

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of `flat` shaped like the named parameters (differentiable)."""
        return {n: t.view(s) for n, t, s in zip(self.names, flat.split(self.sizes), self.shapes)}

    def flatten(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([tensors[n].reshape(-1) for n in self.names])


class DualEncoder(nn.Module):
    """Image side + text projection; logits = (1/T) * cos(image, text).

    Image-trainable mode: the image encoder is trained ('img' group) and text features are projected to its
    output size. Frozen mode: inputs may be pixels (run through the frozen encoder, not in any group) or
    precomputed features; the image projection is the 'img' group.

    `frozen_norm_stats`: a trained image encoder's batch norms normalise with their running statistics and never
    update them (eval mode), also while the rest trains. A pretrained encoder's statistics describe real images;
    trained on a few dozen synthetic ones in batch mode it normalises by theirs and carries them to test time.
    """

    def __init__(
        self,
        image_encoder: nn.Module,
        text_dim: int,
        image_trainable: bool,
        embed_dim: int = 0,
        dropout: float = 0.1,
        temperature: float = 0.07,
        frozen_norm_stats: bool = False,
    ):
        super().__init__()
        self.image_trainable = image_trainable
        self.frozen_norm_stats = frozen_norm_stats and image_trainable
        self.logit_scale = 1.0 / temperature
        if image_trainable:
            self.image_encoder = image_encoder
            self.image_projection = None
            embed_dim = image_encoder.out_dim
        else:
            embed_dim = embed_dim or image_encoder.out_dim
            self.image_projection = ProjectionHead(image_encoder.out_dim, embed_dim, dropout)
            image_encoder.requires_grad_(False).eval()
            if hasattr(image_encoder, "fold_batch_norms"):  # never trained here: its batch norms are constants
                image_encoder.fold_batch_norms()
            self.__dict__["frozen_image_encoder"] = image_encoder  # kept out of parameters() and state_dict
        self.text_projection = ProjectionHead(text_dim, embed_dim, dropout)
        img_module = self.image_encoder if image_trainable else self.image_projection
        prefix = "image_encoder." if image_trainable else "image_projection."
        self.layouts = {
            "img": _layout(img_module, prefix),
            "txt": _layout(self.text_projection, "text_projection."),
        }

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.image_trainable:
            self.frozen_image_encoder.eval()
        elif self.frozen_norm_stats:
            for module in self.image_encoder.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen-mode features of pixels [B,3,H,W]; 2-D inputs are already features."""
        if images.dim() == 2:
            return images
        return self.frozen_image_encoder(images)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        if self.image_trainable:
            if images.dim() == 4 and getattr(self.image_encoder, "prefers_channels_last", False):
                # NHWC input is enough for the convolutions to run in NHWC: EfficientNet-Lite0 at 64 px, batch 128,
                # forward + backward took 0.96-1.09 s vs 1.56-1.75 s in NCHW (2 threads), for experts, students and
                # the inner loop alike
                images = images.contiguous(memory_format=torch.channels_last)
            return self.image_encoder(images)
        return self.image_projection(self.image_features(images))

    def encode_text(self, texts: torch.Tensor) -> torch.Tensor:
        return self.text_projection(texts)

    def similarity(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * F.normalize(image_emb, dim=-1) @ F.normalize(text_emb, dim=-1).T

    def forward(self, images: torch.Tensor, texts: torch.Tensor, blend=None) -> torch.Tensor:
        image_emb, text_emb = self.encode_image(images), self.encode_text(texts)
        if blend is not None:
            lam, perm = blend
            image_emb = lam * image_emb + (1 - lam) * image_emb[perm]
            text_emb = lam * text_emb + (1 - lam) * text_emb[perm]
        return self.similarity(image_emb, text_emb)

    # -- flat parameter groups -------------------------------------------------------------------------
    def get_flat(self) -> dict[str, torch.Tensor]:
        """Current parameters as detached flat vectors per group."""
        named = dict(self.named_parameters())
        return {g: layout.flatten(named).detach().clone() for g, layout in self.layouts.items()}

    def set_flat(self, flat: dict[str, torch.Tensor]) -> None:
        """Copy flat vectors into the module's parameters."""
        named = dict(self.named_parameters())
        with torch.no_grad():
            for g, layout in self.layouts.items():
                for name, value in layout.unflatten(flat[g]).items():
                    named[name].copy_(value)

    def named_params_at(self, flat: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: t for g, layout in self.layouts.items() for name, t in layout.unflatten(flat[g]).items()}

    def image_embedding_at(self, flat: dict[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
        """Image-trainable mode: the embedding that the encoder with the flat parameters `flat` gives pixels
        (differentiable in both), without the text side that `logits_at` also runs."""
        prefix = "image_encoder."
        params = {n.removeprefix(prefix): t for n, t in self.named_params_at(flat).items() if n.startswith(prefix)}
        return functional_call(self.image_encoder, params, (images,), strict=False, tie_weights=False)

    def logits_at(
        self, flat: dict[str, torch.Tensor], images: torch.Tensor, texts: torch.Tensor, blend=None
    ) -> torch.Tensor:
        """Logits with the given flat parameters (torch.func.functional_call; differentiable in all inputs).

        `blend` = (lam, perm) mixes image and text embeddings inside the batch (RepBlend); the caller draws it
        once per step so that a recompute pass sees the same mix.
        """
        return functional_call(
            self, self.named_params_at(flat), (images, texts), {"blend": blend}, strict=False, tie_weights=False
        )


def _layout(module: nn.Module, prefix: str) -> ParamLayout:
    params = [(prefix + n, p) for n, p in module.named_parameters()]
    return ParamLayout(tuple(n for n, _ in params), tuple(tuple(p.shape) for _, p in params))


def build_model(
    model_cfg,
    *,
    text_dim: int,
    image_size: int,
    seed: int,
    device: torch.device | str = "cpu",
    image_encoder: str | None = None,
) -> DualEncoder:
    """A fresh student; its random init depends only on `seed` (global RNG state is left untouched)."""
    name = image_encoder or model_cfg.image_encoder
    options = {"image_size": image_size, "pretrained": model_cfg.pretrained, **dict(model_cfg.convnet)}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = build_image_encoder(name, **options)
        if not model_cfg.image_trainable and has_random_weights(name, model_cfg.pretrained):
            # the feature cache holds this encoder's features: the fixed one, not one per student seed (the
            # student's draw above stays, so the heads start from the same point of the stream either way)
            encoder = build_frozen_image_encoder(name, **options)
        pretrained = not has_random_weights(name, model_cfg.pretrained)
        model = DualEncoder(
            encoder,
            text_dim,
            model_cfg.image_trainable,
            model_cfg.embed_dim,
            model_cfg.dropout,
            model_cfg.temperature,
            frozen_norm_stats=model_cfg.norm_stats == "frozen" or (model_cfg.norm_stats == "auto" and pretrained),
        )
    model.to(device)
    if not model.image_trainable:
        model.frozen_image_encoder.to(device)
    return model
