import json
import math
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before any Hugging Face import: the tests never touch the network

import pytest
import torch

import mmdistill.evaluation.baselines as baselines
import mmdistill.evaluation.results as results_module
import mmdistill.evaluation.student as evaluate
import mmdistill.metrics as metrics_module
from mmdistill.config import load_config
from mmdistill.data import Split
from mmdistill.encoders import CLIP_MEAN, CLIP_STD
from mmdistill.errors import UserError
from mmdistill.evaluation.baselines import coreset_phases, full_data_metrics
from mmdistill.evaluation.results import METRICS, evaluate_command, format_table
from mmdistill.evaluation.student import train_and_test
from mmdistill.model import DualEncoder, build_model
from mmdistill.prepare import Prepared
from mmdistill.synthetic import DistilledSet

FEATURE_DIM, TEXT_DIM, CAPTIONS = 64, 16, 2  # convnet depth 1, width 4 on 8 px images gives 4*4*4 = 64 features


def make_cfg(*overrides, frozen=True):
    """shapes-tiny shrunk further; frozen mode trains on feature-space data."""
    mode = ["model.image_trainable=false", "distill.space=feature"] if frozen else []
    return load_config(
        "shapes-tiny",
        ["device=cpu", "data.image_size=8", "model.convnet.depth=1", "model.convnet.width=4", *mode, *overrides],
    )


def make_split(name, n, gen, mixing):
    """n images with CAPTIONS captions each; the caption features are a fixed linear map of the image features,
    so a student can learn to align them."""
    features = torch.randn(n, FEATURE_DIM, generator=gen)
    txt2img = [i for i in range(n) for _ in range(CAPTIONS)]
    texts = features[txt2img] @ mixing + 0.1 * torch.randn(len(txt2img), TEXT_DIM, generator=gen)
    pixels = torch.rand(n, 3, 8, 8, generator=gen)
    split = Split(
        name=name,
        captions=[f"caption {t}" for t in range(len(txt2img))],
        txt2img=txt2img,
        img2txt=[list(range(i * CAPTIONS, (i + 1) * CAPTIONS)) for i in range(n)],
        images=(pixels * 255).to(torch.uint8),
    )
    return split, features, texts, pixels


def make_bundle(sizes=(40, 30, 40), seed=0, same_eval=False):
    """A hand-built Prepared bundle; same_eval: validation and test are the training split itself."""
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(FEATURE_DIM, TEXT_DIM, generator=gen) / math.sqrt(FEATURE_DIM)
    bundle = Prepared(splits={}, texts={}, mean=CLIP_MEAN, std=CLIP_STD)
    train = make_split("train", sizes[0], gen, mixing)
    for name, n in zip(("train", "validation", "test"), sizes):
        made = train if name == "train" or same_eval else make_split(name, n, gen, mixing)
        bundle.splits[name], bundle.features[name], bundle.texts[name], bundle.pixels[name] = made
    return bundle


def real_phase(bundle, captions, space="feature", lr=0.1, lr_txt=None):
    image_ids = torch.tensor(bundle.splits["train"].txt2img)[captions]
    images = (
        bundle.features["train"][image_ids]
        if space == "feature"
        else bundle.normalize(bundle.pixels["train"][image_ids])
    )
    return {
        "images": images,
        "texts": bundle.texts["train"][captions],
        "lr_img": torch.tensor([lr]),
        "lr_txt": torch.tensor([lr if lr_txt is None else lr_txt]),
        "similarity": "identity",
        "space": space,
    }


class RecordingSGD(torch.optim.SGD):
    """SGD that records its instances and the learning rates of every step."""

    instances: list = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lrs = []
        RecordingSGD.instances.append(self)

    def step(self, closure=None):
        self.lrs.append([group["lr"] for group in self.param_groups])
        return super().step(closure)


@pytest.fixture
def recording_sgd(monkeypatch):
    RecordingSGD.instances = []
    monkeypatch.setattr(evaluate, "SGD", RecordingSGD)
    return RecordingSGD


def without_time(result):
    return {k: v for k, v in result.items() if k != "seconds"}


