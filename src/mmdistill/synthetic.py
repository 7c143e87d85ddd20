"""The distilled-set format: the only module that reads or writes distilled sets, in every layout.

Layouts (all read by `load_distilled`):
- native: what `distill` writes, OUT/phase-<p>.safetensors (tensors + one JSON metadata entry "mmdistill"),
  OUT/phase-<p>-captions.json, OUT/meta.json (provenance); a run folder holds it in RUN/distilled.
- imagefolder export (`export(..., "folder", ...)`): the Hugging Face imagefolder layout plus the exact tensors.
- hf export (`export(..., "hf", ...)`): a `datasets.Dataset` saved with save_to_disk, plus the same sidecar files.
- reference (`--format ptm-st|lors`): the .pt files the PTM-ST and LoRS code bases save, read as plain tensors.

Every native and exported file carries `format_version` (major.minor). A reader accepts any minor version of its
major and refuses a newer major: fields may be added within a major, never renamed or reinterpreted. Files
written before the format was versioned have the 1.0 layout and are read as 1.0.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from mmdistill.config import from_dict
from mmdistill.data import build_splits, load_image, whitening
from mmdistill.data.transforms import build_transform, pictures
from mmdistill.data.whitening import Whitening, load_whitening
from mmdistill.encoders import build_image_encoder
from mmdistill.errors import UserError
from mmdistill.io import atomic_path, folder_lock, load_torch, save_tensors, write_json, write_text
from mmdistill.similarity import full_matrix

FORMAT_VERSION = "1.1"  # 1.1: phases may carry the live lrs beside the EMA lrs (LIVE_LRS)
PHASE_FILE = re.compile(r"phase-(\d+)\.safetensors")
REFERENCE_FILE = re.compile(r"distilled_(?:(\d+)_)?(\d+)\.pt")  # PTM-ST: distilled_<phase>_<it>, LoRS: distilled_<it>
SIM_KINDS = {"identity": (), "full": ("sim_full",), "lowrank": ("sim_diag", "sim_left", "sim_right")}
# The reference code bases normalise pixels with CLIP's statistics.
CLIP_NORMALIZATION = {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}
REFERENCE_FORMATS = ("ptm-st", "lors")
# The student lrs a phase's distillation ended with (the live ones) beside its EMA lrs (`lr_img`, `lr_txt`, what
# the default protocol trains with): the reference's evaluation trains with the live ones.
LIVE_LRS = {"lr_img": "lr_img_live", "lr_txt": "lr_txt_live"}
EXPORT_RECORD = "mmdistill.json"  # the exported set's format record: provenance and per-phase metadata


def check_version(version, where) -> None:
    """Refuse a file of a newer major version than this reader's, naming it and both versions."""
    if version is None:
        return
    try:
        major = int(str(version).split(".")[0])
    except ValueError:
        raise UserError(f"{where}: format_version {version!r} is not of the form MAJOR.MINOR") from None
    if major > int(FORMAT_VERSION.split(".")[0]):
        raise UserError(
            f"{where} is distilled-set format {version}, newer than the {FORMAT_VERSION} this mmdistill"
            " reads; upgrade mmdistill"
        )


# ------------------------------------------------------------------------------------------------- native


