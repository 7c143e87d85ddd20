"""Expert training, storage, resume, torchrun sharding and the reference-layout import/export."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before any Hugging Face import: the tests never touch the network

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from mmdistill.bench.storage import bench_storage
from mmdistill.config import load_config
from mmdistill.errors import UserError
from mmdistill.experts import train as experts
from mmdistill.experts.reference import export_reference, import_reference
from mmdistill.experts.store import ExpertStore, tensor_norms, write_expert
from mmdistill.experts.train import train_experts
from mmdistill.model import GROUPS, ParamLayout, build_model
from mmdistill.utils import derive_seed

REPO = Path(__file__).resolve().parents[1]
SHRINK = ["data.train_images=40", "data.val_images=12", "data.test_images=12"]


@pytest.fixture(scope="module")
def overrides(tmp_path_factory):
    return SHRINK + [f"cache_dir={tmp_path_factory.mktemp('cache')}"]


@pytest.fixture(scope="module")
def trained(overrides, tmp_path_factory):
    """Two shapes-tiny experts trained in this process with one thread: the reference for the other tests."""
    cfg = load_config("shapes-tiny", overrides)
    out = tmp_path_factory.mktemp("experts")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_experts(cfg, out)
    finally:
        torch.set_num_threads(threads)
    return cfg, out


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_same_tensors(folder_a: Path, folder_b: Path, index: int) -> None:
    """Expert `index` holds bit-identical tensors in both folders (the metadata's timings may differ)."""
    name = f"expert-{index:04d}.safetensors"
    a, b = load_file(folder_a / name), load_file(folder_b / name)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].numpy().tobytes() == b[key].numpy().tobytes(), (name, key)


def test_expert_files(trained):
    cfg, out = trained
    store = ExpertStore(out)
    assert len(store) == cfg.experts.count == 2 and store.epochs == cfg.experts.epochs and store.dtype == "float32"
    fresh = build_model(
        cfg.model, text_dim=384, image_size=cfg.data.image_size, seed=derive_seed(cfg.seed, "expert", 1)
    )
    assert store.layouts == fresh.layouts
    init = store.snapshot(1, 0)
    for g in GROUPS:
        assert torch.equal(init[g], fresh.get_flat()[g])
        trajectory = store.trajectory(1)[g]
        expected = torch.stack(
            [tensor_norms(trajectory[p + 1] - trajectory[p], store.layouts[g]) for p in range(store.epochs)]
        )
        assert torch.equal(store.step_norms(1)[g], expected)
        assert not torch.equal(trajectory[0], trajectory[-1])
    meta = store.metadata(0)
    assert meta["preset"] == "shapes-tiny" and meta["expert"] == "0" and meta["image_trainable"] == "True"

    lines = read_lines(out / "experts.jsonl")
    assert len(lines) == 2 * (store.epochs + 2)
    assert [(r["expert"], r["split"], r["epoch"]) for r in lines[: store.epochs + 2]] == [
        (0, "validation", e) for e in range(store.epochs + 1)
    ] + [(0, "test", store.epochs)]
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["val_by_epoch"]) == store.epochs + 1 and summary["seconds_per_epoch"] > 0
    tests = [r for r in lines if r["split"] == "test"]
    assert summary["test"]["r_mean"] == pytest.approx(sum(r["r_mean"] for r in tests) / 2)
    assert set(summary["test_std"]) == set(summary["test"]) >= {"IR@1", "TR@10", "r_mean"}


def test_resume_trains_only_missing_experts(trained, tmp_path, trained_indices, one_thread):
    cfg, out = trained
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    (resumed / "expert-0001.safetensors").unlink()
    train_experts(cfg, resumed)
    assert trained_indices == [1]
    for index in range(cfg.experts.count):
        assert_same_tensors(out, resumed, index)

    def without_seconds(path):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in read_lines(path)]

    assert without_seconds(resumed / "experts.jsonl") == without_seconds(out / "experts.jsonl")


def test_other_config_in_same_folder_is_refused(trained, overrides):
    _, out = trained
    with pytest.raises(UserError, match="new --out"):
        train_experts(load_config("shapes-tiny", overrides + ["experts.lr_img=0.05"]), out)