def test_deterministic_given_seed_in_pixel_space():
    cfg = make_cfg("evaluate.epochs=4", "evaluate.eval_every=2", frozen=False)
    bundle = make_bundle()
    phases = [real_phase(bundle, torch.arange(0, 20), "pixel"), real_phase(bundle, torch.arange(20, 40), "pixel")]
    first = train_and_test(cfg, bundle, phases, seed=3)
    assert without_time(first) == without_time(train_and_test(cfg, bundle, phases, seed=3))
    assert first["curve"] != train_and_test(cfg, bundle, phases, seed=4)["curve"]
    assert [(c["phase"], c["epoch"]) for c in first["curve"]] == [(0, 0), (0, 2), (0, 4), (1, 2), (1, 4)]
    assert set(first["test"]) == set(METRICS) and not first["diverged"]


def test_crop_augmentation_trains_on_crops_of_the_pixels_deterministically(monkeypatch):
    cfg = make_cfg("evaluate.epochs=2", "evaluate.eval_every=2", frozen=False)
    bundle = make_bundle()
    phase = real_phase(bundle, torch.arange(0, 20), "pixel")
    plain = train_and_test(cfg, bundle, [phase], seed=3)
    cropped_cfg = make_cfg("evaluate.epochs=2", "evaluate.eval_every=2", "evaluate.augment=crop", frozen=False)
    seen, forward = [], DualEncoder.forward
    monkeypatch.setattr(DualEncoder, "forward", lambda self, x, t, blend=None: seen.append(x) or forward(self, x, t))
    cropped = train_and_test(cropped_cfg, bundle, [phase], seed=3)
    trained_on = seen[0]  # the first training batch (the evaluation passes come after it)
    assert trained_on.shape == (20, 3, 8, 8)
    assert not any(torch.equal(trained_on[0], image) for image in phase["images"])  # a crop, not an image
    assert without_time(cropped) == without_time(train_and_test(cropped_cfg, bundle, [phase], seed=3))
    assert cropped["curve"] != plain["curve"]


def test_frozen_mode_trains_the_image_projection(monkeypatch, recording_sgd):
    cfg = make_cfg("evaluate.epochs=10", "evaluate.eval_every=5")
    bundle = make_bundle(same_eval=True)
    built = []
    monkeypatch.setattr(evaluate, "build_model", lambda *a, **k: built.append(build_model(*a, **k)) or built[-1])
    result = train_and_test(cfg, bundle, [real_phase(bundle, torch.arange(80))], seed=0)
    model = built[0]
    img_group = recording_sgd.instances[0].param_groups[0]["params"]
    assert {id(p) for p in img_group} == {id(p) for p in model.image_projection.parameters()}
    assert (result["phase"], result["epoch"]) != (0, 0)  # the selected state is a trained one
    fresh = build_model(cfg.model, text_dim=TEXT_DIM, image_size=8, seed=0)
    assert not torch.equal(model.image_projection.projection.weight, fresh.image_projection.projection.weight)


def test_frozen_mode_encodes_pixel_space_data_with_the_frozen_encoder():
    cfg = make_cfg("evaluate.epochs=4", "evaluate.eval_every=2")
    bundle = make_bundle()
    pixel_phase = real_phase(bundle, torch.arange(20), "pixel")
    encoder = build_model(cfg.model, text_dim=TEXT_DIM, image_size=8, seed=5).frozen_image_encoder
    with torch.no_grad():
        feature_phase = {**pixel_phase, "images": encoder(pixel_phase["images"]), "space": "feature"}
    from_pixels = train_and_test(cfg, bundle, [pixel_phase], seed=5)
    assert without_time(from_pixels) == without_time(train_and_test(cfg, bundle, [feature_phase], seed=5))


def test_training_targets_are_blocks_of_the_learned_similarity(monkeypatch):
    cfg = make_cfg("evaluate.epochs=2", "evaluate.eval_every=2", "evaluate.batch_size=6")
    bundle = make_bundle()
    phase = {
        **real_phase(bundle, torch.arange(10)),
        "similarity": "full",
        "sim_full": torch.rand(10, 10, generator=torch.Generator().manual_seed(0)),
    }
    seen = []
    monkeypatch.setitem(evaluate.LOSSES, cfg.distill.loss, lambda logits, target: seen.append(target) or logits.mean())
    train_and_test(cfg, bundle, [phase], seed=0)
    assert len(seen) == 4  # two epochs of ceil(10 / 6) batches
    for target in seen:
        assert target.shape == (6, 6)
        rows = [int((phase["sim_full"] == target[i, i]).nonzero()[0, 0]) for i in range(6)]  # diagonal -> index
        torch.testing.assert_close(target, phase["sim_full"][rows][:, rows])


