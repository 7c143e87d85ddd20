"""`folder`: the Hugging Face imagefolder layout, for any image-caption set of your own.

    ROOT/train/metadata.jsonl        {"file_name": "a.jpg", "text": "a caption"}   (or "text": ["one", "two"])
    ROOT/validation/metadata.jsonl   (the folder may be called `val`)
    ROOT/test/metadata.jsonl

`metadata.csv` with `file_name` and `text` columns works too; a text cell holding a JSON list gives several
captions. `file_name` is relative to the split folder. Rows naming the same file add captions to one image.
"""
from __future__ import annotations

import csv
import json
import os

from mmdistill.data import cfg_value, require_root, split_from_entries
from mmdistill.errors import UserError

FLIP_SAFE = True
SPLIT_FOLDERS = {"train": ("train",), "validation": ("validation", "val"), "test": ("test",)}


def read_jsonl(path: str) -> tuple[list, list[int]]:
    """Entries of a JSON Lines file and their line numbers; blank lines are skipped."""
    entries, lines = [], []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{number}: invalid JSON: {exc.msg}") from None
            lines.append(number)
    return entries, lines


def read_csv(path: str) -> tuple[list, list[int]]:
    """Rows of a CSV file with a header, and the line each row ends on; a `text` cell may be a JSON list."""
    entries, lines = [], []
    with open(path, encoding="utf-8-sig", newline="") as f:  # spreadsheets often start CSVs with a BOM
        reader = csv.DictReader(f)
        for row in reader:
            text = row.get("text")
            if isinstance(text, str) and text.lstrip().startswith("["):
                try:
                    row["text"] = json.loads(text)
                except json.JSONDecodeError:
                    pass  # a caption that merely starts with "["
            entries.append(row)
            lines.append(reader.line_num)
    return entries, lines


def read_metadata(split_dir: str) -> tuple[str, list, list[int]]:
    for file_name, reader in (("metadata.jsonl", read_jsonl), ("metadata.csv", read_csv)):
        path = os.path.join(split_dir, file_name)
        if os.path.isfile(path):
            try:
                return path, *reader(path)
            except UnicodeDecodeError as exc:
                raise UserError(f"{path}: not UTF-8 text: {exc}") from None
    raise UserError(f"metadata file not found: {os.path.join(split_dir, 'metadata.jsonl')} (or metadata.csv)")


def build(data_cfg) -> dict:
    root = require_root(data_cfg)
    max_words = int(cfg_value(data_cfg, "max_words", 30))
    splits = {}
    for name, folders in SPLIT_FOLDERS.items():
        split_dir = next((os.path.join(root, f) for f in folders if os.path.isdir(os.path.join(root, f))), None)
        if split_dir is None:
            raise UserError(f"split folder not found: {os.path.join(root, folders[0])}")
        path, entries, lines = read_metadata(split_dir)
        splits[name] = split_from_entries(name, path, entries, split_dir, max_words, "file_name", "text", lines)
    return splits