def write_phase(path: Path, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
    """One phase file: the tensors plus the metadata as one JSON entry (safetensors keeps metadata in a hash map
    whose order changes from process to process, so one sorted entry keeps the file bytes reproducible)."""
    record = {**metadata, "format_version": FORMAT_VERSION}
    save_tensors(
        {k: v.detach().cpu() for k, v in tensors.items()}, path, {"mmdistill": json.dumps(record, sort_keys=True)}
    )


def phase_metadata(path: Path) -> dict:
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = json.loads((f.metadata() or {})["mmdistill"])
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read synthetic phase {path}: {type(err).__name__}: {err}") from None
    check_version(metadata.get("format_version"), f"synthetic phase {path}")
    return metadata


def load_phase(path: Path) -> dict:
    """A phase file: its tensors plus its metadata (similarity, sim_alpha, space, pairs, iterations, ...).

    Checked before use, since a student trained on a damaged set still yields a normal-looking table: every
    tensor present, finite and of the shape its metadata implies."""
    metadata = phase_metadata(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            phase = {**{k: f.get_tensor(k) for k in f.keys()}, **metadata}
    except (SafetensorError, OSError) as err:
        raise UserError(f"cannot read synthetic phase {path}: {type(err).__name__}: {err}") from None
    check_phase(path, phase)
    return phase


def check_phase(where, phase: dict) -> None:
    """Every tensor a phase needs, finite and of the shape its metadata implies."""
    for name in ("images", "texts", "lr_img", "lr_txt"):
        if name not in phase:
            raise UserError(f"synthetic phase {where} has no tensor {name!r}")
    for name, value in phase.items():
        if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all():
            raise UserError(f"synthetic phase {where} holds NaN or Inf values in {name!r}; distil it again")
    pairs = phase.get("pairs", len(phase["texts"]))
    images, texts = phase["images"], phase["texts"]
    rank = phase["sim_left"].shape[-1] if "sim_left" in phase else 0
    expected = {
        "texts": (pairs, texts.shape[-1]),
        "lr_img": (1,),
        "lr_txt": (1,),
        **{live: (1,) for live in LIVE_LRS.values() if live in phase},
        **{
            "identity": {},
            "full": {"sim_full": (pairs, pairs)},
            "lowrank": {"sim_diag": (pairs,), "sim_left": (pairs, rank), "sim_right": (pairs, rank)},
        }[phase.get("similarity", "identity")],
    }
    if images.dim() == 4:
        size = phase.get("image_size", images.shape[-1])
        expected["images"] = (pairs, 3, size, size)
    else:
        expected["images"] = (pairs, images.shape[-1])
    for name, shape in expected.items():
        if name not in phase or tuple(phase[name].shape) != shape:
            found = tuple(phase[name].shape) if name in phase else "missing"
            raise UserError(f"synthetic phase {where}: {name!r} has shape {found}, expected {shape}")


def write_captions(records: list[dict], path: Path) -> None:
    write_json(records, path)


def read_captions(path: Path) -> list[dict] | None:
    """The nearest real caption (and, for feature-space phases, image) of each synthetic pair; None if absent."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"corrupt JSON in {path} (line {err.lineno}): {err.msg}") from None


def write_meta(record: dict, out: Path) -> None:
    """meta.json, written last by `distill`: it marks the distillation as finished."""
    write_json({**record, "format_version": FORMAT_VERSION}, Path(out) / "meta.json")


def read_meta(out: Path) -> dict:
    path = Path(out) / "meta.json"
    if not path.is_file():
        raise UserError(f"no finished distillation in {out} ({path.name} not found)")
    try:
        meta = json.loads(path.read_text())
        meta["planned_phases"], meta["phases"], meta["fingerprint"]  # noqa: B018 - the keys a finished run has
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{path} is not the record of a finished distillation of this version; distil again") from None
    check_version(meta.get("format_version"), path)
    return meta


def load_synthetic(out_dir: Path) -> list[dict]:
    """The distilled phases of a finished distillation, in order, each as load_phase gives it.

    Checked against meta.json, which `distill` writes last: the phase count, and each phase's config
    fingerprint and pairs, so that phase files of an unfinished run or of another config are never mixed in."""
    out = Path(out_dir)
    meta = read_meta(out)
    meta_path = out / "meta.json"
    planned, done, expected = meta["planned_phases"], meta["phases"], meta["fingerprint"]
    if len(done) != planned:
        raise UserError(
            f"the distillation in {out} is unfinished ({len(done)} of {planned} phases); finish it"
            " with distill --resume"
        )
    for path in sorted(out.glob("phase-*.safetensors")):
        match = PHASE_FILE.fullmatch(path.name)
        if match and int(match.group(1)) >= planned:
            raise UserError(f"{path} is not one of the {planned} phases of {meta_path}; delete it")
    phases = []
    for p in range(planned):
        path = out / f"phase-{p}.safetensors"
        if not path.is_file():
            raise UserError(f"synthetic phase {path} not found ({meta_path} lists {planned} phases)")
        phase = load_phase(path)
        if phase.get("fingerprint") != expected:
            raise UserError(f"synthetic phase {path} was distilled with another config than {meta_path}; distil again")
        if phase.get("pairs") != done[p]["pairs"]:
            raise UserError(
                f"synthetic phase {path} holds {phase.get('pairs')} pairs, but {meta_path} lists {done[p]['pairs']}"
            )
        phases.append(phase)
    return phases


# ------------------------------------------------------------------------------------------ the public object


class _Rows(torch.utils.data.Dataset):
    """(image, text_embedding, index) rows; `index` is the row's position in this dataset."""

    def __init__(self, images: torch.Tensor, texts: torch.Tensor):
        self.images, self.texts = images, texts

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int):
        return self.images[i], self.texts[i], i


@dataclass
class DistilledSet:
    """A distilled set, whatever layout it was read from.

    phases: one dict per phase, in training order: tensors `images` ([N,3,s,s] normalised pixels or [N,d] image
      features), `texts` ([N,d] text embeddings), `lr_img`, `lr_txt` ([1]), the similarity parameters (`sim_full`,
      or `sim_diag`/`sim_left`/`sim_right`), and the phase metadata (similarity, sim_alpha, space, pairs, ...).
    meta: provenance (method, preset, config, seed, encoders, normalization, version, git_commit, ...).
    captions: per phase, the nearest real caption of each synthetic text (None where unknown).
    results: the run's evaluation of this set (results.json entry: r_mean, r_mean_std, runs, protocol) if known.
    whitening: the ZCA transform of a set distilled on whitened pixels (data.whiten=zca), else None.
    """

    phases: list[dict]
    meta: dict
    source: str
    layout: str  # native | imagefolder | hf | ptm-st | lors
    captions: list = field(default_factory=list)
    results: dict | None = None
    whitening: Whitening | None = None

    def dataset(self, phase: int | None = None) -> torch.utils.data.Dataset:
        """The pairs of one phase, or of every phase concatenated in training order (phase=None)."""
        chosen = self.phases if phase is None else [self._phase(phase)]
        return _Rows(torch.cat([p["images"] for p in chosen]), torch.cat([p["texts"] for p in chosen]))

    def similarity(self, phase: int) -> torch.Tensor:
        """The dense soft similarity matrix S [N,N] of a phase (the identity when the method learns none)."""
        p = self._phase(phase)
        return full_matrix(p.get("similarity", "identity"), p, len(p["texts"]), float(p.get("sim_alpha", 1.0)))

    @property
    def lrs(self) -> list[dict]:
        """The learned student lrs of each phase: [{"lr_img": ..., "lr_txt": ...}, ...] (the EMA ones), with the
        live ones (`lr_img_live`, `lr_txt_live`) where the set has them."""
        return [{k: float(p[k]) for k in ("lr_img", "lr_txt", *LIVE_LRS.values()) if k in p} for p in self.phases]

    @property
    def space(self) -> str:
        return "feature" if self.phases[0]["images"].dim() == 2 else "pixel"

    @property
    def normalization(self) -> dict | None:
        """{"mean", "std"} of the pixel normalisation to undo (x * std + mean gives [0, 1]); None for features."""
        if self.space == "feature":
            return None
        return self.meta.get("normalization") or _config_normalization(self.meta)

    @property
    def encoders(self) -> dict:
        """{"image": name, "text": name} of the encoders the set was distilled for (None where unknown)."""
        found = self.meta.get("encoders") or {}
        model = self.meta.get("config", {}).get("model", {})
        return {
            "image": found.get("image", model.get("image_encoder")),
            "text": found.get("text", model.get("text_encoder")),
        }

    @property
    def method(self) -> str:
        return self.meta.get("method") or self.layout

    def _phase(self, phase: int) -> dict:
        if not 0 <= phase < len(self.phases):
            raise UserError(f"{self.source} has phases 0..{len(self.phases) - 1}, not {phase}")
        return self.phases[phase]


def _config_normalization(meta: dict) -> dict | None:
    """The normalisation of a set written before meta.json recorded it: that of the image encoder in its config."""
    model = meta.get("config", {}).get("model")
    if not model:
        return None

    encoder = build_image_encoder(
        model["image_encoder"],
        image_size=meta["config"]["data"]["image_size"],
        pretrained=False,
        **model.get("convnet", {}),
    )
    return {"mean": list(encoder.mean), "std": list(encoder.std)}


def load_distilled(path, format: str = "mmdistill") -> DistilledSet:  # noqa: A002 - the CLI's --format
    """Read a distilled set: a run folder (RUN/distilled inside), a distillation folder, an export made by
    `mmdistill export` (folder or hf), or with format "ptm-st" / "lors" a reference .pt file (or a folder of
    PTM-ST's distilled_<phase>_<iteration>.pt: the last iteration of each phase)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"distilled set not found: {path}")
    if format in REFERENCE_FORMATS:
        return _load_reference(path, format)
    if format != "mmdistill":
        raise UserError(
            f"unknown distilled-set format {format!r}; choose from mmdistill, {', '.join(REFERENCE_FORMATS)}"
        )
    if path.is_dir() and (path / EXPORT_RECORD).is_file():
        return _load_export(path)
    if not path.is_dir():
        hint = "; a .pt from another code base needs --format ptm-st or lors" if path.suffix == ".pt" else ""
        raise UserError(f"{path} is a file, not a distilled set's folder{hint}")
    run_folder = (path / "distilled" / "meta.json").is_file() and not (path / "meta.json").exists()
    folder = path / "distilled" if run_folder else path
    phases = load_synthetic(folder)
    meta = read_meta(folder)
    captions = [read_captions(folder / f"phase-{p}-captions.json") for p in range(len(phases))]
    results = _run_results(folder, meta.get("method"))
    return DistilledSet(phases, meta, str(path), "native", captions, results, _whitening(folder, meta))


def _whitening(folder: Path, meta: dict) -> Whitening | None:
    """The whitening the set's normalisation names, read from its folder."""
    if not (meta.get("normalization") or {}).get("whitening"):
        return None
    found = load_whitening(folder / whitening.FILE)
    if found is None:
        raise UserError(f"{folder} was distilled on whitened pixels but lacks {whitening.FILE}")
    return found


def _run_results(folder: Path, method: str | None) -> dict | None:
    """The results.json entry of this set in its run folder (RUN/distilled -> RUN/results.json), if evaluated."""
    if folder.name != "distilled" or not (folder.parent / "results.json").is_file():
        return None
    try:
        methods = json.loads((folder.parent / "results.json").read_text())["methods"]
        entry = methods[method]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None
    keys = ("r_mean", "r_mean_std", "runs", "protocol")
    # the run's other rows (baselines such as random pairs and full data) give the figure its scale
    return {
        **{k: entry[k] for k in keys if k in entry},
        "table": {name: {k: row[k] for k in keys if k in row} for name, row in methods.items()},
    }


# ------------------------------------------------------------------------------------- other code bases' sets


def _load_reference(path: Path, fmt: str) -> DistilledSet:
    """PTM-ST / LoRS saves: a dict of plain tensors (image, text, similarity_params, similarity_mat, syn_lr_img,
    syn_lr_txt), read with weights_only=True so a file holding other objects is refused before any code runs."""
    if path.is_dir():
        last: dict[int, tuple[int, Path]] = {}
        for file in path.glob("distilled_*.pt"):
            match = REFERENCE_FILE.fullmatch(file.name)
            if match:
                phase, iteration = int(match.group(1) or 0), int(match.group(2))
                if phase not in last or iteration > last[phase][0]:
                    last[phase] = (iteration, file)
        if sorted(last) != list(range(len(last))) or not last:
            raise UserError(f"{path} holds no distilled_<phase>_<iteration>.pt files of phases 0, 1, ...")
        files = [last[p][1] for p in range(len(last))]
    else:
        files = [path]
    phases = [_reference_phase(file, fmt) for file in files]
    meta = {"method": f"{fmt}-reference", "source_format": fmt, "files": [str(f) for f in files]}
    if phases[0]["images"].dim() == 4:
        meta["normalization"] = CLIP_NORMALIZATION
    return DistilledSet(phases, meta, str(path), fmt, [None] * len(phases))


def _reference_phase(file: Path, fmt: str) -> dict:
    saved = load_torch(file, f"{fmt} distilled set")
    if not isinstance(saved, dict):
        raise UserError(f"{file} holds a {type(saved).__name__}, not the dict of tensors {fmt} saves")
    images, texts = (
        next((saved[k] for k in keys if k in saved), None) for keys in (("image", "image_syn"), ("text", "text_syn"))
    )
    lrs = [saved.get(k) for k in ("syn_lr_img", "syn_lr_txt")]
    missing = [
        name
        for name, v in zip(("image", "text", "syn_lr_img", "syn_lr_txt"), (images, texts, *lrs))
        if not (torch.is_tensor(v) or isinstance(v, (int, float)))
    ]
    if missing:
        raise UserError(
            f"{file} has no tensor {', '.join(repr(m) for m in missing)} (the {fmt} layout: image, text,"
            " similarity_mat, syn_lr_img, syn_lr_txt)"
        )
    phase = {
        "images": images.detach().float(),
        "texts": texts.detach().float(),
        "lr_img": torch.as_tensor(lrs[0], dtype=torch.float32).reshape(1),
        "lr_txt": torch.as_tensor(lrs[1], dtype=torch.float32).reshape(1),
        "similarity": "identity",
        "sim_alpha": 1.0,
        "pairs": len(texts),
        "space": "pixel" if images.dim() == 4 else "feature",
    }
    matrix = saved.get("similarity_mat")
    if torch.is_tensor(matrix):  # the dense S the reference trains its students with
        phase.update(similarity="full", sim_full=matrix.detach().float())
    elif saved.get("similarity_params"):
        raise UserError(f"{file} holds similarity_params but no similarity_mat: save the dense matrix too")
    if images.dim() not in (2, 4) or len(images) != len(texts):
        raise UserError(
            f"{file}: image {tuple(images.shape)} and text {tuple(texts.shape)} do not form pairs"
            " ([N,3,H,W] or [N,D] images, [N,D] texts)"
        )
    check_phase(file, phase)
    return phase


def phases_for(distilled: DistilledSet, cfg, bundle) -> list[dict]:
    """The set's phases as the config's student trains on them: checked against its encoders and shapes (an error
    names the expected and found shapes), pixels renormalised where the set was normalised otherwise."""
    where, model = distilled.source, cfg.model
    text = distilled.encoders["text"]
    if text and text != model.text_encoder:
        raise UserError(
            f"{where} holds text embeddings of {text!r}, but preset {cfg.name} uses"
            f" {model.text_encoder!r}; evaluate it with a preset of that text encoder"
        )
    phases = []
    for p, phase in enumerate(distilled.phases):
        images, n = phase["images"], len(phase["texts"])
        if phase["texts"].shape[1] != bundle.text_dim:
            raise UserError(
                f"{where} phase {p}: text embeddings of shape {tuple(phase['texts'].shape)}, expected"
                f" ({n}, {bundle.text_dim}) for text encoder {model.text_encoder!r} of preset {cfg.name}"
            )
        if images.dim() == 2:
            image = distilled.encoders["image"]
            if image and image != model.image_encoder:
                raise UserError(
                    f"{where} holds image features of {image!r}, but preset {cfg.name} uses {model.image_encoder!r}"
                )
            expected = (n, bundle.features["train"].shape[1]) if "train" in bundle.features else None
            if expected and tuple(images.shape) != expected:
                raise UserError(
                    f"{where} phase {p}: image features of shape {tuple(images.shape)}, expected"
                    f" {expected} for image encoder {model.image_encoder!r} of preset {cfg.name}"
                )
        else:
            size = cfg.data.image_size
            if tuple(images.shape[1:]) != (3, size, size):
                raise UserError(
                    f"{where} phase {p}: images of shape {tuple(images.shape)}, expected"
                    f" ({n}, 3, {size}, {size}) for preset {cfg.name} (data.image_size={size})"
                )
            ours, theirs = distilled.whitening, bundle.whitening
            if (ours is None) != (theirs is None) or (ours is not None and not ours.matches(theirs)):
                wanted = "unwhitened pixels" if theirs is None else "ZCA-whitened pixels"
                if ours is not None and theirs is not None:
                    wanted = "pixels whitened by another transform"
                raise UserError(
                    f"{where} holds {'ZCA-whitened' if ours is not None else 'unwhitened'} pixels, but preset"
                    f" {cfg.name} trains on {wanted} (data.whiten); evaluate it with the data it was distilled on"
                )
            norm = distilled.normalization
            if norm and (tuple(map(float, norm["mean"])), tuple(map(float, norm["std"]))) != (
                tuple(map(float, bundle.mean)),
                tuple(map(float, bundle.std)),
            ):
                mean, std = (torch.tensor(norm[k]).view(3, 1, 1) for k in ("mean", "std"))
                target_mean, target_std = (torch.tensor(v).view(3, 1, 1) for v in (bundle.mean, bundle.std))
                images = (images * std + mean - target_mean) / target_std
        phases.append({**phase, "images": images})
    return phases


# ------------------------------------------------------------------------------------------------- exports

EXPORT_TENSORS = {"pixel": "images.safetensors", "feature": "image_features.safetensors"}


def export(distilled: DistilledSet, to: str, out, push: str | None = None) -> Path:
    """Write `distilled` to OUT as an imagefolder (to="folder") or a saved `datasets.Dataset` (to="hf"), with the
    exact tensors and a dataset card; then, with `push`, upload it to the Hugging Face Hub as dataset `push`.

    Everything local is written before the upload, so a failed upload (no network) loses nothing."""
    if to not in ("folder", "hf"):
        raise UserError(f"unknown export target {to!r}; choose folder or hf")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; export needs a folder")
    if to == "hf":
        _datasets()  # fail before writing anything when the extra is missing
    with folder_lock(out):
        if any(p.name != ".mmdistill.lock" for p in out.iterdir()):
            raise UserError(f"{out} is not empty; export into a new folder")
        rows = _export_rows(distilled)
        _write_sidecars(distilled, out, "imagefolder" if to == "folder" else "hf")
        if to == "folder":
            _write_imagefolder(rows, out)
        else:
            _hf_dataset(distilled, rows).save_to_disk(str(out))
        write_text(dataset_card(distilled, len(rows)), out / "README.md")
    if push:
        _push(distilled, rows, out, push, to)
    return out


def _datasets():
    try:
        import datasets
    except ImportError:
        raise UserError("export --to hf and --push need the `datasets` package: pip install 'mmdistill[hf]'") from None
    datasets.disable_progress_bars()  # its bars would run into the one-line messages on stderr
    return datasets


def _export_rows(distilled: DistilledSet) -> list[dict]:
    """One record per synthetic pair: phase, index, nearest caption, and the picture shown for it (uint8 [3,H,W]):
    the de-normalised synthetic pixels, or for an image feature its nearest real training image."""
    rows = []
    real = _nearest_real_images(distilled) if distilled.space == "feature" else None
    norm = distilled.normalization
    for p, phase in enumerate(distilled.phases):
        captions = (distilled.captions[p] if p < len(distilled.captions) else None) or [{}] * len(phase["texts"])
        if real is None:
            unit = pictures(phase["images"], norm["mean"], norm["std"], distilled.whitening)
            shown = (unit * 255).round().to(torch.uint8)
        else:
            shown = real[p]
        for i, record in enumerate(captions):
            rows.append(
                {
                    "file_name": f"images/phase-{p}/{i:05d}.png",
                    "phase": p,
                    "index": i,
                    "text": record.get("caption", ""),
                    "caption_id": record.get("caption_id"),
                    "caption_similarity": record.get("similarity"),
                    "image_kind": "synthetic" if real is None else "nearest real training image",
                    **(
                        {"image_id": record["image_id"], "image_similarity": record["image_similarity"]}
                        if real is not None
                        else {}
                    ),
                    "picture": shown[i],
                }
            )
    return rows


def _nearest_real_images(distilled: DistilledSet) -> list[torch.Tensor]:
    """Per phase, the nearest real training image of each synthetic feature (ids recorded at distillation)."""

    ids = []
    for p, captions in enumerate(distilled.captions):
        if not captions or "image_id" not in captions[0]:
            raise UserError(
                f"{distilled.source} phase {p} records no nearest real image of its features (it was"
                " distilled before they were recorded); distil it again to export it"
            )
        ids.append([record["image_id"] for record in captions])
    cfg = from_dict(distilled.meta["config"])
    train = build_splits(cfg.data)["train"]
    size = cfg.data.image_size
    to_unit = build_transform(size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "none")
    return [
        torch.stack([(to_unit(load_image(train, i)) * 255).round().clamp(0, 255).to(torch.uint8) for i in phase])
        for phase in ids
    ]


def _write_sidecars(distilled: DistilledSet, out: Path, layout: str) -> None:
    """The exact tensors (what `load_distilled` reads back), lrs.json and the format record."""
    space = distilled.space
    save_tensors({f"phase-{p}": ph["images"] for p, ph in enumerate(distilled.phases)}, out / EXPORT_TENSORS[space])
    if distilled.whitening is not None:
        distilled.whitening.save(out / whitening.FILE)
    save_tensors(
        {f"phase-{p}": ph["texts"] for p, ph in enumerate(distilled.phases)}, out / "text_embeddings.safetensors"
    )
    similarity = {}
    for p, phase in enumerate(distilled.phases):
        similarity[f"phase-{p}"] = distilled.similarity(p)
        for name in SIM_KINDS[phase.get("similarity", "identity")]:  # the parameters: S[B,B] from them is exact
            similarity[f"phase-{p}.{name}"] = phase[name]
    save_tensors(similarity, out / "similarity.safetensors")
    write_json([{"phase": p, **lrs} for p, lrs in enumerate(distilled.lrs)], out / "lrs.json")
    metadata = [{k: v for k, v in phase.items() if not torch.is_tensor(v)} for phase in distilled.phases]
    write_json(
        {
            "format_version": FORMAT_VERSION,
            "layout": layout,
            "space": space,
            "method": distilled.method,
            "encoders": distilled.encoders,
            "normalization": distilled.normalization,
            "phases": metadata,
            "captions": distilled.captions,
            "results": distilled.results,
            "meta": distilled.meta,
        },
        out / EXPORT_RECORD,
    )


def _write_imagefolder(rows: list[dict], out: Path) -> None:
    from PIL import Image

    for row in rows:
        path = out / row["file_name"]
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            Image.fromarray(row["picture"].permute(1, 2, 0).numpy()).save(tmp, format="PNG")
    write_text(
        "".join(json.dumps({k: v for k, v in row.items() if k != "picture"}) + "\n" for row in rows),
        out / "metadata.jsonl",
    )


def _hf_dataset(distilled: DistilledSet, rows: list[dict]):
    """A datasets.Dataset, one row per pair: the picture (PNG), the exact image tensor or feature, the text
    embedding, the row of S within its phase, the phase's learned lrs, the nearest caption and ids."""
    import io as bytes_io

    from PIL import Image

    datasets = _datasets()
    columns: dict[str, list] = {
        k: []
        for k in (
            "phase",
            "index",
            "image",
            "text",
            "caption_id",
            "text_embedding",
            "similarity_row",
            "lr_img",
            "lr_txt",
        )
    }
    data_column = "pixels" if distilled.space == "pixel" else "image_features"
    columns[data_column] = []
    for row in rows:
        p, i = row["phase"], row["index"]
        phase = distilled.phases[p]
        buffer = bytes_io.BytesIO()
        Image.fromarray(row["picture"].permute(1, 2, 0).numpy()).save(buffer, format="PNG")
        columns["phase"].append(p)
        columns["index"].append(i)
        columns["image"].append({"bytes": buffer.getvalue(), "path": None})
        columns["text"].append(row["text"])
        columns["caption_id"].append(row["caption_id"])
        columns["text_embedding"].append(phase["texts"][i].numpy())
        columns["similarity_row"].append(distilled.similarity(p)[i].numpy())
        columns["lr_img"].append(float(phase["lr_img"]))
        columns["lr_txt"].append(float(phase["lr_txt"]))
        columns[data_column].append(phase["images"][i].numpy())
    shape = tuple(distilled.phases[0]["images"].shape[1:])
    features = datasets.Features(
        {
            "phase": datasets.Value("int32"),
            "index": datasets.Value("int32"),
            "image": datasets.Image(),
            "text": datasets.Value("string"),
            "caption_id": datasets.Value("int64"),
            "text_embedding": datasets.Sequence(datasets.Value("float32")),
            "similarity_row": datasets.Sequence(datasets.Value("float32")),
            "lr_img": datasets.Value("float32"),
            "lr_txt": datasets.Value("float32"),
            data_column: datasets.Array3D(shape, "float32")
            if len(shape) == 3
            else datasets.Sequence(datasets.Value("float32")),
        }
    )
    return datasets.Dataset.from_dict(columns, features=features)


def _push(distilled: DistilledSet, rows: list[dict], out: Path, repo_id: str, to: str) -> None:
    """Upload the export to the Hub: the dataset's rows, then the card and the exact tensors beside them."""
    datasets = _datasets()
    try:
        from huggingface_hub import HfApi

        if to == "hf":
            dataset = datasets.load_from_disk(str(out))
        else:
            dataset = _hf_dataset(distilled, rows)
        dataset.push_to_hub(repo_id)
        HfApi().upload_folder(
            repo_id=repo_id,
            repo_type="dataset",
            folder_path=str(out),
            allow_patterns=["README.md", "*.safetensors", "*.json"],
        )
    except Exception as err:  # the hub client raises many kinds (offline, HTTP, auth); all mean "not uploaded"
        cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"--push {repo_id} failed ({cause}); the export in {out} is complete") from None