@pytest.mark.parametrize("schedule", ["per-phase", "global"])
def test_lr_schedule_restarts_per_phase_unless_global(recording_sgd, schedule):
    cfg = make_cfg(
        "evaluate.epochs=4", "evaluate.eval_every=4", "evaluate.lr_milestones=[2]", f"evaluate.lr_schedule={schedule}"
    )
    bundle = make_bundle()
    phases = [
        real_phase(bundle, torch.arange(10), lr=0.1, lr_txt=0.05),
        real_phase(bundle, torch.arange(10, 20), lr=0.2, lr_txt=0.4),
    ]  # one batch per epoch
    train_and_test(cfg, bundle, phases, seed=0)
    lrs = [lr for sgd in recording_sgd.instances for step in sgd.lrs for lr in step]  # (img, txt) per step
    second = [0.2, 0.4] * 2 + [0.02, 0.04] * 2 if schedule == "per-phase" else [0.02, 0.04] * 4
    assert lrs == pytest.approx([0.1, 0.05] * 2 + [0.01, 0.005] * 2 + second)


def test_val_protocol_reports_test_at_the_best_validation_checkpoint(monkeypatch):
    bundle = make_bundle(sizes=(40, 30, 40))
    # val: checkpoints (0,0) (0,2) (0,4) (1,2) (1,4); reference: (0,0), then after epochs 1, 3, 5 of each phase
    scripts = {"validation": [1, 9, 3, 2, 4, 0, 0], "test": [5, 1, 2, 3, 8, 3, 1]}
    calls = []

    def fake_metrics(sim, img2txt, txt2img):
        name = "validation" if len(img2txt) == 30 else "test"
        score = scripts[name][sum(c[0] == name for c in calls)]
        calls.append((name, float(sim.double().sum())))
        return {m: float(score) for m in METRICS}

    monkeypatch.setattr(metrics_module, "retrieval_metrics", fake_metrics)
    phases = [real_phase(bundle, torch.arange(0, 20)), real_phase(bundle, torch.arange(20, 40))]
    overrides = ["evaluate.epochs=4", "evaluate.eval_every=2"]

    reference = train_and_test(make_cfg(*overrides, "evaluate.protocol=reference"), bundle, phases, seed=0)
    assert (reference["phase"], reference["epoch"], reference["test"]["r_mean"]) == (1, 1, 8)
    assert reference["val"]["r_mean"] == 4 and len(reference["curve"]) == 7

    calls.clear()
    chosen = train_and_test(make_cfg(*overrides), bundle, phases, seed=0)
    assert (chosen["phase"], chosen["epoch"], chosen["val"]["r_mean"]) == (0, 2, 9)
    assert [c["val_r_mean"] for c in chosen["curve"]] == scripts["validation"][:5]
    tests = [s for name, s in calls if name == "test"]
    assert len(tests) == 1  # one test evaluation, of the restored checkpoint (0, 2)

    assert evaluate.summarize_runs([reference], "reference")["protocol"] == "reference (selected on test)"


@pytest.mark.parametrize("handoff", ["best", "last"])
def test_a_later_phase_starts_from_the_best_checkpoint_so_far_or_the_last_epoch(monkeypatch, handoff):
    bundle = make_bundle(sizes=(40, 30, 40))
    scores = iter([1, 9, 3, 2, 4])  # validation at (0,0) (0,2) (0,4) (1,2) (1,4): phase 0 is best at epoch 2
    seen = []  # at each validation check, the similarity matrix's sum: a fingerprint of the student's state

    def fake_metrics(sim, img2txt, txt2img):
        if len(img2txt) != 30:  # the test split, scored once at the end
            return {m: 0.0 for m in METRICS}
        seen.append(float(sim.double().sum()))
        score = float(next(scores))
        return {m: score for m in METRICS}

    monkeypatch.setattr(metrics_module, "retrieval_metrics", fake_metrics)
    # phase 1 trains at lr 0, so its student stays where phase 0 handed it over
    phases = [real_phase(bundle, torch.arange(0, 20)), real_phase(bundle, torch.arange(20, 40), lr=0.0)]
    cfg = make_cfg("evaluate.epochs=4", "evaluate.eval_every=2", f"evaluate.handoff={handoff}")
    train_and_test(cfg, bundle, phases, seed=0)
    handed = seen[1] if handoff == "best" else seen[2]
    assert seen[1] != pytest.approx(seen[2])  # phase 0 moved between its epochs 2 and 4
    assert seen[3:] == pytest.approx([handed, handed])