def test_torchrun_two_ranks_equal_one_process(trained, overrides, tmp_path):
    cfg, out = trained
    sets = [arg for override in overrides for arg in ("--set", override)]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "mmdistill",
        "experts",
        "--preset",
        "shapes-tiny",
        *sets,
        "--out",
        str(tmp_path / "ddp"),
    ]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 0/2 trains experts [0]" in result.stdout and "rank 1/2 trains experts [1]" in result.stdout
    for index in range(cfg.experts.count):
        assert_same_tensors(out, tmp_path / "ddp", index)
    assert (tmp_path / "ddp" / "summary.json").exists()


def write_folder_dataset(root: Path) -> None:
    """An imagefolder set (mmdistill.data.folder) of 6/3/3 random 20-px PNGs with two captions each."""
    gen = torch.Generator().manual_seed(0)
    for split, count in (("train", 6), ("validation", 3), ("test", 3)):
        (root / split).mkdir(parents=True)
        rows = []
        for i in range(count):
            pixels = torch.randint(0, 256, (20, 20, 3), generator=gen, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(root / split / f"{i}.png")
            rows.append(json.dumps({"file_name": f"{i}.png", "text": [f"picture {i} of {split}", f"image {i}"]}))
        (root / split / "metadata.jsonl").write_text("\n".join(rows) + "\n")


def test_file_based_source_trains_through_a_loader(overrides, tmp_path):
    write_folder_dataset(tmp_path / "data")
    cfg = load_config(
        "shapes-tiny",
        overrides[len(SHRINK) :]
        + [
            "data.source=folder",
            f"data.root={tmp_path / 'data'}",
            "experts.count=1",
            "experts.epochs=1",
            "experts.batch_size=4",
            "experts.augment=clip",
            "distill.phases.0.shortcut_end=1",
            "distill.phases.1.shortcut_end=1",
            "distill.phases.1.start_epochs=[0,1]",
        ],
    )
    train_experts(cfg, tmp_path / "experts")
    store = ExpertStore(tmp_path / "experts")
    assert store.epochs == 1 and not torch.equal(store.snapshot(0, 0)["img"], store.snapshot(0, 1)["img"])


# ------------------------------------------------------------------------------------ storage and reference


def fake_reference(folder: Path, trajectories_per_file=(2, 1), snapshots=4) -> dict[str, list]:
    """Reference replay buffers with random tensors; returns what each file holds."""
    gen = torch.Generator().manual_seed(0)
    shapes = {"img": [(4, 3), (4,), (2, 2, 3)], "txt": [(5, 2), (5,)]}
    written = {}
    folder.mkdir(parents=True, exist_ok=True)
    for n, count in enumerate(trajectories_per_file):
        for g in GROUPS:
            content = [
                [[torch.randn(s, generator=gen) for s in shapes[g]] for _ in range(snapshots)] for _ in range(count)
            ]
            torch.save(content, folder / f"{g}_replay_buffer_{n}.pt")
            written[f"{g}_replay_buffer_{n}.pt"] = content
    return written


def test_reference_import_export_round_trip(tmp_path):
    written = fake_reference(tmp_path / "ref")
    import_reference(tmp_path / "ref", tmp_path / "experts")
    store = ExpertStore(tmp_path / "experts")
    assert len(store) == 3 and store.epochs == 3
    assert store.layouts["img"] == ParamLayout(("param_0", "param_1", "param_2"), ((4, 3), (4,), (2, 2, 3)))
    second_of_file_0 = written["txt_replay_buffer_0.pt"][1]
    assert torch.equal(store.snapshot(1, 2)["txt"], torch.cat([t.reshape(-1) for t in second_of_file_0[2]]))

    export_reference(tmp_path / "experts", tmp_path / "back")
    assert sorted(p.name for p in (tmp_path / "back").iterdir()) == sorted(written)
    for name, content in written.items():
        loaded = torch.load(tmp_path / "back" / name, weights_only=True)
        assert len(loaded) == len(content)
        for trajectory, original in zip(loaded, content):
            assert len(trajectory) == len(original)
            for snapshot, original_snapshot in zip(trajectory, original):
                assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(snapshot, original_snapshot))


