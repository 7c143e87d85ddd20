"""`cc3m`: Conceptual Captions subsets, one caption per image. Accepted layouts, first match wins:

1. Split files (PTM-ST), in data.root or data.root/annotations or data.root/Annotation:
   `cc3m_captions_train.json`, `cc3m_captions_val.json`, `cc3m_captions_test.json`, each [{"image", "caption"}].
   Each split keeps its first data.{train,val,test}_images entries when set; test keeps the first 10,000 by default
   (the reference's retrieval evaluation does the same).
2. LLaVA-CC3M-Pretrain-595K `chat.json` in data.root: [{"id", "image", "conversations": [{"from": "human", ...},
   {"from": "gpt", "value": caption}, ...]}]; the caption is the first "gpt" turn.
3. A plain `metadata.json` in data.root: [{"image", "caption"}] (LLaVA's metadata.json has this form).

With one file (2, 3) the images are split by a permutation drawn from data.seed: validation and test get
data.val_images / data.test_images images (default 1000 each, at most a tenth of the images), train the rest
(or data.train_images). Image names are relative to data.image_root when set; otherwise to data.root for
layout 1, and to data.root/images (where LLaVA's images.zip unpacks) or data.root for layouts 2 and 3.
"""

from __future__ import annotations

import os

from mmdistill.data import (
    ANNOTATION_DIRS,
    SPLIT_NAMES,
    cfg_value,
    find_annotation,
    parse_record,
    read_json_list,
    requested_size,
    require_root,
    seeded_partition,
    split_from_entries,
    split_from_pairs,
)
from mmdistill.errors import UserError

FLIP_SAFE = True
SPLIT_FILES = {
    "train": "cc3m_captions_train.json",
    "validation": "cc3m_captions_val.json",
    "test": "cc3m_captions_test.json",
}
DEFAULT_TEST_CAP = 10_000
DEFAULT_HELD_OUT = 1000  # validation and test images each, for a single annotation file


def chat_caption(entry, where: str) -> dict:
    """A LLaVA chat entry as {"image", "caption"}, the caption being the first "gpt" turn."""
    conversations = entry.get("conversations") if isinstance(entry, dict) else None
    if not isinstance(conversations, list):
        raise UserError(f"{where}: expected an object with a 'conversations' list")
    for turn in conversations:
        if isinstance(turn, dict) and turn.get("from") == "gpt" and isinstance(turn.get("value"), str):
            return {"image": entry.get("image"), "caption": turn["value"]}
    raise UserError(f"{where}: no 'gpt' turn with a caption string")


def _from_split_files(data_cfg, root: str, max_words: int) -> dict:
    image_root = cfg_value(data_cfg, "image_root", root)
    splits = {}
    for name, file_name in SPLIT_FILES.items():
        path = find_annotation(root, file_name)
        keep = requested_size(data_cfg, name) or (DEFAULT_TEST_CAP if name == "test" else None)
        splits[name] = split_from_entries(name, path, read_json_list(path)[:keep], image_root, max_words)
    return splits


def _from_single_file(data_cfg, root: str, path: str, chat: bool, max_words: int) -> dict:
    images = os.path.join(root, "images")
    image_root = cfg_value(data_cfg, "image_root", images if os.path.isdir(images) else root)
    records = []
    for index, entry in enumerate(read_json_list(path)):
        where = f"{path}: entry {index}"
        image, texts = parse_record(chat_caption(entry, where) if chat else entry, where)
        records.append((os.path.abspath(os.path.join(image_root, image)), texts))
    total = len(records)
    n_val = requested_size(data_cfg, "validation") or min(DEFAULT_HELD_OUT, total // 10)
    n_test = requested_size(data_cfg, "test") or min(DEFAULT_HELD_OUT, total // 10)
    n_train = requested_size(data_cfg, "train") or total - n_val - n_test
    parts = seeded_partition(
        total,
        {"test": n_test, "validation": n_val, "train": n_train},
        int(cfg_value(data_cfg, "seed", 0)),
        "cc3m",
        path,
    )
    return {
        name: split_from_pairs(name, ((records[i][0], text) for i in parts[name] for text in records[i][1]), max_words)
        for name in SPLIT_NAMES
    }


def build(data_cfg) -> dict:
    root = require_root(data_cfg)
    max_words = int(cfg_value(data_cfg, "max_words", 30))
    if any(os.path.isfile(os.path.join(root, folder, SPLIT_FILES["train"])) for folder in ANNOTATION_DIRS):
        return _from_split_files(data_cfg, root, max_words)
    for file_name, chat in (("chat.json", True), ("metadata.json", False)):
        path = os.path.join(root, file_name)
        if os.path.isfile(path):
            return _from_single_file(data_cfg, root, path, chat, max_words)
    raise UserError(
        f"no CC3M annotations in {root}: expected {SPLIT_FILES['train']} (with the val/test files), "
        "chat.json or metadata.json"
    )