def test_training_on_real_pairs_beats_an_untrained_student():
    cfg = make_cfg(
        "evaluate.epochs=10",
        "evaluate.eval_every=5",
        "distill.phases.0.pairs=40",
        "distill.phases.1.pairs=40",
        "experts.lr_img=0.5",
        "experts.lr_txt=0.5",
    )
    bundle = make_bundle(same_eval=True)  # validation and test are the training split
    phases = coreset_phases(cfg, bundle, "random", None, seed=0)
    result = train_and_test(cfg, bundle, phases, seed=0)
    untrained = result["curve"][0]["val_r_mean"]
    assert result["test"]["r_mean"] > untrained + 20


def test_coreset_lr_is_chosen_on_validation():
    cfg = make_cfg(
        "evaluate.epochs=10",
        "evaluate.eval_every=5",
        "evaluate.runs=2",
        "distill.phases.0.pairs=40",
        "distill.phases.1.pairs=40",
        "evaluate.coreset_lrs=[0.0001, 0.5]",
    )
    bundle = make_bundle()
    entry = baselines.evaluate_coreset(cfg, bundle, "random", None, seed=0)
    assert entry["lr"] == 0.5 and set(entry["val_r_mean_by_lr"]) == {"0.0001", "0.5"}
    assert entry["val_r_mean_by_lr"]["0.5"] > entry["val_r_mean_by_lr"]["0.0001"]
    (phase,) = coreset_phases(cfg, bundle, "random", None, seed=0)
    direct = evaluate.evaluate_phases(
        cfg, bundle, [{**phase, "lr_img": torch.tensor([0.5]), "lr_txt": torch.tensor([0.5])}], runs=2, seed=0
    )
    assert entry["r_mean"] == direct["r_mean"]


@pytest.mark.parametrize("frozen", [True, False])
def test_random_coreset_has_the_budget_of_distinct_real_pairs(frozen):
    cfg = make_cfg(frozen=frozen)
    bundle = make_bundle()
    (phase,) = coreset_phases(cfg, bundle, "random", None, seed=1)
    captions = phase["captions"]
    assert len(captions) == len(set(captions.tolist())) == 20  # shapes-tiny: two phases of 10 pairs
    image_ids = torch.tensor(bundle.splits["train"].txt2img)[captions]
    expected = bundle.features["train"] if frozen else bundle.normalize(bundle.pixels["train"])
    torch.testing.assert_close(phase["images"], expected[image_ids])
    torch.testing.assert_close(phase["texts"], bundle.texts["train"][captions])
    assert phase["similarity"] == "identity" and not any(
        k.startswith("sim_") and torch.is_tensor(v) for k, v in phase.items()
    )
    assert phase["lr_img"].item() == pytest.approx(cfg.experts.lr_img)  # the lrs real data trains with
    assert phase["lr_txt"].item() == pytest.approx(cfg.experts.lr_txt)
    assert torch.equal(coreset_phases(cfg, bundle, "random", None, seed=1)[0]["captions"], captions)


class FakeStore:
    """Expert 0 of an ExpertStore: snapshot e is a fresh student with seed e."""

    epochs = 3

    def __init__(self, cfg, folder=None):
        self.cfg = cfg
        self.paths = sorted(Path(folder).glob("expert-*")) if folder else []

    def snapshot(self, expert, epoch):
        return build_model(self.cfg.model, text_dim=TEXT_DIM, image_size=8, seed=epoch).get_flat()


@pytest.mark.parametrize("method", ["herding", "kcenter", "forgetting"])
def test_model_based_coresets_select_distinct_pairs(monkeypatch, method):
    cfg = make_cfg(frozen=False)
    monkeypatch.setattr(baselines, "ExpertStore", lambda folder: FakeStore(cfg))
    (phase,) = coreset_phases(cfg, make_bundle(), method, "experts", seed=0)
    assert len(set(phase["captions"].tolist())) == 20