def _load_export(path: Path) -> DistilledSet:
    """An export written by `export`: the exact tensors from the sidecar files, the metadata from its record."""
    record_path = path / EXPORT_RECORD
    try:
        record = json.loads(record_path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"corrupt JSON in {record_path} (line {err.lineno}): {err.msg}") from None
    check_version(record.get("format_version"), record_path)
    tensors = {}
    for name in (EXPORT_TENSORS[record["space"]], "text_embeddings.safetensors", "similarity.safetensors"):
        try:
            with safe_open(str(path / name), framework="pt") as f:
                tensors[name] = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError) as err:
            raise UserError(f"cannot read {path / name}: {type(err).__name__}: {err}") from None
    lrs_path = path / "lrs.json"
    try:
        lrs = json.loads(lrs_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {lrs_path}: {err}") from None
    phases = []
    for p, metadata in enumerate(record["phases"]):
        key = f"phase-{p}"
        phase = {
            **metadata,
            "images": tensors[EXPORT_TENSORS[record["space"]]].get(key),
            "texts": tensors["text_embeddings.safetensors"].get(key),
            "lr_img": torch.tensor([lrs[p]["lr_img"]], dtype=torch.float32),
            "lr_txt": torch.tensor([lrs[p]["lr_txt"]], dtype=torch.float32),
            **{k: torch.tensor([lrs[p][k]], dtype=torch.float32) for k in LIVE_LRS.values() if k in lrs[p]},
        }
        for name in SIM_KINDS[metadata.get("similarity", "identity")]:
            phase[name] = tensors["similarity.safetensors"].get(f"{key}.{name}")
        phase = {k: v for k, v in phase.items() if v is not None}
        check_phase(f"{key} of {path}", phase)
        phases.append(phase)
    return DistilledSet(
        phases,
        record["meta"],
        str(path),
        record["layout"],
        record.get("captions", []),
        record.get("results"),
        _whitening(path, record),
    )


# ------------------------------------------------------------------------------------ dataset card, summary


def _size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < limit:
            return name
    return "1M<n<10M"


def dataset_card(distilled: DistilledSet, rows: int) -> str:
    """README.md of an export: YAML front matter the Hub reads, then what the set is and how it was measured."""
    import yaml

    meta, cfg = distilled.meta, distilled.meta.get("config", {})
    source = cfg.get("data", {}).get("source", "unknown")
    pairs = [len(p["texts"]) for p in distilled.phases]
    header = {
        "pretty_name": f"{distilled.method} distilled {source} ({sum(pairs)} pairs)",
        "task_categories": ["image-to-text", "text-to-image"],
        "size_categories": [_size_category(rows)],
        "source_datasets": [source],
        "tags": ["dataset-distillation", "mmdistill", distilled.method, "image-text-retrieval"],
    }
    encoders = distilled.encoders
    lines = [
        "---",
        yaml.safe_dump(header, sort_keys=False).strip(),
        "---",
        "",
        f"# {header['pretty_name']}",
        "",
        f"A distilled image-text set made by mmdistill {meta.get('version', '')} (method `{distilled.method}`,"
        f" preset `{meta.get('preset', 'unknown')}`, seed {meta.get('seed')},"
        f" commit {meta.get('git_commit') or 'unknown'}):"
        f" {len(pairs)} phase(s) of {' + '.join(map(str, pairs))} synthetic pairs, trained on in that order.",
        "",
    ]
    if distilled.space == "pixel":
        norm = distilled.normalization
        lines += [
            f"Images are synthetic pixels for image encoder `{encoders['image']}`. The PNG files are the exact"
            f" tensors de-normalised (x * std + mean, mean {norm['mean']}, std {norm['std']}) and rounded to"
            " 8 bits; `images.safetensors` holds the exact normalised tensors (one key per phase)."
        ]
        if distilled.whitening is not None:
            lines[-1] += (
                f" The tensors are ZCA-whitened (data.whiten=zca): `{whitening.FILE}` holds the transform (`mean`,"
                " `matrix`, `inverse`); the PNGs are `images @ inverse + mean` de-normalised, and a model trained on"
                " the tensors reads real images as `(normalised - mean) @ matrix`, each flattened."
            )
    else:
        lines += [
            f"The distilled images are **features** of the frozen image encoder `{encoders['image']}`, not"
            " pictures: they are in `image_features.safetensors` (one key per phase). Each PNG is the real"
            " training image nearest (cosine) to a synthetic feature, shown for orientation only; training"
            " on the PNGs is not training on the distilled set."
        ]
    lines += [
        "",
        f"Texts are embeddings of the frozen text encoder `{encoders['text']}`"
        " (`text_embeddings.safetensors`); the `text` column is the nearest real training caption of each,"
        " for reading only. `similarity.safetensors` holds each phase's soft similarity matrix S (the"
        " training target of a batch B is S[B, B]) and its parameters; `lrs.json` the learned student"
        " learning rates (image side, text side) per phase; `mmdistill.json` the format record and the full"
        " provenance (resolved config).",
        "",
        "## Measured",
        "",
    ]
    ev = cfg.get("evaluate", {})
    protocol = (
        f"{ev.get('runs')} fresh students trained on the phases in order, {ev.get('epochs')} epochs per phase,"
        " checkpoint chosen on the validation split, retrieval recall reported on the test split"
    )
    results = distilled.results
    if results:
        table = results.get("table") or {distilled.method: results}
        lines += [
            f"Protocol: {protocol} (mmdistill `evaluate`), in the run that made this set; the other rows are"
            " its baselines at the same budget.",
            "",
            "| method | r_mean | runs | protocol |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {name}{' (this set)' if name == distilled.method else ''} | {row['r_mean']:.2f} ±"
            f" {row.get('r_mean_std', 0.0):.2f} | {row.get('runs')} | {row.get('protocol', '')} |"
            for name, row in table.items()
        ]
    else:
        lines += [
            "Not measured in the run this set came from: score it with `mmdistill evaluate --preset PRESET"
            " --synthetic THIS_FOLDER --out results.json`."
        ]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "import mmdistill",
        "",
        'distilled = mmdistill.load_distilled("THIS_FOLDER")',
        "student = mmdistill.train_student(distilled)  # as `mmdistill evaluate` trains it",
        "```",
        "",
    ]
    return "\n".join(lines)


