"""Config: presets load, overrides apply, bad keys and values are rejected with one line naming the key."""

import pytest

from mmdistill.config import load_config, preset_names, with_method
from mmdistill.errors import UserError

PAPER_PRESETS = [f"{d}-{b}" for d in ("flickr30k", "coco", "cc3m") for b in (100, 200, 500)]


def test_every_paper_and_embedded_preset_exists_and_validates():
    names = preset_names()
    for name in PAPER_PRESETS + ["shapes-tiny", "shapes-100", "shapes-scratch-100", "emoji-100"]:
        assert name in names
        cfg = load_config(name)
        assert cfg.name == name and cfg.distill.phases


def test_paper_presets_follow_the_spec():
    f500 = load_config("flickr30k-500")
    assert [p.pairs for p in f500.distill.phases] == [200, 300]
    assert [list(p.start_epochs) for p in f500.distill.phases] == [[0, 2], [1, 3]]
    assert [p.shortcut_end for p in f500.distill.phases] == [5, 7]  # reference convexify 0_6 / 0_8, end exclusive
    assert f500.model.image_encoder == "timm:nfnet_l0" and f500.model.text_encoder == "hf:bert-base-uncased"
    assert f500.model.image_trainable and f500.distill.mini_batch_size == 40 and f500.distill.lr_sim == 10
    cc3m = load_config("cc3m-200")
    assert not cc3m.model.image_trainable and cc3m.model.embed_dim == 2048 and cc3m.distill.lr_sim == 50
    assert len(load_config("coco-100").distill.phases) == 1


def test_embedded_presets_have_two_phases():
    for name in ("shapes-tiny", "shapes-100", "shapes-scratch-100", "emoji-100"):
        assert len(load_config(name).distill.phases) == 2
    assert load_config("shapes-scratch-100").model.image_trainable
    assert load_config("shapes-tiny").model.image_encoder == "convnet"
    for name in ("shapes-100", "emoji-100"):
        cfg = load_config(name)
        assert not cfg.model.image_trainable and cfg.distill.space == "feature"


def test_finetune_presets_are_their_frozen_twins_with_the_image_encoder_trained_through_pixels():
    for name, frozen in (("shapes-finetune-100", "shapes-100"), ("emoji-finetune-100", "emoji-100")):
        cfg, twin = load_config(name), load_config(frozen)
        assert cfg.model.image_encoder == twin.model.image_encoder == "efficientnet_lite0" and cfg.model.pretrained
        assert cfg.model.image_trainable and cfg.distill.space == "pixel"
        assert (cfg.data, cfg.experts, cfg.distill.phases, cfg.evaluate) == (
            twin.data,
            twin.experts,
            twin.distill.phases,
            twin.evaluate,
        )


def test_dotted_overrides_including_list_items():
    cfg = load_config(
        "shapes-100",
        ["distill.phases.0.pairs=25", "distill.lr_sim=5", "seed=7", "evaluate.baselines=[random, herding]"],
    )
    assert cfg.distill.phases[0].pairs == 25 and cfg.distill.lr_sim == 5.0 and cfg.seed == 7
    assert list(cfg.evaluate.baselines) == ["random", "herding"]


def test_method_switches_are_configuration():
    lors = load_config("shapes-100", ["distill.method=lors"])
    assert lors.distill.similarity == "lowrank" and not lors.distill.use_phases and not lors.distill.use_ema
    mtt = with_method(load_config("shapes-100"), "mtt-vl")
    assert mtt.distill.similarity == "identity" and mtt.distill.gradient == "unroll" and mtt.distill.lr_lr == 0.05
    assert load_config("shapes-100", ["distill.method=mtt-vl", "distill.lr_lr=0.001"]).distill.lr_lr == 0.001
    # the user's override wins over the method's switch
    assert load_config("shapes-100", ["distill.method=lors", "distill.similarity=full"]).distill.similarity == "full"


# The paper's Table 4, written out by hand: (phased teachers, shortcut trajectories, EMA) per ablation row.
TABLE_4 = {
    "base": (False, False, False),
    "ema": (False, False, True),
    "ptm": (True, False, False),
    "st": (False, True, False),
    "ptm+ema": (True, False, True),
    "st+ema": (False, True, True),
    "ptm+st": (True, True, False),
    "ptm+st+ema": (True, True, True),
}


@pytest.mark.parametrize("name", sorted(TABLE_4))
def test_ablation_rows_switch_the_papers_components(name):
    dc = load_config("shapes-100", [f"distill.method={name}"]).distill
    assert (dc.use_phases, dc.use_shortcut, dc.use_ema) == TABLE_4[name]
    assert (dc.similarity, dc.loss, dc.blend.enabled) == ("full", "wbce", False)  # the rest is PTM-ST's


