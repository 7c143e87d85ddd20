"""`bench cross-arch`: synthetic images distilled through one image encoder, trained on by others.

The standard transfer table of dataset distillation: the preset's method distils pixels (on a feature-space preset
`ptm-st+pixels`, pixels through the same frozen encoder), then students with other image encoders train on the
distilled images and, beside them, on a random coreset of real pairs at the same budget. A distilled lr was learned
for the distilling student, so every student picks its lr on validation for both sets alike: for the distilled set
among its own learned lrs and `evaluate.coreset_lrs`, for the coreset among `evaluate.coreset_lrs`.

Output folder: the study's stages (experts/, methods/ or distilled/, stages.json), cross-arch.json (one row per
student) and cross-arch.md (the table).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from omegaconf import OmegaConf

from mmdistill.config import total_pairs, with_method
from mmdistill.evaluation.baselines import best_lr_on_validation, coreset_phases
from mmdistill.io import folder_lock, read_json, write_json, write_text
from mmdistill.pipeline import open_study
from mmdistill.report.document import cross_arch_caption, cross_arch_rows, write_report
from mmdistill.synthetic import load_synthetic

logger = logging.getLogger(__name__)

# The students, each a set of model overrides: the distilling encoder frozen and fine-tuned, ConvNets of other
# widths and depths from scratch, and a ResNet from random init (timm; no weights are downloaded).
STUDENTS: dict[str, dict] = {
    "efficientnet_lite0, frozen": {"image_encoder": "efficientnet_lite0", "image_trainable": False, "pretrained": True},
    "efficientnet_lite0, fine-tuned": {
        "image_encoder": "efficientnet_lite0",
        "image_trainable": True,
        "pretrained": True,
    },
    "convnet depth 3 width 32, scratch": {
        "image_encoder": "convnet",
        "image_trainable": True,
        "convnet": {"depth": 3, "width": 32},
    },
    # MTT's ConvNetD4 for 64 px images. A trained image encoder's flattened output is the joint embedding, and the
    # text projection holds an embed_dim x embed_dim layer: depth 2 x width 64 at 64 px is 16,384-d (a 268M-weight
    # layer, more than 37 minutes for one row here), depth 4 x width 64 is 1,024-d.
    "convnet depth 4 width 64, scratch": {
        "image_encoder": "convnet",
        "image_trainable": True,
        "convnet": {"depth": 4, "width": 64},
    },
    "timm:resnet18, scratch": {"image_encoder": "timm:resnet18", "image_trainable": True, "pretrained": False},
}


def pixel_method(cfg) -> str:
    """The method that distils pixels for this preset: its own, or ptm-st+pixels on a feature-space preset."""
    return "ptm-st+pixels" if cfg.distill.space == "feature" else cfg.distill.method


def _student_cfg(cfg, overrides: dict):
    """The student's model settings; its encoder goes through evaluate.image_encoder, the cross-architecture
    switch, so that a frozen student reads the cached features only where its encoder is the preset's."""
    model = {k: v for k, v in overrides.items() if k != "image_encoder"}
    return OmegaConf.merge(cfg, {"model": model, "evaluate": {"image_encoder": overrides.get("image_encoder")}})


def run_cross_arch(cfg, out: Path, students: dict[str, dict] | None = None) -> dict:
    """Distil pixels with the preset's encoder (reused when unchanged), then one row per student."""
    out, students = Path(out), students or STUDENTS
    with folder_lock(out):
        study = open_study(cfg, out)
        method = pixel_method(cfg)
        study.row(method)  # distils (or reuses) and scores it under the distilling student
        pixel_cfg = with_method(cfg, method)
        distilled = load_synthetic(study.distill_dir(method))
        bundle = study.bundle()
        coreset = coreset_phases(pixel_cfg, bundle, "random", out / "experts", cfg.seed)
        lrs = list(cfg.evaluate.coreset_lrs)
        rows = {}
        for name, overrides in students.items():
            started = time.perf_counter()
            student = _student_cfg(pixel_cfg, overrides)
            rows[name] = {
                method: best_lr_on_validation(student, bundle, distilled, [None, *lrs], cfg.seed, "own"),
                "random": best_lr_on_validation(student, bundle, coreset, lrs, cfg.seed, "own"),
                "seconds": round(time.perf_counter() - started, 1),
            }
            logger.info(
                "%s: %s %.1f, random %.1f (%.0f s)",
                name,
                method,
                rows[name][method]["r_mean"],
                rows[name]["random"]["r_mean"],
                rows[name]["seconds"],
            )
        results = {
            "preset": cfg.name,
            "method": method,
            "distilled_with": cfg.model.image_encoder,
            "pairs": total_pairs(cfg),
            "students": rows,
        }
        write_json(results, out / "cross-arch.json")
        table = cross_arch_table(results)
        write_text(f"# Cross-architecture transfer ({cfg.name})\n\n{table}\n", out / "cross-arch.md")
        if (out / "report.html").exists():  # a run's folder: its report gains the table
            write_report(out, read_json(out / "results.json"))
    print(table)
    return results


def cross_arch_table(results: dict) -> str:
    """Markdown: what was distilled, then one row per student (`report.document.cross_arch_rows`)."""
    header, rows = cross_arch_rows(results)
    lines = [cross_arch_caption(results), "", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