def describe(distilled: DistilledSet) -> str:
    """`mmdistill inspect`: a one-screen summary of a distilled set."""
    meta = distilled.meta
    lines = [
        f"{distilled.source} ({distilled.layout} layout)",
        f"method {distilled.method}  preset {meta.get('preset', '-')}  seed {meta.get('seed', '-')}"
        f"  mmdistill {meta.get('version', '-')}  commit {(meta.get('git_commit') or '-')[:12]}",
        f"encoders: image {distilled.encoders['image'] or '-'}, text {distilled.encoders['text'] or '-'};"
        f" space {distilled.space}"
        + (
            f"; normalisation mean {distilled.normalization['mean']} std {distilled.normalization['std']}"
            if distilled.normalization
            else ""
        )
        + (f", then ZCA-whitened ({whitening.FILE})" if distilled.whitening is not None else ""),
        f"{'phase':>5} {'pairs':>6} {'images':>16} {'texts':>10} {'S':>9} {'S diag':>7} {'S off':>7}"
        f" {'S off max':>9} {'lr_img':>9} {'lr_txt':>9}  notes",
    ]
    for p, phase in enumerate(distilled.phases):
        n = len(phase["texts"])
        matrix = distilled.similarity(p)
        off = matrix[~torch.eye(n, dtype=torch.bool)] if n > 1 else torch.zeros(1)
        notes = []
        if phase.get("iterations") is not None:
            notes.append(f"{phase['iterations']} iterations")
        if phase.get("collapse"):
            notes.append(f"COLLAPSED ({phase['collapse'].get('reason')})")
        lines.append(
            f"{p:>5} {n:>6} {'x'.join(map(str, phase['images'].shape[1:])):>16}"
            f" {'x'.join(map(str, phase['texts'].shape[1:])):>10} {phase.get('similarity', 'identity'):>9}"
            f" {matrix.diagonal().mean():>7.3f} {off.mean():>7.3f} {off.max():>9.3f}"
            f" {float(phase['lr_img']):>9.4g} {float(phase['lr_txt']):>9.4g}  {', '.join(notes)}"
        )
    results = distilled.results
    lines.append(
        f"r_mean {results['r_mean']:.2f} ± {results.get('r_mean_std', 0.0):.2f} ({results.get('runs')} runs,"
        f" {results.get('protocol')})"
        if results
        else "r_mean: not measured with this set"
    )
    return "\n".join(lines)


def live_lrs(phase: dict) -> tuple[list[float], bool]:
    """([lr_img, lr_txt], True) as the phase's distillation left them (live), or its EMA lrs and False for a set
    that carries no live lrs (written before format 1.1, or by another code base)."""
    if all(k in phase for k in LIVE_LRS.values()):
        return [float(phase[LIVE_LRS[k]]) for k in ("lr_img", "lr_txt")], True
    return [float(phase["lr_img"]), float(phase["lr_txt"])], False
