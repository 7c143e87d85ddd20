"""The distilled-set format: the only module that reads or writes distilled sets.

What `distill` writes in OUT: phase-<p>.safetensors (tensors + one JSON metadata entry "mmdistill"),
phase-<p>-captions.json and meta.json (provenance), read back by `load_synthetic` after validation.

Every file carries `format_version` (major.minor). A reader accepts any minor version of its major and refuses a
newer major: fields may be added within a major, never renamed or reinterpreted. Files written before the format
was versioned have the 1.0 layout and are read as 1.0.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .errors import UserError
from .io import save_tensors, write_json

FORMAT_VERSION = "1.0"
PHASE_FILE = re.compile(r"phase-(\d+)\.safetensors")


def check_version(version, where) -> None:
    """Refuse a file of a newer major version than this reader's, naming it and both versions."""
    if version is None:
        return
    try:
        major = int(str(version).split(".")[0])
    except ValueError:
        raise UserError(f"{where}: format_version {version!r} is not of the form MAJOR.MINOR") from None
    if major > int(FORMAT_VERSION.split(".")[0]):
        raise UserError(f"{where} is distilled-set format {version}, newer than the {FORMAT_VERSION} this mmdistill"
                        " reads; upgrade mmdistill")


# ------------------------------------------------------------------------------------------------- native

def write_phase(path: Path, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
    """One phase file: the tensors plus the metadata as one JSON entry (safetensors keeps metadata in a hash map
    whose order changes from process to process, so one sorted entry keeps the file bytes reproducible)."""
    record = {**metadata, "format_version": FORMAT_VERSION}
    save_tensors({k: v.detach().cpu() for k, v in tensors.items()}, path,
                 {"mmdistill": json.dumps(record, sort_keys=True)})


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
    expected = {"texts": (pairs, texts.shape[-1]), "lr_img": (1,), "lr_txt": (1,),
                **{"identity": {}, "full": {"sim_full": (pairs, pairs)},
                   "lowrank": {"sim_diag": (pairs,), "sim_left": (pairs, rank), "sim_right": (pairs, rank)}}
                [phase.get("similarity", "identity")]}
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
        raise UserError(f"{path} is not the record of a finished distillation of this version; distil"
                        " again") from None
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
        raise UserError(f"the distillation in {out} is unfinished ({len(done)} of {planned} phases); finish it"
                        " with distill --resume")
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
            raise UserError(f"synthetic phase {path} was distilled with another config than {meta_path}; distil"
                            " again")
        if phase.get("pairs") != done[p]["pairs"]:
            raise UserError(f"synthetic phase {path} holds {phase.get('pairs')} pairs, but {meta_path} lists"
                            f" {done[p]['pairs']}")
        phases.append(phase)
    return phases
