"""The distilled-set format on a shapes-tiny run: load_distilled, exports and their exact round trip, reference
.pt files from other code bases, inspect, and the README example."""

import json
import re
import shutil
from pathlib import Path

import datasets  # the hf extra, which `make setup` installs with the test extra
import numpy as np
import pytest
import torch
import yaml

import mmdistill
from mmdistill.cli import main
from mmdistill.config import load_config
from mmdistill.errors import UserError
from mmdistill.evaluation.results import evaluate_command
from mmdistill.pipeline import run
from mmdistill.synthetic import CLIP_NORMALIZATION, export, load_distilled, load_synthetic, phases_for, write_phase

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A shapes-tiny run without baselines: RUN/distilled and the run's own evaluation in RUN/results.json."""
    root = tmp_path_factory.mktemp("tiny-run")
    overrides = [f"cache_dir={root / 'cache'}", "evaluate.baselines=[]"]
    cfg = load_config("shapes-tiny", overrides)
    run(cfg, root / "run")
    return root / "run", cfg, overrides


def test_load_distilled_reads_a_run(tiny_run):
    path, cfg, _ = tiny_run
    distilled = mmdistill.load_distilled(path)
    assert len(distilled.phases) == 2 and distilled.space == "pixel" and distilled.method == "ptm-st"
    assert len(distilled.dataset()) == 20 and len(distilled.dataset(1)) == 10
    image, text, index = distilled.dataset(1)[3]
    assert image.shape == (3, 16, 16) and text.shape == (384,) and index == 3
    assert torch.equal(image, distilled.phases[1]["images"][3])
    assert torch.equal(distilled.similarity(0), distilled.phases[0]["sim_full"])
    assert distilled.lrs[1]["lr_img"] == float(distilled.phases[1]["lr_img"])
    assert distilled.encoders == {"image": "convnet", "text": "minilm"}
    assert distilled.meta["preset"] == "shapes-tiny" and distilled.meta["format_version"] == "1.1"
    results = json.loads((path / "results.json").read_text())["methods"]["ptm-st"]
    assert distilled.results["r_mean"] == results["r_mean"]
    assert len(distilled.captions[0]) == 10 and isinstance(distilled.captions[0][0]["caption"], str)
    with pytest.raises(UserError, match="has phases 0..1, not 2"):
        distilled.similarity(2)


def test_a_newer_major_format_is_refused(tiny_run, tmp_path):
    copy = shutil.copytree(tiny_run[0] / "distilled", tmp_path / "d")
    phase = load_synthetic(copy)[0]
    metadata = {k: v for k, v in phase.items() if not torch.is_tensor(v)}
    write_phase(
        copy / "phase-0.safetensors",
        {k: v for k, v in phase.items() if torch.is_tensor(v)},
        {**metadata, "format_version": "1.7"},
    )  # a newer minor version of the same major reads
    assert len(load_synthetic(copy)) == 2
    meta = json.loads((copy / "meta.json").read_text())
    (copy / "meta.json").write_text(json.dumps({**meta, "format_version": "2.0"}))
    with pytest.raises(UserError, match=r"format 2\.0, newer than the 1\.1 this mmdistill reads; upgrade"):
        load_distilled(copy)


def test_a_set_written_before_the_format_was_versioned_reads_as_1_0(tiny_run, tmp_path):
    """Such a meta.json lacks format_version, encoders and normalization: they come from its config."""
    current = load_distilled(tiny_run[0])
    copy = shutil.copytree(tiny_run[0] / "distilled", tmp_path / "d")
    meta = json.loads((copy / "meta.json").read_text())
    for key in ("format_version", "encoders", "normalization"):
        del meta[key]
    (copy / "meta.json").write_text(json.dumps(meta))
    old = load_distilled(copy)
    assert old.normalization == current.normalization and old.encoders == current.encoders
    reference = tmp_path / "distilled_0_50.pt"
    reference.touch()
    with pytest.raises(
        UserError,
        match="is a file, not a distilled set's folder; a .pt from another code base needs --format ptm-st or lors",
    ):
        load_distilled(reference)


