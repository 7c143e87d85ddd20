"""Image-caption splits: each source turns the data config into train/validation/test `Split`s.

In-memory sources (shapes, emoji) hold their pixels as one uint8 tensor; file-based sources (flickr30k, coco, cc3m,
folder) hold absolute image paths that `load_image` decodes lazily, so building a split only reads annotations.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from mmdistill.errors import UserError
from mmdistill.utils import derive_seed

SPLIT_NAMES = ("train", "validation", "test")
ANNOTATION_DIRS = ("", "annotations", "Annotation")
_DROPPED_CHARACTERS = re.compile(r'[.!"()*#:;~]')


@dataclass
class Split:
    """One split; captions are flattened in file order and linked to images by `txt2img` / `img2txt`."""

    name: str
    captions: list[str]
    txt2img: list[int]
    img2txt: list[list[int]]
    images: torch.Tensor | list[str]
    origin: str = ""  # where the split came from, for people: a file, or "carved from train (...)"

    def __len__(self) -> int:
        return len(self.img2txt)

    def fingerprint(self) -> str:
        """sha256 of captions, caption->image links and image identities (pixels in memory, paths on disk)."""
        digest = hashlib.sha256(json.dumps([self.captions, self.txt2img]).encode())
        if isinstance(self.images, torch.Tensor):
            digest.update(repr(tuple(self.images.shape)).encode())
            digest.update(self.images.contiguous().numpy().tobytes())
        else:
            digest.update(json.dumps(self.images).encode())
        return digest.hexdigest()


def clean_caption(text: str, max_words: int = 30) -> str:
    """Lowercase, `.!"()*#:;~` become spaces, whitespace collapsed, cut to `max_words` words. This is the reference
    code's caption cleaning, so the text features match the ones its experts and synthetic sets were made from;
    captions that differ only in case or in those marks embed alike."""
    return " ".join(_DROPPED_CHARACTERS.sub(" ", text.lower()).split()[:max_words])


def build_splits(data_cfg) -> dict[str, Split]:
    """Build the train/validation/test splits of the source named by `data_cfg.source`."""
    source = data_cfg.source
    if source not in SOURCES:
        raise UserError(f"unknown data source {source!r}; choose one of {', '.join(SOURCES)}")
    splits = SOURCES[source](data_cfg)
    for name in SPLIT_NAMES:
        if len(splits[name]) == 0:
            raise UserError(f"data source {source!r}: the {name} split has no images")
    return splits


def load_image(split: Split, i: int) -> torch.Tensor:
    """Image `i` of the split as uint8 RGB [3,H,W]; greyscale, palette, alpha and 16-bit images are converted.

    Files are decoded with PIL (torchvision's decoders are deprecated since 0.29).
    """
    if isinstance(split.images, torch.Tensor):
        return split.images[i]
    return decode_image(split.images[i])


def decode_image(path: str) -> torch.Tensor:
    """An image file as uint8 RGB [3,H,W]; a UserError naming the file when it is missing or cannot be decoded."""
    if not os.path.isfile(path):
        raise UserError(f"image file not found: {path}")
    try:
        with Image.open(path) as image:
            if image.mode.startswith("I"):  # 16-bit greyscale: PIL's RGB conversion would clip it, so rescale
                image = Image.fromarray((np.asarray(image, np.float32) / 257).round().clip(0, 255).astype(np.uint8))
            pixels = np.array(image.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(f"cannot decode image {path}: {exc}") from None
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


# ---- helpers shared by the sources -------------------------------------------------------------------------------


def with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def cfg_value(data_cfg, name: str, default):
    """An optional data-config field; missing or None falls back to `default`."""
    value = getattr(data_cfg, name, None)
    return default if value is None else value


def requested_size(data_cfg, split_name: str) -> int:
    """Images asked for in a split (data.train_images / val_images / test_images); 0 means the source's default."""
    field = {"train": "train_images", "validation": "val_images", "test": "test_images"}[split_name]
    return int(cfg_value(data_cfg, field, 0))


def seeded_partition(total: int, sizes: dict[str, int], seed: int, key: str, what: str) -> dict[str, np.ndarray]:
    """Disjoint sorted index sets of the given sizes, cut in order from a permutation seeded by (seed, key)."""
    if min(sizes.values()) < 1 or sum(sizes.values()) > total:
        wanted = ", ".join(f"{size} {name}" for name, size in sizes.items())
        raise UserError(f"{what}: {total} images cannot be split into {wanted} images")
    order = np.random.default_rng(derive_seed(seed, key)).permutation(total)
    parts, start = {}, 0
    for name, size in sizes.items():
        parts[name] = np.sort(order[start : start + size])
        start += size
    return parts


def require_root(data_cfg) -> str:
    """`data_cfg.root` as a path that exists, or a UserError naming it."""
    root = cfg_value(data_cfg, "root", None)
    if not root:
        raise UserError(f"data source {data_cfg.source!r} needs data.root (the dataset folder)")
    if not os.path.isdir(root):
        raise UserError(f"data root not found: {root}")
    return str(root)


def find_annotation(root: str, file_name: str) -> str:
    """`file_name` in root, root/annotations or root/Annotation (BLIP's default), first found."""
    candidates = [os.path.join(root, folder, file_name) for folder in ANNOTATION_DIRS]
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise UserError(f"annotation file not found: {candidates[0]} (also looked in {', '.join(candidates[1:])})")


def read_json_list(path: str) -> list:
    """A JSON file whose top level is a list; errors name the file (and line for syntax errors)."""
    try:
        with open(path, encoding="utf-8") as f:
            entries = json.load(f)
    except FileNotFoundError:
        raise UserError(f"annotation file not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text: {exc}") from None
    if not isinstance(entries, list):
        raise UserError(f"{path}: expected a JSON list of entries, got {type(entries).__name__}")
    return entries


def parse_record(entry, where: str, image_key: str = "image", text_key: str = "caption") -> tuple[str, list[str]]:
    """Check one annotation entry: an image name and a caption string or non-empty list of caption strings."""
    if not isinstance(entry, dict):
        raise UserError(f"{where}: expected an object with {image_key!r} and {text_key!r}, got {type(entry).__name__}")
    for key in (image_key, text_key):
        if key not in entry:
            raise UserError(f"{where}: missing key {key!r}")
    image, text = entry[image_key], entry[text_key]
    if not isinstance(image, str) or not image:
        raise UserError(f"{where}: {image_key!r} must be a non-empty string")
    texts = [text] if isinstance(text, str) else text
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise UserError(f"{where}: {text_key!r} must be a string or a non-empty list of strings")
    for text in texts:
        if not clean_caption(text):  # nothing to match its image with; every empty caption would look alike
            raise UserError(f"{where}: empty caption {text!r} (nothing is left after cleaning)")
    return image, texts


def split_from_pairs(name: str, pairs: Iterable[tuple[object, str]], max_words: int) -> Split:
    """Split from (image key, caption) pairs in file order; images are numbered by first appearance."""
    image_ids: dict[object, int] = {}
    captions, txt2img, img2txt = [], [], []
    for image, caption in pairs:
        if image not in image_ids:
            image_ids[image] = len(image_ids)
            img2txt.append([])
        img2txt[image_ids[image]].append(len(captions))
        txt2img.append(image_ids[image])
        captions.append(clean_caption(caption, max_words))
    return Split(name, captions, txt2img, img2txt, list(image_ids))


def split_from_entries(
    name: str,
    path: str,
    entries: list,
    image_root: str,
    max_words: int,
    image_key: str = "image",
    text_key: str = "caption",
    lines: list[int] | None = None,
) -> Split:
    """Split from annotation entries of `path`; image names are taken relative to `image_root`.

    Errors name the entry index, or the line when `lines` gives each entry's line number (JSON Lines, CSV).
    """
    pairs = []
    for index, entry in enumerate(entries):
        where = f"{path}:{lines[index]}" if lines else f"{path}: entry {index}"
        image, texts = parse_record(entry, where, image_key, text_key)
        image_path = os.path.abspath(os.path.join(image_root, image))
        pairs.extend((image_path, text) for text in texts)
    if not pairs:
        raise UserError(f"{path}: no entries")
    return split_from_pairs(name, pairs, max_words)


def subset(split: Split, image_ids, name: str, origin: str) -> Split:
    """The images `image_ids` of a split (in that order) with all their captions, renumbered."""
    captions, txt2img, img2txt = [], [], []
    for new_id, old_id in enumerate(int(i) for i in image_ids):
        img2txt.append(list(range(len(captions), len(captions) + len(split.img2txt[old_id]))))
        for caption_id in split.img2txt[old_id]:
            captions.append(split.captions[caption_id])
            txt2img.append(new_id)
    ids = [int(i) for i in image_ids]
    images = (
        split.images[torch.tensor(ids, dtype=torch.long)]
        if isinstance(split.images, torch.Tensor)
        else [split.images[i] for i in ids]
    )
    return Split(name, captions, txt2img, img2txt, images, origin)


def carve_missing(splits: dict[str, Split], data_cfg, what: str) -> dict[str, Split]:
    """Fill in validation / test when a source has only some splits: whole images (with all their captions) are
    carved out of train by a permutation seeded by data.seed. Sizes: data.val_images / data.test_images, or
    where 0, data.val_fraction / data.test_fraction of train's images (at least 1)."""
    missing = [name for name in SPLIT_NAMES if name not in splits]
    if not missing:
        return splits
    train = splits["train"]
    sizes = {}
    for name in missing:
        fraction = cfg_value(data_cfg, "val_fraction" if name == "validation" else "test_fraction", 0.1)
        sizes[name] = requested_size(data_cfg, name) or max(1, round(fraction * len(train)))
    sizes["train"] = len(train) - sum(sizes.values())
    if sizes["train"] < 1:
        wanted = ", ".join(f"{size} {name}" for name, size in sizes.items() if name != "train")
        raise UserError(
            f"{what}: its {len(train)} training images cannot give {wanted} images and keep some for"
            " training; lower data.val_images / data.test_images (or the fractions)"
        )
    seed = int(cfg_value(data_cfg, "seed", 0))
    parts = seeded_partition(len(train), sizes, seed, "carve", what)
    result = {"train": subset(train, parts["train"], "train", f"{train.origin}, less the carved images".lstrip(", "))}
    for name in SPLIT_NAMES[1:]:
        result[name] = (
            splits[name]
            if name in splits
            else subset(
                train, parts[name], name, f"carved from train: {sizes[name]} of {len(train)} images, seed {seed}"
            )
        )
    return result


def in_memory_split(name: str, captions_per_image: list[list[str]], images: torch.Tensor, max_words: int) -> Split:
    """Split of a source that holds its pixels (uint8 [N,3,H,W]); image i has captions_per_image[i]."""
    pairs = ((i, caption) for i, captions in enumerate(captions_per_image) for caption in captions)
    split = split_from_pairs(name, pairs, max_words)
    split.images = images
    return split


# The sources use the helpers above, so they are imported after them.
from mmdistill.data import cc3m, emoji, folder, hf, karpathy, shapes  # noqa: E402

SOURCES = {
    "shapes": shapes.build,
    "emoji": emoji.build,
    "flickr30k": karpathy.build_flickr30k,
    "coco": karpathy.build_coco,
    "cc3m": cc3m.build,
    "folder": folder.build,
    "hf": hf.build,
}

# Whether a horizontal flip keeps captions true: shapes and emoji captions (and names) say left/right.
SOURCE_FLIP_SAFE = {
    "shapes": shapes.FLIP_SAFE,
    "emoji": emoji.FLIP_SAFE,
    "flickr30k": karpathy.FLIP_SAFE,
    "coco": karpathy.FLIP_SAFE,
    "cc3m": cc3m.FLIP_SAFE,
    "folder": folder.FLIP_SAFE,
    "hf": hf.FLIP_SAFE,
}
