"""Students for benchmarks: the preset's student sized without loading data or a text encoder."""

from __future__ import annotations

from mmdistill.encoders import build_text_encoder
from mmdistill.model import DualEncoder, build_model

TEXT_DIMS = {"minilm": 384, "hf:bert-base-uncased": 768}  # lets benchmarks size a student without a download


def build_bench_model(cfg) -> DualEncoder:
    """The preset's student with random init (no weight download), for benchmarks that need only its shapes."""
    from omegaconf import OmegaConf

    text_dim = TEXT_DIMS.get(cfg.model.text_encoder) or build_text_encoder(cfg.model.text_encoder).dim
    return build_model(
        OmegaConf.merge(cfg.model, {"pretrained": False}), text_dim=text_dim, image_size=cfg.data.image_size, seed=0
    )
