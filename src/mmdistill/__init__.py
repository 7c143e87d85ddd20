"""mmdistill: multimodal (image-text) dataset distillation (PTM-ST, LoRS, MTT-VL, representation blending)."""

__version__ = "0.1.0"