def test_forgetting_history_marks_top1_text_to_image_retrievals():
    cfg = make_cfg()
    bundle = make_bundle()
    history = baselines._correct_history(cfg, bundle, FakeStore(cfg), torch.device("cpu"))
    assert history.dtype == torch.bool and history.shape == (3, 80)
    model = baselines._full_data_model(cfg, bundle, FakeStore(cfg), 2, "cpu").eval()
    with torch.no_grad():
        sim = model(bundle.features["train"], bundle.texts["train"])
    torch.testing.assert_close(history[1], sim.argmax(0) == torch.tensor(bundle.splits["train"].txt2img))


def test_forgetting_statistics_are_computed_once_per_expert_set_and_data(monkeypatch, tmp_path):
    """bench budgets asks for them at every budget; they depend on the experts and the data, not the budget."""
    cfg = make_cfg()
    (tmp_path / "expert-0000.safetensors").write_bytes(b"x")
    computed = []
    original = baselines._compute_correct_history
    monkeypatch.setattr(baselines, "_compute_correct_history", lambda *a: computed.append(1) or original(*a))
    monkeypatch.setattr(baselines, "ExpertStore", lambda folder: FakeStore(cfg, folder))
    for budget_cfg in (cfg, make_cfg("distill.phases.0.pairs=5")):
        coreset_phases(budget_cfg, make_bundle(), "forgetting", tmp_path, seed=0)
    assert computed == [1]
    (tmp_path / "expert-0000.safetensors").write_bytes(b"yy")  # other experts in the same folder
    coreset_phases(cfg, make_bundle(), "forgetting", tmp_path, seed=0)
    coreset_phases(make_cfg("data.seed=1"), make_bundle(), "forgetting", tmp_path, seed=0)  # other data
    assert computed == [1, 1, 1]


def test_diverged_run_stops_with_finite_results():
    cfg = make_cfg("evaluate.epochs=4", "evaluate.eval_every=2")
    bundle = make_bundle()
    bad = real_phase(bundle, torch.arange(10))
    bad["texts"] = bad["texts"].clone()
    bad["texts"][0] = float("nan")
    result = train_and_test(cfg, bundle, [real_phase(bundle, torch.arange(10, 20)), bad], seed=0)
    assert result["diverged"] and result["phase"] == 0
    assert all(math.isfinite(v) for v in result["test"].values())


def test_a_student_that_unlearns_is_flagged_broke_down():
    """Phase 1 pairs every image with another image's caption: the student keeps finite losses but gives back
    what phase 0 taught it. Validation still selects phase 0, and the run says that it broke down; the same
    student on correct pairs in both phases does not."""
    cfg = make_cfg("evaluate.epochs=20", "evaluate.eval_every=5", "evaluate.lr_milestones=[100]")
    bundle = make_bundle()
    right = real_phase(bundle, torch.arange(80), lr=1.0)
    wrong = {**right, "texts": right["texts"][torch.randperm(80, generator=torch.Generator().manual_seed(0))]}
    fallen = train_and_test(cfg, bundle, [right, wrong], seed=0)
    assert not fallen["diverged"] and fallen["phase"] == 0
    assert fallen["broke_down"]["phase"] == 1
    assert fallen["broke_down"]["val_r_mean"] < 0.5 * fallen["broke_down"]["best_val_r_mean"]
    assert fallen["broke_down"]["best_val_r_mean"] == max(c["val_r_mean"] for c in fallen["curve"])
    steady = train_and_test(cfg, bundle, [right, right], seed=0)
    assert steady["broke_down"] is None and steady["phase"] == 1


def test_overfitting_and_noise_are_not_a_breakdown():
    """Giving back half the gain is what a student overfitting one phase does; a student that barely learned
    moves by noise. Neither is flagged, a fall of three quarters of a real gain is."""
    curve = [{"phase": 0, "epoch": e, "val_r_mean": v} for e, v in enumerate((2.0, 40.0, 21.0, 30.0))]
    assert evaluate.breakdown(curve) is None
    noisy = [{"phase": 0, "epoch": e, "val_r_mean": v} for e, v in enumerate((2.0, 6.0, 2.1))]
    assert evaluate.breakdown(noisy) is None
    curve.append({"phase": 1, "epoch": 10, "val_r_mean": 11.0})
    assert evaluate.breakdown(curve) == {"phase": 1, "epoch": 10, "val_r_mean": 11.0, "best_val_r_mean": 40.0}


