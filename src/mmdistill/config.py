"""Typed configuration: dataclass schema, YAML presets, dotted overrides, method resolution and validation.

Load order (later wins): schema defaults -> preset YAML (after its `inherit` chain) -> the method's defining
switches (`METHODS[distill.method]`) -> the user's config file (`--config`, the presets' schema, applied as the
same `--set`s would be) -> the user's `--set key=value` overrides.
Unknown keys and bad values are rejected with a one-line `UserError` naming the key
(and the file) and its close matches, before any work starts. This module imports no torch (only `device`
checks do), so such errors come back in a fraction of a second.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException, ValidationError

from mmdistill.errors import UserError

logger = logging.getLogger(__name__)

AUTO = "auto"  # a setting measured from the data and the experts at run time


@dataclass
class DataConfig:
    source: str = "shapes"  # shapes | emoji | flickr30k | coco | cc3m | folder | hf
    root: str | None = None  # annotation / dataset root for file-based sources
    name: str | None = None  # hf: a `datasets` hub id or a local dataset folder
    image_column: str = "image"  # hf: the column holding the images
    text_column: str = "text"  # hf: the column holding a caption or a list of captions
    split_map: dict[str, str] = field(default_factory=dict)  # hf: {train|validation|test: the dataset's split}
    image_root: str | None = None  # image files root when it differs from root
    image_size: int = 32
    seed: int = 0  # procedural generation and deterministic splits
    max_words: int = 30
    train_images: int = 0  # procedural sources: split sizes (0 = the source's default)
    val_images: int = 0  # also the size of a validation split carved from train (folder, hf)
    test_images: int = 0
    val_fraction: float = 0.1  # carved splits when val_images / test_images are 0: fractions of the images
    test_fraction: float = 0.1
    captions_per_image: int = 5
    # none | zca: ZCA-whiten the normalised pixels (fitted on the training images) for experts, students and the
    # distillation alike, the MTT line's option for ConvNets trained from scratch; pixels into an image encoder
    # trained from random weights only, at most ZCA_MAX_IMAGE_SIZE px
    whiten: str = "none"
    zca_epsilon: float = 0.1  # added to the covariance's eigenvalues (kornia's and MTT's value)


ZCA_MAX_IMAGE_SIZE = 48  # a [3s^2, 3s^2] eigendecomposition per prepare: seconds at 48 px, minutes and 0.6 GB at 64


@dataclass
class ConvNetConfig:
    depth: int = 3
    width: int = 128
    norm: str = "instancenorm"  # instancenorm | batchnorm | layernorm | none
    pooling: str = "avgpooling"  # avgpooling | maxpooling | none


@dataclass
class ModelConfig:
    image_encoder: str = "convnet"  # convnet | efficientnet_lite0 | timm:<name> | open_clip:<model>[@<weights>]
    text_encoder: str = "minilm"  # minilm | hf:<name> | st:<name> | open_clip:<model>[@<weights>]
    image_trainable: bool = True  # False: frozen image encoder + trained image projection
    pretrained: bool = True  # pretrained image-encoder weights (convnet is always from scratch)
    embed_dim: int = 0  # joint embedding size in frozen-image mode (0 = image feature size)
    temperature: float = 0.07  # logits = (1/T) * cos-sim; fixed, as in the reference
    dropout: float = 0.1  # projection-head dropout
    # A trained image encoder's batch-norm statistics: frozen (eval mode: normalise with the running statistics,
    # never update them), batch (train mode: each batch's own), or auto (frozen for a pretrained encoder, batch
    # for one from random weights). The paper's fine-tuned NFNet has no batch norm; EfficientNet-Lite0 in batch
    # mode trained on synthetic batches normalises test images by their statistics (shapes-finetune-100 students
    # on the same distilled set: 4.7 in batch mode, 12.7 frozen; a random coreset 1.5 vs 7.5).
    norm_stats: str = "auto"
    convnet: ConvNetConfig = field(default_factory=ConvNetConfig)


@dataclass
class ExpertsConfig:
    count: int = 20
    epochs: int = 10
    lr_img: float = 0.1
    lr_txt: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    batch_size: int = 128
    loss: str = "nce"
    augment: str = "clip"  # clip | crop | none (flips are skipped for sources whose captions say left/right)
    dtype: str = "float32"  # float32 | float16 | bfloat16 storage of the snapshots


@dataclass
class PhaseConfig:
    pairs: int = 100
    iterations: int = 2000
    start_epochs: list[int] = field(default_factory=lambda: [0, 2])  # [min, max): start snapshot drawn here
    shortcut_end: int | None = None  # match the shortcut trajectory 0..t_p (inclusive); None = plain expert
    sim_rank: int | None = None  # rank of a low-rank S in this phase (the reference's per-phase list); None:
    # distill.sim_rank


@dataclass
class BlendConfig:
    enabled: bool = False  # RepBlend-style representation blending inside the student's mini-batches
    alpha: float = 1.0  # mixing coefficient ~ Beta(alpha, alpha)


@dataclass
class DistillConfig:
    method: str = "ptm-st"  # a name in METHODS; sets the switches below
    phases: list[PhaseConfig] = field(default_factory=lambda: [PhaseConfig()])
    use_phases: bool = True  # False: one phase with all pairs over the union of the windows
    use_shortcut: bool = True  # False: match the plain expert trajectory
    use_ema: bool = True  # False: no EMA of the synthetic data
    ema_decay: float = 0.99
    syn_steps: int = 8
    expert_epochs: int | str = AUTO  # M: match snapshot s+M; auto: enough expert steps for syn_steps
    mini_batch_size: int = 20
    loss: str = "wbce"
    similarity: str = "full"  # identity | full | lowrank
    sim_rank: int = 10
    sim_alpha: float = 1.0
    # Data learning rates and the student's initial lr: a number, or "auto" (distill/calibrate.py measures them on
    # each phase's initial synthetic set and experts; the chosen values and reasons go to meta.json).
    lr_images: float | str = AUTO
    lr_texts: float | str = AUTO
    lr_sim: float | str = AUTO
    lr_init: float | str = AUTO  # initial learnable student learning rate (alpha_img = alpha_txt)
    # How the learned student lrs move: log-adam (Adam on log(lr): each iteration changes an lr by about
    # lr_lr as a fraction, whatever its gradient's size) or sgd (the reference: SGD with momentum on the lr,
    # whose lr_lr is 0.01). 0.05 lets an lr grow tenfold in about 50 iterations, as the data comes to want it
    # (shapes-100, where the learned lrs rise from 0.009 to ~0.07: r_mean 33.1 at 0.01, 37.6 at 0.05).
    lr_update: str = "log-adam"
    lr_lr: float = 0.05
    momentum: float = 0.5
    space: str = "pixel"  # pixel | feature (feature only with a frozen image encoder)
    # none | crop: each inner step trains the student on a random resized crop of its synthetic images (the
    # experts' `crop`, no flip), drawn once per step and replayed in every pass, as the MTT line's differentiable
    # augmentation; pixels into a trained image encoder only (a frozen one's features are encoded once per
    # iteration, which a crop per step would undo).
    augment: str = "none"
    init: str = "real"  # real | noise
    # fd (TESLA's gradient by a finite-difference Hessian-vector product, fast) | tesla (TESLA's gradient by a
    # double backward) | unroll (the true gradient through the whole inner loop, memory grows with syn_steps).
    # TESLA's gradient drops the path through the student's parameters; `exact` is tesla's old name.
    gradient: str = "fd"
    merge_loss_branches: bool = False
    # GPU switches of the inner loop (pixel space), off by default: on CPU they cost time and change nothing.
    # autocast: the student's forward passes in bfloat16 (torch.autocast; parameters, gradients and the loss
    # stay float32); channels_last: the synthetic images in NHWC layout, which GPU convolutions prefer.
    autocast: bool = False
    channels_last: bool = False
    trajectories_per_iter: int = 1
    checkpoint_every: int = 50
    snapshot_every: int = 0  # keep the EMA state every k iterations (recall-vs-iteration curve); 0 = never
    max_retries: int = 3  # NaN/Inf recoveries per phase before giving up
    blend: BlendConfig = field(default_factory=BlendConfig)


@dataclass
class EvaluateConfig:
    runs: int = 5
    epochs: int = 100  # per phase
    eval_every: int = 10
    batch_size: int = 128
    momentum: float = 0.9
    weight_decay: float = 0.0005
    lr_milestones: list[int] = field(default_factory=lambda: [50])  # x0.1 at these epochs
    lr_schedule: str = "per-phase"  # per-phase (restart each phase) | global (reference)
    # What a later phase's student starts from: best (the checkpoint the protocol would select so far: a phase's
    # data moves a student well for a few dozen steps and then away, so phase 0's last epoch can be 10 points
    # below its best) | last (the previous phase's last epoch, the reference's order). The reference protocol
    # always hands on the last epoch.
    handoff: str = "best"
    protocol: str = "val"  # val (pick epoch on validation, report test) | reference (best on test)
    image_encoder: str | None = None  # cross-architecture evaluation
    # none | crop: every batch of pixels a student trains on is randomly cropped (the experts' crop, no flip),
    # as the MTT line trains its evaluation students with augmentation; coresets alike. Students that read
    # features (a frozen image encoder) are not affected.
    augment: str = "none"
    baselines: list[str] = field(default_factory=lambda: ["random", "full"])
    # Real pairs have no learned lr: a coreset trains with each of these (empty: experts.lr_img/lr_txt) and
    # reports the one whose runs reach the best mean validation r_mean.
    coreset_lrs: list[float] = field(default_factory=lambda: [0.1, 0.03, 0.01])


@dataclass
class Config:
    name: str = ""
    description: str = ""
    inherit: str | None = None  # preset this one extends
    seed: int = 0
    device: str = "auto"
    cache_dir: str = "~/.cache/mmdistill"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    experts: ExpertsConfig = field(default_factory=ExpertsConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    # Per-method settings of this preset: {method: {dotted config key: value}}, applied over the preset whenever
    # that method runs (chosen with distill.method, or run beside it by bench quality), before the user's --set.
    # The paper presets keep each method's published numbers here (LoRS's table for lors, MTT-VL's for mtt-vl);
    # `--set methods.lors.distill.lr_images=50` overrides one of them.
    methods: dict[str, Any] = field(default_factory=dict)


# Each method is a set of switches on the one engine (applied after the preset, before user overrides).
_PTM_ST = {
    "use_phases": True,
    "use_shortcut": True,
    "use_ema": True,
    "similarity": "full",
    "loss": "wbce",
    "blend.enabled": False,
}
METHODS: dict[str, dict[str, Any]] = {
    "mtt-vl": {
        "use_phases": False,
        "use_shortcut": False,
        "use_ema": False,
        "similarity": "identity",
        "loss": "nce",
        "gradient": "unroll",
        "blend.enabled": False,
    },
    "lors": {
        "use_phases": False,
        "use_shortcut": False,
        "use_ema": False,
        "similarity": "lowrank",
        "loss": "wbce",
        "blend.enabled": False,
    },
    "ptm-st": _PTM_ST,
    "ptm-st+blend": {**_PTM_ST, "blend.enabled": True},
    # PTM-ST on synthetic pixels: on a feature-space preset, images a frozen encoder reads instead of features
    "ptm-st+pixels": {**_PTM_ST, "space": "pixel"},
}
# The paper's Table 4 ablation: PTM-ST with components switched off.
for _name in ("base", "ema", "ptm", "st", "ptm+ema", "st+ema", "ptm+st", "ptm+st+ema"):
    _parts = set(_name.split("+"))
    METHODS[_name] = {
        **_PTM_ST,
        "use_phases": "ptm" in _parts,
        "use_shortcut": "st" in _parts,
        "use_ema": "ema" in _parts,
    }
ABLATION = ("base", "ema", "ptm", "st", "ptm+ema", "st+ema", "ptm+st", "ptm+st+ema")

CHOICES = {
    "data.source": ("shapes", "emoji", "flickr30k", "coco", "cc3m", "folder", "hf"),
    "data.whiten": ("none", "zca"),
    "model.convnet.norm": ("instancenorm", "batchnorm", "layernorm", "none"),
    "model.norm_stats": ("auto", "frozen", "batch"),
    "model.convnet.pooling": ("avgpooling", "maxpooling", "none"),
    "experts.augment": ("clip", "crop", "none"),
    "experts.dtype": ("float32", "float16", "bfloat16"),
    "experts.loss": ("nce", "cwcl", "kl", "bce", "wbce", "mse"),
    "distill.method": tuple(METHODS),
    "distill.loss": ("nce", "cwcl", "kl", "bce", "wbce", "mse"),
    "distill.similarity": ("identity", "full", "lowrank"),
    "distill.space": ("pixel", "feature"),
    "distill.augment": ("none", "crop"),
    "distill.init": ("real", "noise"),
    "distill.gradient": ("fd", "tesla", "unroll"),
    "distill.lr_update": ("log-adam", "sgd"),
    "evaluate.lr_schedule": ("per-phase", "global"),
    "evaluate.handoff": ("best", "last"),
    "evaluate.augment": ("none", "crop"),
    "evaluate.protocol": ("val", "reference"),
}


# Old names kept for one release: (key, old value) -> new value, with a deprecation message when used.
DEPRECATED_VALUES = {("distill.gradient", "exact"): "tesla"}

AUTO_KEYS = ("lr_images", "lr_texts", "lr_sim", "lr_init")  # float settings that may be auto
AUTO_FLOATS = {f"distill.{key}" for key in AUTO_KEYS}


def total_pairs(cfg) -> int:
    """The budget: synthetic pairs over all phases (what coresets, methods without phases and tables count)."""
    return sum(phase.pairs for phase in cfg.distill.phases)


def preset_names() -> list[str]:
    """All shipped presets, sorted."""
    folder = resources.files("mmdistill") / "presets"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _read_preset(name: str) -> dict:
    path = resources.files("mmdistill") / "presets" / f"{name}.yaml"
    if not path.is_file():
        close = difflib.get_close_matches(name, preset_names(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else f"; available: {', '.join(preset_names())}"
        raise UserError(f"unknown preset {name!r}{hint}")
    return yaml.safe_load(path.read_text()) or {}


def preset_chain(name: str) -> list[dict]:
    """The preset's YAML and those it inherits from, base first."""
    chain, seen = [], set()
    while name:
        if name in seen:
            raise UserError(f"preset {name!r} inherits from itself")
        seen.add(name)
        raw = _read_preset(name)
        chain.insert(0, raw)
        name = raw.get("inherit")
    return chain