def test_export_folder_round_trip_is_exact(tiny_run, tmp_path):
    """export -> evaluate --synthetic EXPORTED: the run's r_mean bit for bit; the folder loads as an imagefolder."""
    path, _, overrides = tiny_run
    out = tmp_path / "exported"
    assert main(["export", str(path), "--to", "folder", str(out)]) == 0
    sets = [arg for item in overrides for arg in ("--set", item)]
    assert (
        main(
            [
                "evaluate",
                "--preset",
                "shapes-tiny",
                *sets,
                "--synthetic",
                str(out),
                "--out",
                str(tmp_path / "results.json"),
            ]
        )
        == 0
    )
    again = json.loads((tmp_path / "results.json").read_text())["methods"]["ptm-st"]
    original = json.loads((path / "results.json").read_text())["methods"]["ptm-st"]
    assert again["r_mean"] == original["r_mean"]
    assert [r["test"] for r in again["per_run"]] == [r["test"] for r in original["per_run"]]

    folder = datasets.load_dataset("imagefolder", data_dir=str(out), split="train")
    assert len(folder) == len(load_distilled(path).dataset()) == 20
    row = folder[13]
    assert (row["phase"], row["index"]) == (1, 3) and row["image"].size == (16, 16)
    assert row["text"] == load_distilled(path).captions[1][3]["caption"]

    card = (out / "README.md").read_text()
    header = yaml.safe_load(re.match(r"---\n(.*?)\n---\n", card, re.S).group(1))
    assert header["pretty_name"].startswith("ptm-st distilled shapes")
    assert header["size_categories"] == ["n<1K"] and header["source_datasets"] == ["shapes"]
    assert "image-to-text" in header["task_categories"] and "dataset-distillation" in header["tags"]
    assert f"{original['r_mean']:.2f}" in card and "`convnet`" in card and "`minilm`" in card

    exported = load_distilled(out)
    for mine, theirs in zip(exported.phases, load_distilled(path).phases):
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs if torch.is_tensor(theirs[k]))
    with pytest.raises(UserError, match="is not empty"):
        export(exported, "folder", out)


