"""The `hf` data source: datasets the test builds and saves locally (save_to_disk and a parquet folder)."""

import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

datasets = pytest.importorskip("datasets")

from mmdistill.data import build_splits  # noqa: E402
from mmdistill.errors import UserError  # noqa: E402


def config(name, **overrides):
    fields = dict(
        source="hf",
        name=str(name),
        image_column="image",
        text_column="text",
        split_map={},
        image_size=8,
        seed=0,
        max_words=30,
        val_images=0,
        test_images=0,
        val_fraction=0.1,
        test_fraction=0.1,
    )
    return SimpleNamespace(**{**fields, **overrides})


def table(rows, offset=0):
    from PIL import Image

    images = [Image.fromarray(np.full((10 + i, 12, 3), 20 * (i + offset) % 250, np.uint8)) for i in range(rows)]
    captions = [[f"photo {i + offset}", f"another view of {i + offset}"] for i in range(rows)]
    return datasets.Dataset.from_dict(
        {"picture": images, "caption": captions},
        features=datasets.Features(
            {"picture": datasets.Image(), "caption": datasets.Sequence(datasets.Value("string"))}
        ),
    )


def test_save_to_disk_dataset_with_columns_and_split_map(tmp_path):
    folder = tmp_path / "set"
    datasets.DatasetDict({"train": table(10), "dev": table(3, 50), "holdout": table(4, 80)}).save_to_disk(str(folder))
    cfg = config(folder, image_column="picture", text_column="caption", split_map={"test": "holdout"})
    splits = build_splits(cfg)
    assert [len(splits[n]) for n in ("train", "validation", "test")] == [10, 3, 4]  # dev found as validation
    assert splits["train"].images.shape == (10, 3, 8, 8) and splits["train"].images.dtype.is_floating_point is False
    assert splits["validation"].captions[:2] == ["photo 50", "another view of 50"]
    assert splits["validation"].img2txt[0] == [0, 1] and splits["test"].origin == f"{folder} [holdout]"
    with pytest.raises(UserError, match="'data.image_column': split 'train' of .* has columns picture, caption"):
        build_splits(config(folder, text_column="caption"))
    with pytest.raises(UserError, match=r"'data.split_map.test': dataset .* has splits train, dev, holdout"):
        build_splits(config(folder, image_column="picture", text_column="caption", split_map={"test": "nope"}))


def test_parquet_folder_through_load_dataset_carves_missing_splits(tmp_path):
    folder = tmp_path / "pq"
    (folder / "data").mkdir(parents=True)
    table(20).to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    splits = build_splits(config(folder, image_column="picture", text_column="caption", val_images=2))
    assert [len(splits[n]) for n in ("train", "validation", "test")] == [16, 2, 2]
    assert splits["test"].origin == "carved from train: 2 of 20 images, seed 0"


def test_missing_local_folder_and_offline_hub_id_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="dataset folder not found: ./no/such/folder"):
        build_splits(config("./no/such/folder"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mmdistill",
            "prepare",
            "--preset",
            "shapes-tiny",
            "--set",
            "data.source=hf",
            "--set",
            "data.name=nobody/no-such-dataset",
            "--set",
            f"cache_dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mmdistill: error: cannot load dataset 'nobody/no-such-dataset'")