def test_cross_architecture_needs_pixel_space():
    bundle = make_bundle()
    with pytest.raises(UserError, match="pixel-space"):
        train_and_test(
            make_cfg(), bundle, [real_phase(bundle, torch.arange(10))], seed=0, image_encoder="timm:resnet18"
        )


def test_evaluate_command_writes_and_merges_results_json(tmp_path, monkeypatch, capsys):
    cfg = make_cfg("evaluate.epochs=2", "evaluate.eval_every=1")
    bundle = make_bundle()
    phases = [real_phase(bundle, torch.arange(10)), real_phase(bundle, torch.arange(10, 20))]
    monkeypatch.setattr(results_module, "prepare", lambda cfg: bundle)
    synthetic = tmp_path / "syn"
    for method in ("ptm-st", "lors"):
        distilled = DistilledSet(phases, {"method": method}, str(synthetic), "native")
        monkeypatch.setattr(results_module, "load_distilled", lambda path, fmt, made=distilled: made)
        evaluate_command(cfg, synthetic, tmp_path / "out")
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["preset"] == "shapes-tiny" and results["dataset"] == "shapes"
    assert (results["pairs"], results["seed"]) == (20, 0) and results["timing"]["evaluate_s"] > 0
    assert list(results["methods"]) == ["ptm-st", "lors"]
    entry = results["methods"]["lors"]
    assert {*METRICS, "r_mean_std", "runs", "std", "protocol"} <= set(entry)
    assert entry["runs"] == 2 and set(entry["std"]) == set(METRICS) and entry["protocol"].startswith("val")
    assert entry["r_mean"] == pytest.approx(sum(r["test"]["r_mean"] for r in entry["per_run"]) / 2)
    printed = capsys.readouterr().out.splitlines()
    assert printed[-1].startswith("lors") and printed[-2].startswith("ptm-st")

    with pytest.raises(UserError, match="another preset"):
        evaluate_command(make_cfg("evaluate.epochs=2", "seed=5"), synthetic, tmp_path / "out")


def test_full_data_metrics_reads_the_expert_summary(tmp_path):
    test = {m: float(i) for i, m in enumerate(METRICS)}
    (tmp_path / "summary.json").write_text(
        json.dumps({"experts": 4, "test": test, "test_std": {m: 0.5 for m in METRICS}})
    )
    entry = full_data_metrics(tmp_path)
    assert {m: entry[m] for m in METRICS} == test
    assert (entry["runs"], entry["r_mean_std"], entry["std"]["IR@1"]) == (4, 0.5, 0.5)
    with pytest.raises(UserError, match="not found"):
        full_data_metrics(tmp_path / "missing")


def test_the_table_shows_diverged_runs():
    """A diverged run reports its last finite checkpoint; the table must not pass that off as a normal result."""
    entry = {**{m: 1.0 for m in METRICS}, "r_mean_std": 0.0, "runs": 2}
    lines = format_table({"ptm-st": {**entry, "diverged": 1}, "random": {**entry, "diverged": 0}}).splitlines()
    assert lines[1].startswith("ptm-st") and lines[1].endswith("2  (1 diverged)")
    assert lines[2].startswith("random") and "diverged" not in lines[2]


def test_the_table_shows_runs_that_broke_down_and_where():
    entry = {**{m: 1.0 for m in METRICS}, "r_mean_std": 0.0, "runs": 3, "diverged": 1, "broke_down": 1}
    fall = {"phase": 1, "epoch": 10, "val_r_mean": 4.1, "best_val_r_mean": 33.0}
    entry["per_run"] = [{"broke_down": None}, {"broke_down": fall}, {"broke_down": None}]
    lines = format_table({"ptm-st": entry}).splitlines()
    assert lines[1].endswith("3  (1 diverged, 1 broke down)")
    assert "ptm-st: 1 of 3 students broke down (validation r_mean 33.0 -> 4.1 in phase 1, epoch 10)" in lines[-1]


