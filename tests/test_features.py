import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before any Hugging Face import: the tests never touch the network

import pytest
import torch
from PIL import Image
from safetensors import safe_open

import mmdistill.features as features_module
from mmdistill.data import Split
from mmdistill.errors import UserError
from mmdistill.features import cache_path, image_features, text_features


def tiny_split(images, name="test") -> Split:
    captions = ["a red circle", "a blue square", "a red circle", "two stars", "a blue square", "nothing"]
    txt2img = [0, 0, 1, 1, 2, 3]
    return Split(name=name, captions=captions, txt2img=txt2img, img2txt=[[0, 1], [2, 3], [4], [5]], images=images)


@pytest.fixture(scope="module")
def pixels():
    return torch.randint(0, 256, (4, 3, 40, 40), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def fail_if_built(*args, **kwargs):
    raise AssertionError("the encoder was built although the features are cached")


def test_text_features_are_cached_and_reused(tmp_path, monkeypatch, pixels):
    monkeypatch.setenv("HOME", str(tmp_path))
    split = tiny_split(pixels)
    features = text_features(split, "minilm", "~/cache")
    assert features.shape == (6, 384) and features.dtype == torch.float32
    torch.testing.assert_close(features[0], features[2])

    files = list((tmp_path / "cache" / "features").glob("text-*.safetensors"))
    assert len(files) == 1
    with safe_open(str(files[0]), "pt") as f:
        assert f.metadata()["encoder"] == "minilm" and f.metadata()["split"] == "test"
        assert (f.metadata()["count"], f.metadata()["dim"]) == ("6", "384")

    monkeypatch.setattr(features_module, "build_text_encoder", fail_if_built)
    torch.testing.assert_close(text_features(split, "minilm", tmp_path / "cache"), features)


def test_image_features_are_cached_and_reused(tmp_path, monkeypatch, pixels):
    split = tiny_split(pixels)
    features = image_features(split, "efficientnet_lite0", 32, tmp_path)
    assert features.shape == (4, 1280) and torch.isfinite(features).all()
    assert not features.is_inference()

    build = features_module.build_frozen_image_encoder
    monkeypatch.setattr(features_module, "build_frozen_image_encoder", fail_if_built)
    torch.testing.assert_close(image_features(split, "efficientnet_lite0", 32, tmp_path), features)

    monkeypatch.setattr(features_module, "build_frozen_image_encoder", build)  # a new size misses the cache
    assert image_features(split, "efficientnet_lite0", 48, tmp_path, batch_size=3).shape == (4, 1280)
    assert len(list((tmp_path / "features").glob("image-*.safetensors"))) == 2


def test_image_features_from_files_match_in_memory_pixels(tmp_path, pixels):
    paths = []
    for i, image in enumerate(pixels):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(paths[-1])
    from_files = image_features(tiny_split(paths), "efficientnet_lite0", 32, tmp_path / "a")
    in_memory = image_features(tiny_split(pixels), "efficientnet_lite0", 32, tmp_path / "b")
    torch.testing.assert_close(from_files, in_memory)


def test_cache_key_changes_with_what_the_features_depend_on(pixels):
    base = {
        "kind": "image",
        "split": tiny_split(pixels).fingerprint(),
        "encoder": "efficientnet_lite0",
        "image_size": 32,
        "pretrained": True,
    }
    changes = [
        {"encoder": "timm:resnet18"},
        {"image_size": 64},
        {"pretrained": False},
        {"split": tiny_split(pixels.flip(0)).fingerprint()},
    ]
    paths = {cache_path("c", base)} | {cache_path("c", dict(base, **change)) for change in changes}
    assert len(paths) == 1 + len(changes)
    assert cache_path("c", base) == cache_path("c", dict(base))  # stable


def test_corrupt_cache_file_is_a_user_error(tmp_path, pixels):
    split = Split(name="test", captions=["a red circle"], txt2img=[0], img2txt=[[0]], images=pixels[:1])
    image_features(split, "efficientnet_lite0", 32, tmp_path)
    (path,) = (tmp_path / "features").glob("image-*.safetensors")
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match=path.name):
        image_features(split, "efficientnet_lite0", 32, tmp_path)


def test_a_frozen_random_convnet_caches_what_every_student_s_encoder_computes(tmp_path):
    """A frozen convnet's cached features were once computed by a default-size convnet of whatever random init
    the global generator gave, while each student drew its own: other features, even another width."""
    from mmdistill.config import load_config
    from mmdistill.model import build_model
    from mmdistill.prepare import prepare

    shrink = ["data.train_images=20", "data.val_images=4", "data.test_images=4", "model.image_trainable=false"]
    cfg = load_config("shapes-tiny", [f"cache_dir={tmp_path}", *shrink])
    bundle = prepare(cfg)
    pixels = bundle.normalize(bundle.pixels01("test", torch.arange(4), cfg.data.image_size))
    for seed in (1, 2):
        student = build_model(cfg.model, text_dim=bundle.text_dim, image_size=cfg.data.image_size, seed=seed)
        with torch.no_grad():
            torch.testing.assert_close(student.frozen_image_encoder(pixels), bundle.features["test"][:4])
    wider = load_config("shapes-tiny", [f"cache_dir={tmp_path}", *shrink, "model.convnet.width=16"])
    assert prepare(wider).features["test"].shape[1] == 2 * bundle.features["test"].shape[1]