def test_reference_import_errors(tmp_path):
    with pytest.raises(UserError, match="no reference buffers"):
        import_reference(tmp_path, tmp_path / "out")
    torch.save({"not": "a list"}, tmp_path / "img_replay_buffer_0.pt")
    torch.save([[[torch.zeros(2)], [torch.zeros(2)]]], tmp_path / "txt_replay_buffer_0.pt")
    with pytest.raises(UserError, match="img_replay_buffer_0.pt"):
        import_reference(tmp_path, tmp_path / "out")
    (tmp_path / "img_replay_buffer_0.pt").write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="img_replay_buffer_0.pt"):
        import_reference(tmp_path, tmp_path / "out")
    torch.save([[[torch.zeros(2)], [torch.zeros(3)]]], tmp_path / "img_replay_buffer_0.pt")
    with pytest.raises(UserError, match="other parameter shapes"):
        import_reference(tmp_path, tmp_path / "out")
    (tmp_path / "txt_replay_buffer_0.pt").unlink()
    torch.save([[[torch.zeros(2)], [torch.zeros(2)]]], tmp_path / "img_replay_buffer_0.pt")
    with pytest.raises(UserError, match="txt_replay_buffer_0.pt"):
        import_reference(tmp_path, tmp_path / "out")


def test_store_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        ExpertStore(tmp_path / "missing")
    with pytest.raises(UserError, match=str(tmp_path)):
        ExpertStore(tmp_path)
    save_file({"x": torch.zeros(2)}, tmp_path / "expert-0000.safetensors")
    with pytest.raises(UserError, match="expert-0000.safetensors"):
        ExpertStore(tmp_path)
    (tmp_path / "expert-0000.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="expert-0000.safetensors"):
        ExpertStore(tmp_path)


def test_half_precision_storage_reads_back_float32(tmp_path):
    layouts = {g: ParamLayout(("a",), ((3,),)) for g in GROUPS}
    trajectories = {g: torch.tensor([[0.0, 1, 2], [1, 2, 3]]) for g in GROUPS}
    norms = {g: torch.ones(1, 1) for g in GROUPS}
    write_expert(tmp_path / "expert-0000.safetensors", trajectories, norms, layouts, "float16", {})
    store = ExpertStore(tmp_path)
    assert store.dtype == "float16" and store.trajectory(0)["img"].dtype == torch.float16
    snapshot = store.snapshot(0, 1)
    assert snapshot["txt"].dtype == torch.float32 and torch.equal(snapshot["txt"], torch.tensor([1.0, 2, 3]))
    with pytest.raises(UserError, match="epochs 0..1"):
        store.snapshot(0, 2)


def test_bench_storage_halves_the_reference():
    result = bench_storage(load_config("shapes-tiny"))
    assert result["snapshots"] == 4 and result["params_img"] > 0 and result["params_txt"] > 0
    assert result["native_fp16_bytes"] < result["native_fp32_bytes"] < result["reference_bytes"]
    assert result["ratio_fp32"] <= 0.5 and result["ratio_fp16"] <= 0.25


def test_an_image_that_breaks_after_prepare_is_one_line_naming_it(tmp_path):
    """A DataLoader worker re-raises a UserError with its whole traceback as the message."""
    from mmdistill.data import Split
    from mmdistill.data.transforms import build_transform

    paths = [str(tmp_path / f"{i}.png") for i in range(4)]
    for path in paths:
        Image.new("RGB", (8, 8)).save(path)
    os.remove(paths[2])
    split = Split("train", ["a", "b", "c", "d"], [0, 1, 2, 3], [[0], [1], [2], [3]], paths)
    loader = experts._loader(split, build_transform(8, (0.5,) * 3, (0.5,) * 3, "none"), [0, 1, 2, 3], 2)
    assert loader.num_workers > 0
    with pytest.raises(UserError) as err:
        list(experts._batches(loader))
    assert str(err.value) == f"image file not found: {paths[2]}"