@pytest.mark.parametrize(
    "override, expected",
    [
        ("distill.phses.0.pairs=3", "unknown config key 'distill.phses.0.pairs' (did you mean distill.phases.0.pairs"),
        ("model.image_encodr=x", "did you mean model.image_encoder"),
        ("distill.phases.9.pairs=3", "'distill.phases.9.pairs'"),
        ("distill.syn_steps=abc", "bad value 'abc' for 'distill.syn_steps'"),
        ("distill.loss=wbc", "bad value 'wbc' for 'distill.loss' (did you mean wbce"),
        ("evaluate.runs=0", "'evaluate.runs': must be > 0"),
        ("distill.phases.0.start_epochs=[3, 1]", "'distill.phases.0.start_epochs'"),
        ("distill.phases.0.shortcut_end=99", "'distill.phases.0.shortcut_end'"),
        ("distill.space=feature", "'distill.space'"),
        ("model.image_trainable=false", "'distill.augment'"),  # the preset crops its pixels; the message says how
        ("evaluate.coreset_lrs=[0.1, -1]", "'evaluate.coreset_lrs'"),
        ("nonsense", "bad override 'nonsense'"),
    ],
)
def test_bad_overrides_are_one_line_errors_naming_the_key(override, expected):
    with pytest.raises(UserError) as info:
        load_config("shapes-scratch-100", [override])
    message = str(info.value)
    assert expected in message and "\n" not in message


def test_crops_need_pixels_into_a_trained_encoder():
    assert load_config("shapes-scratch-100", ["distill.augment=crop"]).distill.augment == "crop"
    for preset in ("shapes-100", "emoji-100"):  # features, or pixels through the frozen encoder: refused
        for space in ("feature", "pixel"):
            with pytest.raises(UserError, match="bad value 'crop' for 'distill.augment'"):
                load_config(preset, ["distill.augment=crop", f"distill.space={space}"])
        with pytest.raises(UserError, match="bad value 'crop' for 'evaluate.augment'"):
            load_config(preset, ["evaluate.augment=crop"])


def test_unknown_preset_suggests_close_names():
    with pytest.raises(UserError, match="unknown preset 'shapes-10'.*shapes-100"):
        load_config("shapes-10")


@pytest.mark.parametrize(
    "override,key",
    [
        ("distill.lr_init=nan", "distill.lr_init"),
        ("distill.lr_init=0", "distill.lr_init"),
        ("distill.lr_init=-0.1", "distill.lr_init"),
        ("distill.lr_images=-1", "distill.lr_images"),
        ("distill.lr_texts=inf", "distill.lr_texts"),
        ("distill.lr_sim=.nan", "distill.lr_sim"),
        ("experts.lr_img=nan", "experts.lr_img"),
        ("distill.max_retries=-1", "distill.max_retries"),
        ("distill.lr_lr=abc", "distill.lr_lr"),
        ("device=tpu", "device"),
        ("device=meta", "device"),
    ],
)
def test_values_no_run_can_use_are_rejected_naming_the_key(override, key):
    with pytest.raises(UserError, match=f"bad value .* for '{key}'") as err:
        load_config("shapes-tiny", [override])
    assert "\n" not in str(err.value)


def test_cuda_without_cuda_is_rejected_before_any_work(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="'device': CUDA is not available"):
        load_config("shapes-tiny", ["device=cuda"])


def test_numbers_without_a_dot_parse_without_a_warning(recwarn):
    """YAML reads 1e30 as a string; OmegaConf would convert it with a FutureWarning."""
    cfg = load_config("shapes-tiny", ["distill.lr_lr=1e-3", "distill.lr_images=1e3", "evaluate.coreset_lrs=[1e-2]"])
    assert (cfg.distill.lr_lr, cfg.distill.lr_images, list(cfg.evaluate.coreset_lrs)) == (1e-3, 1000.0, [0.01])
    assert not [w for w in recwarn if issubclass(w.category, FutureWarning)]


def test_pairs_beyond_the_training_captions_stop_prepare():
    """Checked when the data is known, before the experts train (it used to fail in the coreset baseline)."""
    from mmdistill.prepare import check_pairs

    train = type("Split", (), {"captions": ["c"] * 1000})()
    check_pairs(load_config("shapes-tiny"), train)
    with pytest.raises(
        UserError, match="bad value 5000 for 'distill.phases.0.pairs': the training split has only 1000 captions"
    ):
        check_pairs(load_config("shapes-tiny", ["distill.phases.0.pairs=5000"]), train)
    halves = load_config("shapes-tiny", ["distill.phases.0.pairs=600", "distill.phases.1.pairs=600"])
    check_pairs(halves, train)  # each phase fits: enough for experts and a phased distillation
    with pytest.raises(UserError, match="'distill.phases': 1200 pairs in all, but the training split has only 1000"):
        check_pairs(halves, train, whole_budget=True)  # a coreset baseline takes them all
    with pytest.raises(UserError, match="'distill.phases': 1200 pairs in all"):
        check_pairs(with_method(halves, "lors"), train)  # one phase of all the pairs


