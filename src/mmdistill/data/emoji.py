"""`emoji`: real images rendered from Debian's Noto Color Emoji font, captioned with their Unicode names.

Every single-codepoint emoji the font draws becomes one image (cropped to the glyph, centred on white, resized
with antialiasing); its captions are variants of the lowercased Unicode name ("an emoji of a grinning face").
Pixels are cached in memory per image size; the split (80/5/15 % by default) is a permutation drawn from the seed.

Some names say left/right ("leftwards arrow"), so a horizontal flip is not caption-preserving: FLIP_SAFE is False.
"""

from __future__ import annotations

import functools
import os
import unicodedata

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from mmdistill.data import SPLIT_NAMES, cfg_value, in_memory_split, requested_size, seeded_partition, with_article
from mmdistill.errors import UserError

FLIP_SAFE = False
FONT_PATH = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
FONT_SIZE = 109  # the font's only bitmap strike
CANVAS = 160  # larger than the 136x128 glyph bitmaps
DEFAULT_IMAGE_SIZE = 32
SPLIT_FRACTIONS = {"validation": 0.05, "test": 0.15}  # train takes the rest

# Blocks holding the emoji; ASCII keycap bases (digits, '#', '*') are left out.
CODEPOINT_RANGES = [(0x00A9, 0x00AF), (0x2000, 0x3300), (0x1F000, 0x1FB00)]
# Drawn by the font but only meaningful inside sequences: regional indicators, skin tones, hair components, joiners.
SEQUENCE_PARTS = [(0x1F1E6, 0x1F200), (0x1F3FB, 0x1F400), (0x1F9B0, 0x1F9B4), (0x200D, 0x200E), (0x20E3, 0x20E4)]

CAPTION_TEMPLATES = [
    "{name}",
    "an emoji of {a_name}",
    "{name} icon",
    "a picture showing {a_name}",
    "{name} emoji on a white background",
    "a small image of {a_name}",
]


def _candidates() -> list[int]:
    return [
        cp
        for start, stop in CODEPOINT_RANGES
        for cp in range(start, stop)
        if unicodedata.name(chr(cp), None) and not any(a <= cp < b for a, b in SEQUENCE_PARTS)
    ]


def render_glyph(font: ImageFont.FreeTypeFont, char: str, image_size: int) -> Image.Image | None:
    """The glyph cropped to its ink, centred on a white square, resized; None when the font has no glyph (blank)."""
    canvas = Image.new("RGBA", (CANVAS, CANVAS), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((CANVAS // 2, CANVAS // 2), char, font=font, embedded_color=True, anchor="mm")
    box = canvas.getbbox()
    if box is None:
        return None
    glyph = canvas.crop(box)
    side = max(glyph.size)
    square = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    square.alpha_composite(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
    return square.convert("RGB").resize((image_size, image_size), Image.Resampling.LANCZOS)


@functools.lru_cache(maxsize=2)
def render_all(image_size: int) -> tuple[list[str], torch.Tensor]:
    """(names, uint8 [N,3,S,S]) of every emoji the font draws, in codepoint order."""
    if not os.path.isfile(FONT_PATH):
        raise UserError(f"emoji font not found: {FONT_PATH}; install it with `apt-get install fonts-noto-color-emoji`")
    font = ImageFont.truetype(FONT_PATH, FONT_SIZE, layout_engine=ImageFont.Layout.BASIC)  # no shaping needed
    names, pixels = [], []
    for cp in _candidates():
        image = render_glyph(font, chr(cp), image_size)
        if image is not None:
            names.append(unicodedata.name(chr(cp)).lower())
            pixels.append(np.asarray(image))
    return names, torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous()


def emoji_captions(name: str, count: int) -> list[str]:
    return [template.format(name=name, a_name=with_article(name)) for template in CAPTION_TEMPLATES[:count]]


def build(data_cfg) -> dict:
    """Split the rendered emoji by a seeded permutation; sizes from data_cfg override the default fractions."""
    seed = int(cfg_value(data_cfg, "seed", 0))
    image_size = int(cfg_value(data_cfg, "image_size", DEFAULT_IMAGE_SIZE))
    per_image = int(cfg_value(data_cfg, "captions_per_image", 5))
    max_words = int(cfg_value(data_cfg, "max_words", 30))
    if not 1 <= per_image <= len(CAPTION_TEMPLATES):
        raise UserError(f"data.captions_per_image must be in 1..{len(CAPTION_TEMPLATES)} for emoji, got {per_image}")
    names, pixels = render_all(image_size)
    total = len(names)
    n_val = requested_size(data_cfg, "validation") or round(SPLIT_FRACTIONS["validation"] * total)
    n_test = requested_size(data_cfg, "test") or round(SPLIT_FRACTIONS["test"] * total)
    n_train = requested_size(data_cfg, "train") or total - n_val - n_test
    parts = seeded_partition(total, {"test": n_test, "validation": n_val, "train": n_train}, seed, "emoji", "emoji")
    splits = {}
    for name in SPLIT_NAMES:
        captions = [emoji_captions(names[i], per_image) for i in parts[name]]
        splits[name] = in_memory_split(name, captions, pixels[torch.from_numpy(parts[name])], max_words)
    return splits