def test_export_hf_saves_a_dataset_and_reports_a_failed_push(tiny_run, tmp_path, capsys):
    path = tiny_run[0]
    out = tmp_path / "hf"
    assert main(["export", str(path), "--to", "hf", str(out), "--push", "someone/tiny"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmdistill: error: --push someone/tiny failed (") and err.count("\n") == 1
    assert f"the export in {out} is complete" in err
    saved = datasets.load_from_disk(str(out))
    distilled = load_distilled(path)
    assert len(saved) == 20 and saved[12]["phase"] == 1
    assert torch.equal(torch.tensor(saved[12]["text_embedding"]), distilled.phases[1]["texts"][2])
    assert torch.equal(torch.tensor(saved[12]["pixels"]), distilled.phases[1]["images"][2])
    assert torch.equal(torch.tensor(saved[12]["similarity_row"]), distilled.similarity(1)[2])
    reread = load_distilled(out)
    assert reread.layout == "hf" and torch.equal(reread.phases[0]["images"], distilled.phases[0]["images"])


def _reference_file(phase: dict, path: Path, norm: dict) -> Path:
    """A phase saved as the PTM-ST code base saves it: CLIP-normalised pixels, dense S and its parameters.
    `norm`: the normalisation the phase's pixels have."""
    mean, std = (torch.tensor(norm[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    clip_mean, clip_std = (torch.tensor(CLIP_NORMALIZATION[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    image = (phase["images"] * std + mean - clip_mean) / clip_std
    torch.save(
        {
            "image": image,
            "text": phase["texts"],
            "similarity_params": [phase["sim_full"]],
            "similarity_mat": phase["sim_full"],
            "syn_lr_img": phase["lr_img"][0],
            "syn_lr_txt": phase["lr_txt"][0],
        },
        path,
    )
    return path


def test_a_reference_layout_file_is_scored(tiny_run, tmp_path):
    path, cfg, _ = tiny_run
    native = load_distilled(path)
    phase = native.phases[0]
    file = _reference_file(phase, tmp_path / "distilled_0_2000.pt", native.normalization)
    reference = load_distilled(file, "ptm-st")
    mapped = phases_for(reference, cfg, _bundle(cfg))[0]
    assert torch.allclose(mapped["images"], phase["images"], atol=1e-5)  # back to the ConvNet's normalisation
    assert torch.equal(mapped["sim_full"], phase["sim_full"]) and mapped["lr_img"].shape == (1,)
    evaluate_command(cfg, file, tmp_path / "out", fmt="ptm-st")
    entry = json.loads((tmp_path / "out" / "results.json").read_text())["methods"]["ptm-st-reference"]
    assert entry["runs"] == 2 and 0 <= entry["r_mean"] <= 100

    # a PTM-ST log folder: the last iteration of each phase
    _reference_file(native.phases[1], tmp_path / "distilled_1_50.pt", native.normalization)
    torch.save({"image": torch.zeros(1)}, tmp_path / "distilled_1_10.pt")  # an earlier iteration, never read
    assert [len(p["texts"]) for p in load_distilled(tmp_path, "ptm-st").phases] == [10, 10]


def _bundle(cfg):
    from mmdistill.prepare import prepare

    return prepare(cfg)


def test_a_reference_file_of_another_encoder_is_refused_with_both_shapes(tiny_run, tmp_path):
    path, cfg, _ = tiny_run
    native = load_distilled(path)
    phase = native.phases[0]
    file = _reference_file({**phase, "texts": torch.randn(10, 768)}, tmp_path / "bert.pt", native.normalization)
    with pytest.raises(
        UserError,
        match=r"text embeddings of shape \(10, 768\), expected \(10, 384\) for text"
        r" encoder 'minilm'",
    ):
        evaluate_command(cfg, file, tmp_path / "out", fmt="lors")
    file = _reference_file({**phase, "images": torch.zeros(10, 3, 224, 224)}, tmp_path / "big.pt", native.normalization)
    with pytest.raises(UserError, match=r"images of shape \(10, 3, 224, 224\), expected \(10, 3, 16, 16\)"):
        evaluate_command(cfg, file, tmp_path / "out", fmt="lors")


class _Payload:
    """Unpickling this would create the file `marker`: the refusal must happen before any of it runs."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickled_object_is_refused_without_running_it(tmp_path, capsys):
    marker = tmp_path / "code-ran"
    file = tmp_path / "distilled_0_50.pt"
    torch.save({"image": torch.zeros(2, 3, 16, 16), "hook": _Payload(marker)}, file)
    assert main(["inspect", str(file), "--format", "ptm-st"]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"mmdistill: error: cannot read ptm-st distilled set {file}: it holds objects other than tensors"
        " and plain containers\n"
    )
    assert not marker.exists()


def test_inspect_prints_a_summary(tiny_run, capsys):
    path = tiny_run[0]
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    r_mean = json.loads((path / "results.json").read_text())["methods"]["ptm-st"]["r_mean"]
    assert "method ptm-st  preset shapes-tiny" in out and "encoders: image convnet, text minilm" in out
    rows = [line.split() for line in out.splitlines() if re.match(r"\s+[01] ", line)]
    assert [row[:5] for row in rows] == [["0", "10", "3x16x16", "384", "full"], ["1", "10", "3x16x16", "384", "full"]]
    assert f"r_mean {r_mean:.2f}" in out and len(out.splitlines()) < 25


def test_a_feature_space_set_exports_its_features_and_nearest_real_images(tiny_run, tmp_path):
    """No fake pictures: the PNG of an image feature is its nearest real training image, and the card says so."""
    from PIL import Image

    from mmdistill.data import build_splits
    from mmdistill.data.transforms import build_transform
    from mmdistill.synthetic import DistilledSet

    path, cfg, _ = tiny_run
    native = load_distilled(path)
    features = torch.randn(10, 32)
    phase = {**native.phases[0], "images": features, "space": "feature"}
    captions = [{**c, "image_id": 7 + i, "image_similarity": 0.5} for i, c in enumerate(native.captions[0])]
    distilled = DistilledSet([phase], native.meta, "hand-made", "native", [captions])
    export(distilled, "folder", tmp_path / "out")
    assert torch.equal(load_distilled(tmp_path / "out").phases[0]["images"], features)
    assert (tmp_path / "out" / "image_features.safetensors").exists()
    assert not (tmp_path / "out" / "images.safetensors").exists()
    rows = [json.loads(line) for line in (tmp_path / "out" / "metadata.jsonl").read_text().splitlines()]
    assert rows[2]["image_kind"] == "nearest real training image" and rows[2]["image_id"] == 9
    real = build_splits(cfg.data)["train"].images[9]
    unit = build_transform(16, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "none")(real)
    png = torch.from_numpy(np.array(Image.open(tmp_path / "out" / rows[2]["file_name"]))).permute(2, 0, 1)
    assert torch.equal(png, (unit * 255).round().clamp(0, 255).to(torch.uint8))
    assert "**features**" in (tmp_path / "out" / "README.md").read_text()


def test_the_readme_example_runs_as_written(tiny_run, tmp_path, monkeypatch, capsys):
    text = README.read_text()
    section = text[text.index("## Use a distilled set") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    shutil.copytree(tiny_run[0] / "distilled", tmp_path / "runs" / "tiny" / "distilled")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "2 phases, 20 pairs"
    # train_student is evaluate's first run: same config (the set's own), seed, protocol and selected checkpoint
    first_run = json.loads((tiny_run[0] / "results.json").read_text())["methods"]["ptm-st"]["per_run"][0]
    assert float(printed[-1]) == first_run["test"]["r_mean"]
