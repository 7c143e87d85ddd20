"""`flickr30k` and `coco`: Karpathy splits in BLIP's annotation format.

Layout (annotation files in data.root, or data.root/annotations, or data.root/Annotation):

    flickr30k_train.json  flickr30k_val.json  flickr30k_test.json
    coco_karpathy_train.json  coco_karpathy_val.json  coco_karpathy_test.json

train files hold one entry per caption, {"image", "caption": str, "image_id"}; val/test files one entry per image,
{"image", "caption": [str, ...]}. Either form is accepted in any file. Captions keep file order; images are numbered
by first appearance. `image` is relative to data.image_root when set, else to data.root.
"""

from __future__ import annotations

from mmdistill.data import cfg_value, find_annotation, read_json_list, require_root, split_from_entries

FLIP_SAFE = True
ANNOTATION_FILES = {
    "flickr30k": {"train": "flickr30k_train.json", "validation": "flickr30k_val.json", "test": "flickr30k_test.json"},
    "coco": {
        "train": "coco_karpathy_train.json",
        "validation": "coco_karpathy_val.json",
        "test": "coco_karpathy_test.json",
    },
}


def build(data_cfg, dataset: str) -> dict:
    root = require_root(data_cfg)
    image_root = cfg_value(data_cfg, "image_root", root)
    max_words = int(cfg_value(data_cfg, "max_words", 30))
    splits = {}
    for name, file_name in ANNOTATION_FILES[dataset].items():
        path = find_annotation(root, file_name)
        splits[name] = split_from_entries(name, path, read_json_list(path), image_root, max_words)
    return splits


def build_flickr30k(data_cfg) -> dict:
    return build(data_cfg, "flickr30k")


def build_coco(data_cfg) -> dict:
    return build(data_cfg, "coco")