def test_gradient_mode_exact_is_a_deprecated_alias_of_tesla(caplog):
    import logging

    from mmdistill.config import from_dict, load_config, to_dict

    with caplog.at_level(logging.WARNING, logger="mmdistill.config"):
        cfg = load_config("shapes-tiny", ["distill.gradient=exact"])
    assert cfg.distill.gradient == "tesla"
    assert "distill.gradient=exact is deprecated" in caplog.text and "tesla" in caplog.text
    old_run = to_dict(cfg)
    old_run["distill"]["gradient"] = "exact"  # a meta.json written before the rename
    assert from_dict(old_run).distill.gradient == "tesla"


@pytest.mark.parametrize("name", PAPER_PRESETS)
def test_paper_presets_have_the_papers_budgets_and_the_specs_phases(name):
    """Budgets 100/200/500 as the paper states them (not the reference's off-by-one 99/199/499), 2000 iterations
    per phase, the convexified windows 0_6 / 0_8, one sim_rank per phase, E = 1 and the reference's lr update."""
    from mmdistill.config import load_config
    from mmdistill.distill.engine import plan_phases

    cfg = load_config(name)
    budget = int(name.split("-")[1])
    phases = cfg.distill.phases
    assert sum(p.pairs for p in phases) == budget
    assert [(list(p.start_epochs), p.shortcut_end, p.iterations) for p in phases] == [
        ([0, 2], 5, 2000),
        ([1, 3], 7, 2000),
    ][: len(phases)]
    assert all(p.sim_rank is not None for p in phases)
    dc = cfg.distill
    assert (dc.expert_epochs, dc.syn_steps, dc.lr_update, dc.lr_lr, dc.lr_init) == (1, 8, "sgd", 0.01, 0.1)
    assert (dc.lr_images, dc.lr_texts, dc.ema_decay, dc.similarity, dc.loss) == (1000, 1000, 0.99, "full", "wbce")
    for method in ("lors", "mtt-vl"):
        assert sum(p.pairs for p in plan_phases(load_config(name, [f"distill.method={method}"]))) == budget


def test_each_method_runs_with_its_own_published_settings():
    from mmdistill.config import load_config, with_method
    from mmdistill.distill.engine import plan_phases

    lors = load_config("flickr30k-100", ["distill.method=lors"])
    dc = lors.distill
    assert (dc.lr_images, dc.lr_sim, dc.sim_alpha, dc.similarity, dc.mini_batch_size) == (100, 10, 3, "lowrank", 20)
    (phase,) = plan_phases(lors)
    assert (phase.pairs, phase.iterations, phase.start_epochs, phase.sim_rank) == (100, 3000, [0, 2], 10)
    assert with_method(load_config("flickr30k-100"), "lors").distill == lors.distill  # bench quality's path
    coco = load_config("coco-500", ["distill.method=lors"])
    assert (coco.distill.merge_loss_branches, coco.model.temperature, coco.distill.lr_images) == (True, 0.1, 5000)
    assert load_config("coco-500").model.temperature == 0.07  # only lors runs at LoRS's temperature
    mtt = with_method(load_config("flickr30k-200"), "mtt-vl").distill
    assert (
        mtt.mini_batch_size,
        mtt.lr_images,
        mtt.gradient,
        plan_phases(load_config("flickr30k-200", ["distill.method=mtt-vl"]))[0].iterations,
    ) == (100, 1000, "unroll", 50000)
    ptm = load_config("flickr30k-100").distill
    assert (ptm.lr_images, ptm.similarity, ptm.mini_batch_size) == (1000, "full", 20)  # untouched by the blocks


def test_method_settings_are_overridable_and_checked():
    from mmdistill.config import load_config, with_method

    cfg = load_config("flickr30k-100", ["methods.lors.distill.lr_images=50", "distill.method=lors"])
    assert cfg.distill.lr_images == 50 and cfg.distill.sim_alpha == 3  # the rest of the block stays
    lors = with_method(load_config("flickr30k-100", ["methods.lors.distill.lr_images=50"]), "lors")
    assert lors.distill.lr_images == 50
    assert load_config("flickr30k-100", ["distill.method=lors", "distill.lr_images=7"]).distill.lr_images == 7
    with pytest.raises(UserError, match="unknown config key 'distill.lr_imags'.*in methods.lors"):
        load_config("flickr30k-100", ["methods.lors.distill.lr_imags=50", "distill.method=lors"])
    with pytest.raises(UserError, match="unknown method in 'methods.lorz'"):
        load_config("flickr30k-100", ["methods.lorz.distill.lr_images=50"])
