"""Image transforms on uint8 [3,H,W] tensors, normalised with the image encoder's mean/std.

`build_transform` gives the reference's per-image pipelines (train "clip", "crop", test "none") for DataLoaders;
`augment_batch` is a batched random-resized-crop/flip/brightness for small in-memory sets, where a per-image
Python loop would cost more than the expert's training step; its two halves (`draw_crops`, `apply_crops`) let
the distillation's inner loop draw a crop once per step and replay it in every pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision.transforms import v2

from mmdistill.data import Split, load_image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AUGMENTS = ("clip", "crop", "none")
CROP_SCALE = (0.5, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
BRIGHTNESS_JITTER = 0.2  # augment_batch scales each image by a factor in [1 - j, 1 + j]


class SpecRandAugment(v2.RandAugment):
    """RandAugment restricted to the ops of BLIP's RandomAugment: torchvision's op table (a class
    attribute) without Color, Contrast, Posterize and Solarize."""

    _AUGMENTATION_SPACE = {
        name: op
        for name, op in v2.RandAugment._AUGMENTATION_SPACE.items()
        if name
        in (
            "Identity",
            "AutoContrast",
            "Brightness",
            "Sharpness",
            "Equalize",
            "ShearX",
            "ShearY",
            "TranslateX",
            "TranslateY",
            "Rotate",
        )
    }


def build_transform(size: int, mean, std, augment: str, flip: bool = True) -> v2.Compose:
    """uint8 [3,H,W] -> float32 normalised [3,size,size]; `flip=False` for captions that say left/right."""
    if augment not in AUGMENTS:
        raise ValueError(f"augment must be one of {AUGMENTS}, got {augment!r}")
    bicubic = v2.InterpolationMode.BICUBIC
    if augment == "none":
        steps = [v2.Resize((size, size), interpolation=bicubic, antialias=True)]
    else:
        steps = [v2.RandomResizedCrop(size, scale=CROP_SCALE, interpolation=bicubic, antialias=True)]
        if flip:
            steps.append(v2.RandomHorizontalFlip())
        if augment == "clip":
            steps.append(SpecRandAugment(num_ops=2, magnitude=5))
    return v2.Compose(steps + [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


def normalize(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    """(pixels - mean) / std per channel, for float [..., 3, H, W] images in [0, 1]."""
    mean = torch.as_tensor(mean, dtype=pixels.dtype, device=pixels.device)[:, None, None]
    std = torch.as_tensor(std, dtype=pixels.dtype, device=pixels.device)[:, None, None]
    return (pixels - mean) / std


def pictures(inputs: torch.Tensor, mean, std, whitening=None) -> torch.Tensor:
    """Pixels in [0, 1] of normalised images [..., 3, H, W]; with `whitening` (a data.whitening.Whitening) the
    inputs are whitened ones, undone first."""
    if whitening is not None:
        inputs = whitening.undo(inputs)
    mean = torch.as_tensor(mean, dtype=inputs.dtype, device=inputs.device)[:, None, None]
    std = torch.as_tensor(std, dtype=inputs.dtype, device=inputs.device)[:, None, None]
    return (inputs * std + mean).clamp(0, 1)


@dataclass
class CropDraw:
    """One batch's random resized crops: per-sample affine maps (affine_grid form) and brightness factors."""

    theta: torch.Tensor  # [B,2,3]
    brightness: torch.Tensor  # [B]


def draw_crops(batch: int, generator: torch.Generator, flip: bool) -> CropDraw:
    """Per-sample random resized crop (area 0.5-1, aspect 3/4-4/3), optional flip and brightness factor, drawn
    from the CPU `generator` only, so that a batch is reproducible on any device."""

    def uniform(low, high):
        return low + (high - low) * torch.rand(batch, generator=generator)

    area = uniform(*CROP_SCALE)
    ratio = torch.exp(uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])))
    width = torch.sqrt(area * ratio).clamp(max=1.0)  # crop sides as fractions of the image sides
    height = torch.sqrt(area / ratio).clamp(max=1.0)
    centre_x = (1 - width) * uniform(-1.0, 1.0)  # in affine_grid coordinates, [-1, 1]
    centre_y = (1 - height) * uniform(-1.0, 1.0)
    mirror = torch.where(torch.rand(batch, generator=generator) < 0.5, -1.0, 1.0) if flip else torch.ones(batch)
    brightness = uniform(1 - BRIGHTNESS_JITTER, 1 + BRIGHTNESS_JITTER)
    theta = torch.zeros(batch, 2, 3)
    theta[:, 0, 0] = width * mirror
    theta[:, 0, 2] = centre_x
    theta[:, 1, 1] = height
    theta[:, 1, 2] = centre_y
    return CropDraw(theta, brightness)


def apply_crops(pixels: torch.Tensor, crops: CropDraw, size: int) -> torch.Tensor:
    """The drawn crops of `pixels` [B,3,H,W] resized to [B,3,size,size], each scaled by its brightness factor.

    Differentiable in `pixels` and linear in them (bilinear sampling, then a scale), so the inner loop can replay
    one draw in every pass. On normalised pixels the factor scales each image's contrast around the mean."""
    theta = crops.theta.to(device=pixels.device, dtype=pixels.dtype)
    grid = F.affine_grid(theta, [len(pixels), pixels.shape[1], size, size], align_corners=False)
    sampled = F.grid_sample(pixels, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return sampled * crops.brightness.to(sampled)[:, None, None, None]


def augment_batch(pixels: torch.Tensor, size: int, generator: torch.Generator, flip: bool) -> torch.Tensor:
    """`draw_crops` applied to float [B,3,H,W] pixels in [0, 1]; the result is [B,3,size,size] in [0, 1], on the
    same device."""
    return apply_crops(pixels, draw_crops(len(pixels), generator, flip), size).clamp(0, 1)


def pixel_tensor(split: Split, size: int, mean, std, chunk: int = 1024) -> torch.Tensor:
    """The whole split test-transformed: float32 [N,3,size,size]; for small sets that fit in memory."""
    transform = build_transform(size, mean, std, "none")
    if isinstance(split.images, torch.Tensor):  # v2 transforms take a batch as one image with leading dims
        return torch.cat([transform(split.images[i : i + chunk]) for i in range(0, len(split), chunk)])
    return torch.stack([transform(load_image(split, i)) for i in range(len(split))])


class ImageDataset(Dataset):
    """(transformed image, image index) pairs of a split, for a DataLoader."""

    def __init__(self, split: Split, transform):
        self.split = split
        self.transform = transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        return self.transform(load_image(self.split, i)), i
