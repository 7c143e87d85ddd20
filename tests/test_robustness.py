"""The robustness benchmark's pieces: the Tux Paint imagefolder, the summary and the report."""

import json

import pytest
from omegaconf import OmegaConf
from PIL import Image

from mmdistill.bench.robustness import build_tuxpaint_folder, robustness_sets, summarize, write_robustness_report
from mmdistill.data.folder import build as build_folder


def _entry(r_mean):
    return {"r_mean": r_mean, "r_mean_std": 0.5, "runs": 3}


def test_report_states_every_row_and_the_acceptance_figures(tmp_path):
    rows = [
        {
            "set": "a",
            "pairs": 50,
            "what": "",
            "collapsed": False,
            "methods": {"ptm-st": _entry(30.0), "random": _entry(10.0), "full": _entry(40.0)},
        },
        {
            "set": "b",
            "pairs": 100,
            "what": "",
            "collapsed": True,
            "methods": {"ptm-st": _entry(5.0), "random": _entry(20.0), "full": _entry(40.0)},
        },
    ]
    results = {"rows": rows, "skipped": [{"set": "tuxpaint", "reason": "not installed"}], "summary": summarize(rows)}
    assert results["summary"] == {"rows": 2, "above_random": 1, "median_ratio_to_random": 1.625, "collapsed": 1}
    write_robustness_report(tmp_path, results)
    text = (tmp_path / "robustness.md").read_text()
    assert "| a | 50 | 30.0 ± 0.5 | 10.0 ± 0.5 | 40.0 ± 0.5 | 3.00x | no |" in text
    assert "| b | 100 | 5.0 ± 0.5 | 20.0 ± 0.5 | 40.0 ± 0.5 | 0.25x | YES |" in text
    assert "in 1 of 2 rows" in text and "Skipped tuxpaint: not installed" in text
    assert (tmp_path / "robustness.png").stat().st_size > 0


def test_sets_cover_sizes_captions_image_sizes_and_a_real_source(tmp_path):
    sets = {s.name: s for s in robustness_sets(tmp_path)}
    assert len(sets) >= 6 and "tuxpaint" in sets
    overrides = " ".join(o for s in sets.values() for o in s.overrides)
    for needle in (
        "data.train_images=300",
        "data.train_images=3000",
        "data.captions_per_image=1",
        "data.image_size=32",
    ):
        assert needle in overrides
    assert not any("lr" in o for s in sets.values() for o in s.overrides)  # no per-set tuning


def test_tuxpaint_folder_is_an_imagefolder_with_real_captions(tmp_path):
    stamps = tmp_path / "stamps" / "animals"
    stamps.mkdir(parents=True)
    for i in range(120):
        Image.new("RGBA", (40, 30), (i, 0, 0, 128)).save(stamps / f"s{i}.png")
        (stamps / f"s{i}.txt").write_text(f"A stamp number {i}.\nfr.utf8=Un timbre.\n")
    (stamps / "uncaptioned.png").write_bytes((stamps / "s0.png").read_bytes())
    out = build_tuxpaint_folder(tmp_path / "folder", tmp_path / "stamps")
    counts = {
        split: len((out / split / "metadata.jsonl").read_text().splitlines())
        for split in ("train", "validation", "test")
    }
    assert counts == {"train": 84, "validation": 12, "test": 24}
    row = json.loads((out / "train" / "metadata.jsonl").read_text().splitlines()[0])
    assert row["text"].startswith("A stamp number") and "fr.utf8" not in row["text"]
    with Image.open(out / "train" / row["file_name"]) as image:
        assert image.mode == "RGB"  # flattened onto white
    splits = build_folder(OmegaConf.create({"source": "folder", "root": str(out), "max_words": 30}))
    assert len(splits["train"].captions) == 84


def test_too_few_stamps_is_a_clear_error(tmp_path):
    from mmdistill.errors import UserError

    with pytest.raises(UserError, match="tuxpaint-stamps-default"):
        build_tuxpaint_folder(tmp_path / "folder", tmp_path)