def _all_keys(node, prefix: str = "") -> list[str]:
    """Every dotted key of a config (list items by index), for "did you mean" hints."""
    keys = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, value in items:
        if isinstance(node, dict):
            keys.append(f"{prefix}{k}")
        keys += _all_keys(value, f"{prefix}{k}.")
    return keys


def _key_error(cfg: DictConfig, key: str, problem: str) -> UserError:
    close = difflib.get_close_matches(key, _all_keys(OmegaConf.to_container(cfg)), n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return UserError(f"{problem} {key!r}{hint}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _set(cfg: DictConfig, key: str, value: Any) -> None:
    """Set a dotted key on a structured config; list items by index (`distill.phases.0.pairs`)."""
    parts = key.split(".")
    node = cfg
    try:
        for part in parts[:-1]:
            node = node[int(part)] if isinstance(node, ListConfig) else node[part]
        last = parts[-1]
        if isinstance(node, ListConfig):
            index = int(last)
            if index >= len(node):
                raise _key_error(cfg, key, "list index out of range in")
            node[index] = value
        else:
            if key.startswith("data.split_map."):
                value = value if value is None or isinstance(value, str) else str(value)  # split names are text
            elif _is_open_mapping(node):
                pass  # a method's settings block (`methods`): its keys are checked when the method is applied
            elif last not in node:
                raise _key_error(cfg, key, "unknown config key")
            declared = _declared_type(node, last)
            if declared is float or (key in AUTO_FLOATS and value != AUTO):
                value = _number(value, key)
            elif get_origin(declared) in (list, list) and get_args(declared) == (float,) and isinstance(value, list):
                value = [_number(v, key) for v in value]
            node[last] = value
    except ValidationError as err:
        first = str(err).strip().splitlines()[0]
        raise UserError(f"bad value {value!r} for {key!r}: {first}") from None
    except (KeyError, IndexError, ValueError, AttributeError, OmegaConfBaseException):
        raise _key_error(cfg, key, "unknown config key") from None


def _declared_type(section: DictConfig, key: str) -> Any:
    """The type a config section's dataclass declares for `key` (None for a key it does not declare)."""
    schema = OmegaConf.get_type(section)
    return get_type_hints(schema).get(key) if dataclasses.is_dataclass(schema) else None


def _is_open_mapping(node) -> bool:
    """A Dict[str, ...] field (data.split_map), whose keys are the user's to choose, unlike a section's."""
    return isinstance(node, DictConfig) and OmegaConf.get_type(node) in (None, dict)


def _number(value: Any, key: str) -> Any:
    """A float key's value as a float: YAML reads `1e30` (no dot) as a string, which OmegaConf would convert
    with a FutureWarning, so numbers in strings are parsed here; None and non-numbers pass to OmegaConf."""
    if _is_int(value):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise UserError(f"bad value {value!r} for {key!r}: expected a number") from None
    return value


def _merge_preset(cfg: DictConfig, raw: dict, prefix: str = "") -> None:
    """Merge a preset dict key by key so that unknown keys are reported with their dotted name."""
    for k, v in raw.items():
        key = f"{prefix}{k}"
        if key == "methods":  # merged method by method over the inherited preset's
            _set_method_block(cfg, key, v)
            continue
        if (
            isinstance(v, dict)
            and isinstance(OmegaConf.select(cfg, key), DictConfig)
            and not _is_open_mapping(OmegaConf.select(cfg, key))
        ):
            _merge_preset(cfg, v, f"{key}.")
            continue
        if isinstance(v, list) and key == "distill.phases":
            v = [
                OmegaConf.merge(OmegaConf.structured(PhaseConfig), _checked_phase(p, f"{key}.{i}"))
                for i, p in enumerate(v)
            ]
        _set(cfg, key, v)


def _checked_phase(raw: Any, key: str) -> dict:
    if not isinstance(raw, dict):
        raise UserError(f"bad value for {key!r}: a phase is a mapping of pairs, iterations, start_epochs, shortcut_end")
    unknown = set(raw) - set(PhaseConfig.__dataclass_fields__)
    if unknown:
        raise _key_error(OmegaConf.structured(Config), f"{key}.{sorted(unknown)[0]}", "unknown config key")
    return raw


def parse_override(text: str) -> tuple[str, Any]:
    """'a.b=value' -> ('a.b', YAML-parsed value)."""
    if "=" not in text:
        raise UserError(f"bad override {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def read_config_file(path: str | Path) -> dict:
    """A user's config file: a YAML mapping with the presets' schema (it may `inherit` a shipped preset)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise UserError(f"config file is a folder: {path}") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(f"{where}: invalid YAML: {getattr(exc, 'problem', None) or exc}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of config keys, got {type(raw).__name__}")
    return raw


def _flatten(cfg: DictConfig, raw: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """A nested mapping as (dotted key, value) pairs in file order; lists and open mappings stay whole."""
    pairs = []
    for k, v in raw.items():
        key = f"{prefix}{k}"
        node = OmegaConf.select(cfg, key, default=None) if "." not in str(k) else None
        if isinstance(v, dict) and isinstance(node, DictConfig) and not _is_open_mapping(node):
            pairs += _flatten(cfg, v, f"{key}.")
        else:
            pairs.append((key, v))
    return pairs


def load_config(
    preset: str | None, overrides: list[str] | tuple[str, ...] = (), config_file: str | Path | None = None
) -> DictConfig:
    """Build the validated config for a preset, a user config file merged over it, and `key=value` overrides.

    The file may name its base preset with `inherit`; without `--preset` that base is used (none: the schema
    defaults). The config's name is the preset's, else the file's `name`, else its stem.
    """
    user = read_config_file(config_file) if config_file is not None else {}
    base = preset
    if user.get("inherit") is not None:
        if preset and user["inherit"] != preset:
            raise UserError(f"{config_file}: inherits {user['inherit']!r}, but --preset is {preset!r}; give one")
        base = user["inherit"]
    if base is None and config_file is None:
        raise UserError("no configuration: give --preset NAME (see `mmdistill presets`) or --config FILE")
    cfg = OmegaConf.structured(Config)
    for raw in preset_chain(base) if base else []:
        _merge_preset(cfg, raw)
    cfg.name = preset or (user.get("name") if isinstance(user.get("name"), str) else None) or Path(config_file).stem
    # The file's keys are applied exactly as the same `--set`s before the command line's, so that a file and
    # the equivalent --set flags give the same config (method switches included).
    given = [(key, value, config_file) for key, value in _flatten(cfg, user) if key not in ("inherit", "name")]
    given += [(*parse_override(o), None) for o in overrides]
    method = next((v for k, v, _ in reversed(given) if k == "distill.method"), cfg.distill.method)
    if method not in METHODS:
        raise _choice_error("distill.method", method)
    # a method's settings block first (it is applied with the method), then everything else over both
    blocks = [(key, value, origin) for key, value, origin in given if key == "methods" or key.startswith("methods.")]
    given = [item for item in given if item not in blocks]
    for key, value, origin in blocks:
        try:
            _set_method_block(cfg, key, value)
        except UserError as err:
            raise UserError(f"{origin}: {err}" if origin else str(err)) from None
    cfg.distill.method = method
    apply_method(cfg, method)
    for key, value, origin in given:
        try:
            if key == "distill.phases" and isinstance(value, list):
                _merge_preset(cfg, {"distill": {"phases": value}})
            else:
                _set(cfg, key, value)
        except UserError as err:
            raise UserError(f"{origin}: {err}" if origin else str(err)) from None
    _rename_deprecated(cfg, warn=True)
    try:
        validate(cfg)
    except UserError as err:
        # a bad value may come from the file; say which file was read, as the key alone may not tell
        raise UserError(f"{err} (config file {config_file})" if config_file is not None else str(err)) from None
    _check_device(cfg.device)
    return cfg


def _rename_deprecated(cfg: DictConfig, warn: bool) -> None:
    """Replace the old names of DEPRECATED_VALUES by the new ones, saying so when the user wrote them."""
    for (key, old), new in DEPRECATED_VALUES.items():
        if OmegaConf.select(cfg, key) == old:
            if warn:
                logger.warning(
                    "%s=%s is deprecated and will be removed in the next release: it is now called %s"
                    " (TESLA's gradient, which drops the path through the student's parameters)",
                    key,
                    old,
                    new,
                )
            OmegaConf.update(cfg, key, new, merge=False)


def _check_device(name: str) -> None:
    """A device torch can run on here; checked before any work, since torch would fail only when first used."""
    if name == "auto":
        return
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"bad value {name!r} for 'device': expected auto, cpu, cuda, cuda:<index> or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"bad value {name!r} for 'device': CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"bad value {name!r} for 'device': this machine has {torch.cuda.device_count()} CUDA devices")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"bad value {name!r} for 'device': MPS is not available on this machine")


def _set_method_block(cfg: DictConfig, key: str, value: Any) -> None:
    """Set `methods` or a key inside it (`methods.lors.distill.lr_images`), merging into what the preset has."""
    blocks = OmegaConf.to_container(cfg.methods)
    if key == "methods":
        if not isinstance(value, dict):
            raise UserError(f"bad value {value!r} for 'methods': a mapping of method names to their settings")
        for name, settings in value.items():
            blocks[name] = {**_method_settings(blocks.get(name) or {}), **_method_settings(settings or {})}
    else:
        parts = key.split(".")
        if len(parts) < 3:
            raise UserError(f"bad key {key!r}: expected methods.<method>.<config key>=value")
        name, inner = parts[1], ".".join(parts[2:])
        settings = _method_settings(value) if isinstance(value, dict) else {"": value}
        blocks[name] = {
            **_method_settings(blocks.get(name) or {}),
            **{f"{inner}.{k}" if k else inner: v for k, v in settings.items()},
        }
    cfg.methods = blocks


def _method_settings(raw: dict) -> dict[str, Any]:
    """A preset's block for one method as {dotted key: value}; a `distill.phases` list stays whole."""
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            for inner, leaf in _method_settings(value).items():
                flat[f"{key}.{inner}"] = leaf
        else:
            flat[key] = value
    return flat


def apply_method(cfg: DictConfig, method: str) -> DictConfig:
    """Switch `cfg` (in place) to one of METHODS: the same engine, other switches, then the preset's settings
    for that method (`methods.<method>`)."""
    cfg.distill.method = method
    for key, value in METHODS[method].items():
        _set(cfg, f"distill.{key}", value)
    block = cfg.methods.get(method)
    for key, value in _method_settings(OmegaConf.to_container(block) if block is not None else {}).items():
        if key.startswith("methods") or key == "distill.method":
            raise UserError(f"bad key 'methods.{method}.{key}': a method's settings cannot change the method")
        try:
            if key == "distill.phases":
                _merge_preset(cfg, {"distill": {"phases": value}})
            else:
                _set(cfg, key, value)
        except UserError as err:
            raise UserError(f"{err} (in methods.{method})") from None
    return cfg


def with_method(cfg: DictConfig, method: str) -> DictConfig:
    """A copy of `cfg` switched to another method."""
    copy = OmegaConf.create(OmegaConf.to_container(cfg))
    copy = OmegaConf.merge(OmegaConf.structured(Config), copy)
    return apply_method(copy, method)


def _choice_error(key: str, value: Any) -> UserError:
    options = CHOICES[key]
    close = difflib.get_close_matches(str(value), options, n=2)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return UserError(f"bad value {value!r} for {key!r}{hint}; choose from {', '.join(options)}")


# Keys whose value must be >= a bound (None, where a key allows it, means "automatic" and is not checked).
AT_LEAST_ZERO = (
    "data.train_images",
    "data.val_images",
    "data.test_images",
    "model.dropout",
    "experts.lr_img",
    "experts.lr_txt",
    "experts.momentum",
    "experts.weight_decay",
    "distill.lr_images",
    "distill.lr_texts",
    "distill.lr_sim",
    "distill.lr_lr",
    "distill.momentum",
    "distill.snapshot_every",
    "distill.max_retries",
    "evaluate.momentum",
    "evaluate.weight_decay",
)
ABOVE_ZERO = (
    "data.image_size",
    "data.max_words",
    "data.captions_per_image",
    "data.zca_epsilon",
    "experts.count",
    "experts.epochs",
    "experts.batch_size",
    "distill.syn_steps",
    "distill.expert_epochs",
    "distill.mini_batch_size",
    "distill.trajectories_per_iter",
    "distill.checkpoint_every",
    "distill.sim_rank",
    "distill.sim_alpha",
    "distill.lr_init",
    "distill.blend.alpha",
    "evaluate.runs",
    "evaluate.epochs",
    "evaluate.eval_every",
    "evaluate.batch_size",
    "model.temperature",
)


def validate(cfg: DictConfig) -> None:
    """Cross-field checks the type system cannot express; each failure names its key."""
    for key, options in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in options:
            raise _choice_error(key, value)
    for key in _all_keys(OmegaConf.to_container(cfg)):
        value = OmegaConf.select(cfg, key)
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"bad value {value!r} for {key!r}: must be a finite number")
    epochs = cfg.distill.expert_epochs
    if epochs != AUTO and not _is_int(epochs):
        raise UserError(f"bad value {epochs!r} for 'distill.expert_epochs': an integer > 0, or auto")
    for keys, strict in ((AT_LEAST_ZERO, False), (ABOVE_ZERO, True)):
        for key in keys:
            value = OmegaConf.select(cfg, key)
            if value is not None and value != AUTO and (value <= 0 if strict else value < 0):
                raise UserError(
                    f"bad value {value!r} for {key!r}: must be {'>' if strict else '>='} 0"
                    f"{', or auto' if key.split('.')[-1] in (*AUTO_KEYS, 'expert_epochs') else ''}"
                )
    if not all(lr > 0 for lr in cfg.evaluate.coreset_lrs):
        raise UserError(f"bad value {list(cfg.evaluate.coreset_lrs)!r} for 'evaluate.coreset_lrs': each must be > 0")
    if not 0.0 <= cfg.distill.ema_decay < 1.0:
        raise UserError(f"bad value {cfg.distill.ema_decay!r} for 'distill.ema_decay': must be in [0, 1)")
    if not cfg.distill.phases:
        raise UserError("bad value for 'distill.phases': at least one phase is needed")
    for i, phase in enumerate(cfg.distill.phases):
        key = f"distill.phases.{i}"
        if phase.pairs < 2:
            raise UserError(f"bad value {phase.pairs!r} for '{key}.pairs': need at least 2 pairs")
        if phase.iterations < 0:
            raise UserError(f"bad value {phase.iterations!r} for '{key}.iterations': must be >= 0")
        lo_hi = list(phase.start_epochs)
        if len(lo_hi) != 2 or not 0 <= lo_hi[0] < lo_hi[1]:
            raise UserError(f"bad value {lo_hi!r} for '{key}.start_epochs': expected [min, max) with 0 <= min < max")
        end = phase.shortcut_end if phase.shortcut_end is not None else cfg.experts.epochs
        if not 0 < end <= cfg.experts.epochs:
            raise UserError(
                f"bad value {phase.shortcut_end!r} for '{key}.shortcut_end': must be in 1..experts.epochs"
                f" ({cfg.experts.epochs})"
            )
        if lo_hi[1] - 1 + _least_expert_epochs(cfg) > end:
            raise UserError(
                f"bad value {lo_hi!r} for '{key}.start_epochs': start + distill.expert_epochs must stay"
                f" within snapshot {end}"
            )
    for name in cfg.methods:
        if name not in METHODS:
            raise _key_error(cfg, f"methods.{name}", "unknown method in")
    for name in cfg.data.split_map:
        if name not in ("train", "validation", "test"):
            raise UserError(
                f"unknown config key 'data.split_map.{name}': map train, validation or test to the"
                " dataset's split names"
            )
    for key in ("data.val_fraction", "data.test_fraction"):
        if not 0.0 < OmegaConf.select(cfg, key) < 1.0:
            raise UserError(f"bad value {OmegaConf.select(cfg, key)!r} for {key!r}: must be in (0, 1)")
    if cfg.data.source == "hf" and not cfg.data.name:
        raise UserError("data source 'hf' needs data.name (a `datasets` hub id or a local dataset folder)")
    if cfg.distill.space == "feature" and cfg.model.image_trainable:
        raise UserError("bad value 'feature' for 'distill.space': feature space needs model.image_trainable=false")
    if cfg.distill.augment != "none" and not (cfg.distill.space == "pixel" and cfg.model.image_trainable):
        raise UserError(
            f"bad value {cfg.distill.augment!r} for 'distill.augment': augmentation needs pixels into a trained"
            " image encoder (distill.space=pixel, model.image_trainable=true); set distill.augment=none"
        )
    if cfg.data.whiten == "zca":
        model = cfg.model
        if not model.image_trainable or not (model.image_encoder == "convnet" or not model.pretrained):
            raise UserError(
                "bad value 'zca' for 'data.whiten': whitening needs an image encoder trained from random weights"
                " (model.image_trainable=true, and convnet or model.pretrained=false); a pretrained encoder was"
                " trained on unwhitened pixels"
            )
        if cfg.data.image_size > ZCA_MAX_IMAGE_SIZE:
            raise UserError(
                f"bad value 'zca' for 'data.whiten': whitening needs data.image_size <= {ZCA_MAX_IMAGE_SIZE}"
                f" (it is {cfg.data.image_size})"
            )
    if cfg.evaluate.augment != "none" and not cfg.model.image_trainable:
        raise UserError(
            f"bad value {cfg.evaluate.augment!r} for 'evaluate.augment': augmentation needs pixels into a trained"
            " image encoder (model.image_trainable=true); set evaluate.augment=none"
        )
    if cfg.distill.mini_batch_size > min(p.pairs for p in cfg.distill.phases):
        raise UserError(
            f"bad value {cfg.distill.mini_batch_size!r} for 'distill.mini_batch_size': larger than a phase's pairs"
        )


def _least_expert_epochs(cfg) -> int:
    """distill.expert_epochs, or 1 (the least `auto` can choose) before the data is known."""
    return 1 if cfg.distill.expert_epochs == AUTO else cfg.distill.expert_epochs


def to_dict(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def from_dict(raw: dict) -> DictConfig:
    """Rebuild a validated config saved with `to_dict` (e.g. from meta.json); a run saved under an old name of a
    value reads as the new name."""
    cfg = OmegaConf.merge(OmegaConf.structured(Config), raw)
    _rename_deprecated(cfg, warn=False)
    validate(cfg)
    return cfg


def flat_keys(raw, prefix: str = "") -> dict[str, Any]:
    """A nested mapping (lists included) as {dotted key: leaf value}, e.g. {'distill.phases.0.pairs': 100}."""
    if isinstance(raw, dict):
        items = raw.items()
    elif isinstance(raw, (list, tuple)) and any(isinstance(v, (dict, list, tuple)) for v in raw):
        items = enumerate(raw)
    else:
        return {prefix.rstrip("."): raw}
    flat = {}
    for key, value in items:
        flat.update(flat_keys(value, f"{prefix}{key}."))
    return flat


def changed_keys(old: dict[str, Any], new: dict[str, Any], limit: int = 8) -> str:
    """'key: old -> new, ...' for the dotted keys whose values differ (at most `limit`, then how many more)."""
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k, "<unset>") != new.get(k, "<unset>"))
    shown = [f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}" for k in keys[:limit]]
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(shown) + more