def test_evaluate_command_trains_with_the_runs_method_not_the_presets(tmp_path, monkeypatch):
    """A set distilled with mtt-vl (InfoNCE, temperature 0.1) is scored with that loss and temperature, although
    the preset's method is ptm-st (WBCE, 0.07); a set that records no config keeps the preset's."""
    cfg = make_cfg("evaluate.epochs=1", "evaluate.eval_every=1", "evaluate.runs=1")
    bundle = make_bundle()
    monkeypatch.setattr(results_module, "prepare", lambda cfg: bundle)
    seen = []
    real = results_module.evaluate_distilled
    monkeypatch.setattr(results_module, "evaluate_distilled", lambda cfg, *a: seen.append(cfg) or real(cfg, *a))
    run_config = make_cfg("distill.method=mtt-vl", "model.temperature=0.1")
    from mmdistill.config import to_dict

    for meta, out in (({"method": "mtt-vl", "config": to_dict(run_config)}, "a"), ({"method": "ptm-st"}, "b")):
        distilled = DistilledSet([real_phase(bundle, torch.arange(10))], meta, str(tmp_path / "syn"), "native")
        monkeypatch.setattr(results_module, "load_distilled", lambda path, fmt, made=distilled: made)
        evaluate_command(cfg, tmp_path / "syn", tmp_path / out)
    assert (seen[0].distill.loss, seen[0].model.temperature, seen[0].distill.method) == ("nce", 0.1, "mtt-vl")
    assert (seen[1].distill.loss, seen[1].model.temperature) == ("wbce", 0.07)


def test_reference_protocol_equals_a_transcription_of_the_reference_loop():
    """evaluate.protocol=reference against the reference's evaluation loop written out: one SGD for all
    phases at the last phase's live lrs, MultiStepLR(Epoch // 2 + 1) stepped per epoch across the phases,
    Epoch + 1 epochs per phase with test recall after epochs 0, 10, ..., Epoch (here 0, 2, 4), the untrained
    student a candidate, the best test r_mean selected."""
    from mmdistill.losses import LOSSES
    from mmdistill.metrics import retrieval_metrics
    from mmdistill.model import GROUPS
    from mmdistill.utils import derive_seed, generator

    epochs, batch = 4, 8
    cfg = make_cfg(
        "evaluate.protocol=reference",
        f"evaluate.epochs={epochs}",
        "evaluate.eval_every=2",
        f"evaluate.lr_milestones=[{epochs // 2}]",
        f"evaluate.batch_size={batch}",
    )
    bundle = make_bundle()
    phases = [real_phase(bundle, torch.arange(10), lr=0.05), real_phase(bundle, torch.arange(10, 22), lr=0.02)]
    for phase, live in zip(phases, ([0.5, 0.4], [0.3, 0.2])):  # EMA lrs differ from the live ones
        phase["lr_img_live"], phase["lr_txt_live"] = torch.tensor([live[0]]), torch.tensor([live[1]])
    seed = 3
    result = train_and_test(cfg, bundle, phases, seed=seed)

    model = build_model(cfg.model, text_dim=TEXT_DIM, image_size=cfg.data.image_size, seed=seed, device="cpu")
    named = dict(model.named_parameters())
    optimizer = torch.optim.SGD(
        [{"params": [named[n] for n in model.layouts[g].names], "lr": lr} for g, lr in zip(GROUPS, (0.3, 0.2))],
        lr=0,
        momentum=0.9,
        weight_decay=5e-4,
    )
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[epochs // 2 + 1], gamma=0.1)
    gen = generator(seed, "eval-batches")
    test = bundle.splits["test"]

    def test_r_mean():
        model.eval()
        with torch.no_grad():
            sim = model.similarity(model.encode_image(bundle.features["test"]), model.encode_text(bundle.texts["test"]))
        model.train()
        return retrieval_metrics(sim, test.img2txt, test.txt2img)["r_mean"]

    torch.manual_seed(derive_seed(seed, "eval-dropout"))
    best = test_r_mean()
    for phase in phases:
        images, texts = phase["images"], phase["texts"]
        for ep in range(epochs + 1):
            for _ in range(math.ceil(len(texts) / batch)):
                index = torch.randperm(len(texts), generator=gen)[:batch]
                loss = LOSSES["wbce"](model(images[index], texts[index]), torch.eye(len(index)))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            if ep % 2 == 0 or ep == epochs:
                best = max(best, test_r_mean())
            scheduler.step()
    assert result["test"]["r_mean"] == pytest.approx(best, rel=1e-6)
    assert not result["diverged"] and result["test"]["r_mean"] > 0
