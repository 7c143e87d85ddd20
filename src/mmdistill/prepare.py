"""Stage 1: the data source's splits plus the cached frozen features every later stage reads.

`prepare(cfg)` returns a `Prepared` bundle: splits, caption features per split, and the image inputs of the
student per split (frozen image features in frozen-image mode; resized pixels in [0, 1] for in-memory sources).
Everything heavy is cached on disk by `features.py`, so a second call is cheap.
"""

from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mmdistill.config import total_pairs
from mmdistill.data import SOURCE_FLIP_SAFE, Split, build_splits, decode_image, load_image
from mmdistill.data.transforms import build_transform, normalize, pictures, pixel_tensor
from mmdistill.data.whitening import Whitening, load_whitening
from mmdistill.encoders import build_image_encoder
from mmdistill.errors import UserError
from mmdistill.features import cache_path, image_features, text_features
from mmdistill.io import write_json
from mmdistill.utils import digest, resolve_device

SPLITS = ("train", "validation", "test")
logger = logging.getLogger(__name__)


@dataclass
class Prepared:
    splits: dict[str, Split]
    texts: dict[str, torch.Tensor]  # caption features [captions, text_dim] per split
    features: dict[str, torch.Tensor] = field(default_factory=dict)  # frozen image features per split
    pixels: dict[str, torch.Tensor] = field(default_factory=dict)  # [N,3,s,s] in [0,1], in-memory sources
    mean: tuple = (0.5, 0.5, 0.5)  # the image encoder's input normalisation
    std: tuple = (0.5, 0.5, 0.5)
    flip_safe: bool = True
    whitening: Whitening | None = None  # data.whiten=zca: applied after mean/std to every pixel input
    seconds: float = 0.0

    @property
    def text_dim(self) -> int:
        return self.texts["train"].shape[1]

    def normalize(self, pixels01: torch.Tensor) -> torch.Tensor:
        """The student's pixel inputs: mean/std normalised, then whitened where the data is."""
        return self.whiten(normalize(pixels01, self.mean, self.std))

    def whiten(self, normalized: torch.Tensor) -> torch.Tensor:
        """Mean/std normalised pixels (a DataLoader's output) as the student reads them."""
        return normalized if self.whitening is None else self.whitening.apply(normalized)

    def pictures(self, inputs: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1] of pixel inputs (synthetic or real): whitening and normalisation undone."""
        return pictures(inputs, self.mean, self.std, self.whitening)

    def pixels01(self, split: str, ids: torch.Tensor, image_size: int) -> torch.Tensor:
        """Test-transformed pixels in [0, 1] of some images of a split: from memory, else decoded from files."""
        if split in self.pixels:
            return self.pixels[split][ids]
        transform = build_transform(image_size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "none")
        return torch.stack([transform(load_image(self.splits[split], i)) for i in ids.tolist()])

    def pairs(
        self, split: str, captions: torch.Tensor, space: str, image_size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
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


def check_pairs(cfg, train: Split, whole_budget: bool = False) -> None:
    """A phase's synthetic pairs start as distinct training caption entries, so no phase may have more pairs than
    the training split has captions; checked before any expert trains. `whole_budget`: the sum of the phases'
    pairs must fit too, as for a coreset baseline; a method without phases (distill.use_phases=false) always
    distils the whole budget as one phase."""
    captions = len(train.captions)
    for i, phase in enumerate(cfg.distill.phases):
        if phase.pairs > captions:
            raise UserError(
                f"bad value {phase.pairs!r} for 'distill.phases.{i}.pairs': the training split has only"
                f" {captions} captions"
            )
    total = total_pairs(cfg)
    if (whole_budget or not cfg.distill.use_phases) and total > captions:
        raise UserError(
            f"bad value for 'distill.phases': {total} pairs in all, but the training split has only {captions} captions"
        )


def verify_images(splits: dict[str, Split], cache: Path) -> None:
    """Decode every image file the splits index, so a missing or corrupt file stops `prepare` with its name
    instead of a later stage. Files already decoded are remembered by size and modification time in
    cache/verified/, so each file is decoded once."""
    paths = sorted({path for split in splits.values() if isinstance(split.images, list) for path in split.images})
    if not paths:
        return
    record = cache / "verified" / f"images-{digest(paths)}.json"
    try:
        known = json.loads(record.read_text()) if record.exists() else {}
    except json.JSONDecodeError:
        known = {}
    stamps = {}
    for path in paths:
        try:
            stat = os.stat(path)
        except OSError:
            raise UserError(f"image file not found: {path}") from None
        stamps[path] = [stat.st_size, stat.st_mtime_ns]
    todo = [path for path in paths if known.get(path) != stamps[path]]
    if not todo:
        return
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        try:
            for path, _ in zip(todo, pool.map(lambda path: decode_image(path).shape, todo)):
                known[path] = stamps[path]
        finally:  # keep what was verified before a bad file
            write_json({path: known[path] for path in paths if path in known}, record)


def prepare(cfg, verbose: bool = False) -> Prepared:
    """Build the splits (every image file decoded once) and their cached features for a config."""
    start = time.perf_counter()
    device = resolve_device(cfg.device)
    splits = build_splits(cfg.data)
    check_pairs(cfg, splits["train"])
    verify_images(splits, cache_dir(cfg))
    encoder = build_image_encoder(
        cfg.model.image_encoder, image_size=cfg.data.image_size, pretrained=False, **dict(cfg.model.convnet)
    )
    bundle = Prepared(
        splits=splits,
        texts={},
        mean=tuple(encoder.mean),
        std=tuple(encoder.std),
        flip_safe=SOURCE_FLIP_SAFE.get(cfg.data.source, True),
    )
    for name in SPLITS:
        split = splits[name]
        bundle.texts[name] = text_features(split, cfg.model.text_encoder, cache_dir(cfg), device)
        if not cfg.model.image_trainable:
            bundle.features[name] = image_features(
                split,
                cfg.model.image_encoder,
                cfg.data.image_size,
                cache_dir(cfg),
                device,
                pretrained=cfg.model.pretrained,
                convnet=dict(cfg.model.convnet),
            )
        if isinstance(split.images, torch.Tensor):
            bundle.pixels[name] = pixel_tensor(split, cfg.data.image_size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    if cfg.data.whiten == "zca":
        bundle.whitening = _fit_whitening(cfg, bundle)
    bundle.seconds = time.perf_counter() - start
    if verbose:
        _report_splits(cfg, bundle)
    return bundle


def _fit_whitening(cfg, bundle: Prepared) -> Whitening:
    """ZCA on the normalised training images, 1,000 at a time (files decode lazily), cached beside the features:
    a fit takes about 13 s at 32 px and every stage of a run prepares its own bundle. The cached file also gives
    every process the same transform, whatever its thread count."""
    train, size = bundle.splits["train"], cfg.data.image_size
    key = {
        "kind": "zca",
        "split": train.fingerprint(),
        "image_size": size,
        "mean": bundle.mean,
        "std": bundle.std,
        "epsilon": cfg.data.zca_epsilon,
    }
    path = cache_path(cache_dir(cfg), key)
    cached = load_whitening(path)
    if cached is not None:
        return cached
    chunks = (bundle.normalize(bundle.pixels01("train", ids, size)) for ids in torch.arange(len(train)).split(1000))
    fitted = Whitening.fit(chunks, cfg.data.zca_epsilon)
    fitted.save(path)
    return fitted


_reported: set[tuple] = set()  # splits already described by this process (run calls prepare once per stage)


def _report_splits(cfg, bundle: Prepared) -> None:
    """One line: the split sizes and where each split came from (a file, or carved from train by a seed)."""
    key = tuple(bundle.splits[name].fingerprint() for name in SPLITS)
    if key in _reported:
        return
    _reported.add(key)
    parts = [
        f"{name} {len(s)} images / {len(s.captions)} captions" + (f" ({s.origin})" if s.origin else "")
        for name, s in ((name, bundle.splits[name]) for name in SPLITS)
    ]
    logger.info("prepared %s in %.1f s: %s", cfg.data.source, bundle.seconds, "; ".join(parts))


def print_summary(bundle: Prepared) -> None:
    """Dataset statistics: images and captions per split, feature shapes."""
    print(f"{'split':<11} {'images':>7} {'captions':>9}  {'text features':<14} {'image inputs':<17} from")
    for name in SPLITS:
        split = bundle.splits[name]
        image = bundle.features.get(name, bundle.pixels.get(name))
        image_shape = "loaded from files" if image is None else "x".join(map(str, image.shape))
        text_shape = "x".join(map(str, bundle.texts[name].shape))
        print(
            f"{name:<11} {len(split):>7} {len(split.captions):>9}  {text_shape:<14} {image_shape:<17} "
            f"{split.origin or '-'}"
        )
