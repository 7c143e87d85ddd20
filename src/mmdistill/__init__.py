"""mmdistill: multimodal (image-text) dataset distillation (PTM-ST, LoRS, MTT-VL, representation blending)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mmdistill")  # written once, in pyproject.toml
except PackageNotFoundError:  # a source tree on PYTHONPATH that was never installed
    __version__ = "0+unknown"


def __getattr__(name: str):
    """The public API, imported on first use so that `import mmdistill` (and the CLI) stays fast."""
    if name == "load_distilled":
        from mmdistill.synthetic import load_distilled

        return load_distilled
    if name == "train_student":
        from mmdistill.evaluation.student import train_student

        return train_student
    raise AttributeError(f"module 'mmdistill' has no attribute {name!r}")


__all__ = ["load_distilled", "train_student", "__version__"]
