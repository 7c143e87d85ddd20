"""data.whiten=zca: the transform itself, where it is refused, and a whitened run's set carrying its transform."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mmdistill.config import load_config
from mmdistill.data.whitening import FILE, Whitening, load_whitening
from mmdistill.errors import UserError
from mmdistill.pipeline import run
from mmdistill.prepare import Prepared
from mmdistill.synthetic import describe, export, load_distilled, phases_for


def _correlated_images(count: int, seed: int = 0) -> torch.Tensor:
    """[count, 3, 4, 4] images whose 48 pixel values are strongly correlated (a random mixing of 48 sources)."""
    gen = torch.Generator().manual_seed(seed)
    sources = torch.randn(count, 48, generator=gen) * torch.linspace(0.1, 3.0, 48)
    mixing = torch.randn(48, 48, generator=gen)
    return (sources @ mixing + 0.5).view(count, 3, 4, 4)


def test_zca_decorrelates_the_training_pixels_and_undoes_exactly():
    images = _correlated_images(4000)
    whitening = Whitening.fit(images.split(1500), epsilon=1e-6)  # in chunks, as a file-based set is read
    whole = Whitening.fit([images], epsilon=1e-6)
    assert torch.allclose(whitening.matrix, whole.matrix, atol=1e-4) and whitening.matches(whole)

    white = whitening.apply(images).reshape(len(images), -1)
    covariance = torch.cov(white.T)
    assert torch.allclose(covariance, torch.eye(48), atol=2e-3)  # decorrelated, unit variance
    assert white.mean(0).abs().max() < 1e-4
    assert torch.allclose(whitening.matrix, whitening.matrix.T, atol=1e-5)  # ZCA: the symmetric whitening
    assert (whitening.undo(whitening.apply(images)) - images).abs().max() < 1e-4 * images.abs().max()  # float32
    # epsilon keeps the smallest directions from being blown up: their variance stays below 1
    regularised = Whitening.fit([images], epsilon=0.1).apply(images).reshape(len(images), -1)
    assert torch.linalg.eigvalsh(torch.cov(regularised.T)).min() < 0.5
    assert not whitening.matches(Whitening.fit([_correlated_images(4000, seed=1)], epsilon=1e-6))


def test_a_bundle_shows_whitened_inputs_as_their_pictures():
    pixels01 = torch.rand(60, 3, 4, 4)
    bundle = Prepared(splits={}, texts={}, mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.25))
    bundle.whitening = Whitening.fit([bundle.normalize(pixels01)], epsilon=0.01)
    inputs = bundle.normalize(pixels01)
    assert not torch.allclose(inputs, (pixels01 - 0.5) / 0.25, atol=0.1)  # whitened, not only normalised
    assert torch.allclose(bundle.pictures(inputs), pixels01, atol=1e-4)


@pytest.mark.parametrize(
    ("preset", "overrides", "message"),
    [
        ("shapes-100", [], "needs an image encoder trained from random weights"),  # frozen, pretrained
        ("shapes-finetune-100", [], "needs an image encoder trained from random weights"),  # pretrained
        ("shapes-tiny", ["data.image_size=64"], r"needs data.image_size <= 48 \(it is 64\)"),
        ("shapes-tiny", ["data.zca_epsilon=0"], "'data.zca_epsilon': must be > 0"),
    ],
)
def test_whitening_is_refused_before_any_work_where_it_cannot_apply(preset, overrides, message):
    with pytest.raises(UserError, match=message):
        load_config(preset, ["data.whiten=zca", *overrides])
    with pytest.raises(UserError, match="'data.whiten'"):
        load_config("shapes-tiny", ["data.whiten=pca"])


def test_a_whitened_run_distils_whitened_pixels_and_its_set_carries_the_transform(tmp_path, monkeypatch):
    overrides = [f"cache_dir={tmp_path / 'cache'}", "evaluate.baselines=[]", "evaluate.runs=1"]
    cfg = load_config("shapes-tiny", [*overrides, "data.whiten=zca"])
    results = run(cfg, tmp_path / "run")
    assert 0 <= results["methods"]["ptm-st"]["r_mean"] <= 100

    folder = tmp_path / "run" / "distilled"
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["normalization"]["whitening"] == FILE
    distilled = load_distilled(tmp_path / "run")
    from mmdistill.prepare import prepare

    assert len(list((tmp_path / "cache" / "features").glob("zca-*.safetensors"))) == 1  # fitted once, cached

    def no_second_fit(*args, **kwargs):
        raise AssertionError("the whitening was fitted again instead of read from the cache")

    with monkeypatch.context() as patch:
        patch.setattr(Whitening, "fit", no_second_fit)
        bundle = prepare(cfg)
    assert distilled.whitening.matches(bundle.whitening) and load_whitening(folder / FILE).matches(bundle.whitening)
    # what every stage reads (bundle.normalize) is whitened: no direction of the training pixels keeps more than
    # unit variance, where the merely normalised pixels have directions far above it
    train = bundle.normalize(bundle.pixels["train"]).flatten(1)
    plain_train = (bundle.pictures(bundle.normalize(bundle.pixels["train"])) - 0.5).flatten(1) / 0.26
    assert torch.linalg.eigvalsh(torch.cov(train.T)).max() < 1.0 < torch.linalg.eigvalsh(torch.cov(plain_train.T)).max()
    phase = distilled.phases[0]
    assert torch.equal(phases_for(distilled, cfg, bundle)[0]["images"], phase["images"])

    plain = load_config("shapes-tiny", overrides)
    with pytest.raises(UserError, match="holds ZCA-whitened pixels, but preset shapes-tiny trains on unwhitened"):
        phases_for(distilled, plain, prepare(plain))

    out = export(distilled, "folder", tmp_path / "exported")
    again = load_distilled(out)
    assert again.whitening.matches(distilled.whitening)
    assert torch.equal(again.phases[1]["images"], distilled.phases[1]["images"])
    png = np.asarray(Image.open(out / "images" / "phase-1" / "00003.png"), dtype=np.float32) / 255
    picture = bundle.pictures(distilled.phases[1]["images"][3:4])[0].permute(1, 2, 0).numpy()
    assert np.abs(png - picture).max() <= 1 / 255 + 1e-6  # the PNG shows the un-whitened pixels
    assert f"`{FILE}` holds the transform" in (out / "README.md").read_text()
    assert f"then ZCA-whitened ({FILE})" in describe(again)
