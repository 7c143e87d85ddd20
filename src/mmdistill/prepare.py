"""Stage 1: the data source's splits plus the cached frozen features every later stage reads.

`prepare(cfg)` returns a `Prepared` bundle: splits, caption features per split, and the image inputs of the
student per split (frozen image features in frozen-image mode; resized pixels in [0, 1] for in-memory sources).
Everything heavy is cached on disk by `features.py`, so a second call is cheap.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .data import SOURCE_FLIP_SAFE, Split, build_splits, load_image
from .data.transforms import build_transform, pixel_tensor
from .encoders import build_image_encoder
from .features import image_features, text_features
from .utils import resolve_device

SPLITS = ("train", "validation", "test")


@dataclass
class Prepared:
    splits: dict[str, Split]
    texts: dict[str, torch.Tensor]  # caption features [captions, text_dim] per split
    features: dict[str, torch.Tensor] = field(default_factory=dict)  # frozen image features per split
    pixels: dict[str, torch.Tensor] = field(default_factory=dict)  # [N,3,s,s] in [0,1], in-memory sources
    mean: tuple = (0.5, 0.5, 0.5)  # the image encoder's input normalisation
    std: tuple = (0.5, 0.5, 0.5)
    flip_safe: bool = True
    seconds: float = 0.0

    @property
    def text_dim(self) -> int:
        return self.texts["train"].shape[1]

    def normalize(self, pixels01: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, device=pixels01.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=pixels01.device).view(1, 3, 1, 1)
        return (pixels01 - mean) / std

    def pixels01(self, split: str, ids: torch.Tensor, image_size: int) -> torch.Tensor:
        """Test-transformed pixels in [0, 1] of some images of a split: from memory, else decoded from files."""
        if split in self.pixels:
            return self.pixels[split][ids]
        transform = build_transform(image_size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "none")
        return torch.stack([transform(load_image(self.splits[split], i)) for i in ids.tolist()])

    def pairs(self, split: str, captions: torch.Tensor, space: str,
              image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, texts) of some caption entries of a split, each caption with its image: frozen image features
        (space "feature") or normalised pixels, and caption features."""
        image_ids = torch.tensor(self.splits[split].txt2img)[captions]
        if space == "feature":
            images = self.features[split][image_ids]
        else:
            images = self.normalize(self.pixels01(split, image_ids, image_size))
        return images, self.texts[split][captions]


def cache_dir(cfg) -> Path:
    return Path(cfg.cache_dir).expanduser()


def prepare(cfg, verbose: bool = False) -> Prepared:
    """Build the splits and their cached features for a config."""
    start = time.perf_counter()
    device = resolve_device(cfg.device)
    splits = build_splits(cfg.data)
    encoder = build_image_encoder(cfg.model.image_encoder, image_size=cfg.data.image_size, pretrained=False,
                                  **dict(cfg.model.convnet))
    bundle = Prepared(splits=splits, texts={}, mean=tuple(encoder.mean), std=tuple(encoder.std),
                      flip_safe=SOURCE_FLIP_SAFE.get(cfg.data.source, True))
    for name in SPLITS:
        split = splits[name]
        bundle.texts[name] = text_features(split, cfg.model.text_encoder, cache_dir(cfg), device)
        if not cfg.model.image_trainable:
            bundle.features[name] = image_features(split, cfg.model.image_encoder, cfg.data.image_size,
                                                   cache_dir(cfg), device, pretrained=cfg.model.pretrained)
        if isinstance(split.images, torch.Tensor):
            bundle.pixels[name] = pixel_tensor(split, cfg.data.image_size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    bundle.seconds = time.perf_counter() - start
    if verbose:
        print(f"prepared {cfg.data.source} in {bundle.seconds:.1f} s")
    return bundle


def print_summary(bundle: Prepared) -> None:
    """Dataset statistics: images and captions per split, feature shapes."""
    print(f"{'split':<11} {'images':>7} {'captions':>9}  text features   image inputs")
    for name in SPLITS:
        split = bundle.splits[name]
        image = bundle.features.get(name, bundle.pixels.get(name))
        image_shape = "loaded from files" if image is None else "x".join(map(str, image.shape))
        text_shape = "x".join(map(str, bundle.texts[name].shape))
        print(f"{name:<11} {len(split):>7} {len(split.captions):>9}  {text_shape:<14} {image_shape}")
