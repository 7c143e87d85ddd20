"""`folder`: your own image-caption data in the Hugging Face imagefolder layout.

Either one folder (the usual case; validation and test are carved out of it by a seeded split):

    ROOT/metadata.csv      file_name,text          (or metadata.jsonl: {"file_name": "img/a.jpg", "text": "..."})
    ROOT/img/a.jpg ...     images anywhere below ROOT; file_name is relative to ROOT

or one folder per split, each with its own metadata file (file names relative to that folder):

    ROOT/train/metadata.jsonl   ROOT/validation/metadata.jsonl   ROOT/test/metadata.jsonl

Split folders may use the names `datasets` accepts (validation: val, valid, dev, eval; test: testing; train:
training); a missing validation or test split is carved out of train. Several captions per image: repeat the
file_name row, or give `text` as a list (a JSON list in a CSV cell).
"""

from __future__ import annotations

import csv
import json
import os

from mmdistill.data import carve_missing, cfg_value, split_from_entries
from mmdistill.errors import UserError

FLIP_SAFE = True
SPLIT_FOLDERS = {
    "train": ("train", "training"),
    "validation": ("validation", "val", "valid", "dev", "eval"),
    "test": ("test", "testing"),
}
METADATA_FILES = ("metadata.jsonl", "metadata.csv")


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
    for file_name, reader in zip(METADATA_FILES, (read_jsonl, read_csv)):
        path = os.path.join(split_dir, file_name)
        if os.path.isfile(path):
            try:
                return path, *reader(path)
            except UnicodeDecodeError as exc:
                raise UserError(f"{path}: not UTF-8 text: {exc}") from None
    raise UserError(f"metadata file not found: {os.path.join(split_dir, METADATA_FILES[0])} (or metadata.csv)")


def _has_metadata(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, name)) for name in METADATA_FILES)


def layout_error(root, problem: str) -> UserError:
    """What was wrong, the layout the source expects, and a command that uses it, in one line."""
    shown = root or "DIR"
    return UserError(
        f"{problem}; the folder source expects {shown}/metadata.csv (columns file_name,text; file_name"
        f" relative to {shown}, e.g. img/a.jpg) or metadata.jsonl, or split folders {shown}/train/"
        f"metadata.jsonl (+ validation/, test/), e.g. mmdistill run --preset shapes-100 --set"
        f" data.source=folder --set data.root={shown} --out runs/mine"
    )


def build(data_cfg) -> dict:
    root = cfg_value(data_cfg, "root", None)
    if not root:
        raise layout_error(None, "data source 'folder' needs data.root")
    if not os.path.isdir(root):
        raise layout_error(root, f"data root not found: {root}")
    root = str(root)
    max_words = int(cfg_value(data_cfg, "max_words", 30))
    found = {}
    for name, folders in SPLIT_FOLDERS.items():
        split_dir = next((os.path.join(root, f) for f in folders if _has_metadata(os.path.join(root, f))), None)
        if split_dir is not None:
            found[name] = split_dir
    if "train" not in found:
        if found:
            raise layout_error(root, f"{root} has {', '.join(found)} split folders but no train/ with a metadata file")
        if not _has_metadata(root):
            raise layout_error(root, f"no metadata.csv or metadata.jsonl in {root}")
        found = {"train": root}  # one flat folder: everything is train until validation and test are carved
    splits = {}
    for name, split_dir in found.items():
        path, entries, lines = read_metadata(split_dir)
        splits[name] = split_from_entries(name, path, entries, split_dir, max_words, "file_name", "text", lines)
        splits[name].origin = path
    return carve_missing(splits, data_cfg, f"data source 'folder' ({root})")
