"""File access shared by every stage: atomic writes, safe torch loading and one lock per output folder.

Every artefact is written to a temporary file in the same folder, then renamed. A failed write raises an
OSError that names the artefact and the cause (the CLI prints it as one line), whatever library wrote it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from mmdistill.errors import UserError

logger = logging.getLogger(__name__)

LOCK_FILE = ".mmdistill.lock"
_held: set[Path] = set()  # folders this process has locked


def _write_error(err: Exception, path: Path) -> OSError:
    """The OSError behind a failed write, naming `path`: safetensors (Rust) reports it only in its message."""
    if isinstance(err, OSError):
        return OSError(err.errno, err.strerror or str(err), str(path))
    code = re.search(r"os error (\d+)", str(err))
    if code:
        return OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path))
    return OSError(errno.EIO, str(err).strip().splitlines()[0], str(path))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except (OSError, SafetensorError) as err:
        raise _write_error(err, path) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def save_torch(obj, path: str | os.PathLike) -> None:
    """torch.save atomically, through a Python file so that a failed write raises an OSError: torch turns it
    into a RuntimeError without a cause ('unexpected pos ...'), raised while handling the OSError."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        try:
            torch.save(obj, f)
        except RuntimeError as err:
            if isinstance(err.__context__, OSError):
                raise err.__context__ from None
            raise


def load_torch(path: str | os.PathLike, what: str, mmap: bool = False):
    """torch.load with weights_only=True (a pickle never runs code); a bad file is a one-line UserError naming it.

    torch's own message is left out when it advises weights_only=False: that would run the file's code.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise UserError(f"{what} not found: {path}") from None
    except Exception as err:  # torch.load raises many kinds (pickle, zip, RuntimeError) for a bad file
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        reason = "it holds objects other than tensors and plain containers" if "weights_only" in str(err) else text
        raise UserError(f"cannot read {what} {path}: {reason}") from None


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on an output folder for the block, so that a second command on the same folder stops
    at once instead of deleting or interleaving the first one's files.

    The lock is an flock on `folder/.mmdistill.lock`, which holds the holder's pid. The kernel releases an flock
    when its process dies (even by kill -9), so a pid left in an unlocked file is a dead holder's: taken over,
    with a message. A folder this process already holds is not locked again. On a file system without flock
    (Lustre mounted without it, some network file systems) the command runs unlocked, with a message.
    """
    folder = Path(folder)
    key = folder.resolve()
    if key in _held:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise UserError(
                f"{folder} is in use by another mmdistill command (pid {holder}, lock file {path});"
                " wait for it to finish or choose another --out"
            ) from None
        except OSError as err:
            logger.warning(
                "cannot lock %s (%s); running without a lock: do not start another command on this folder",
                path,
                err.strerror or err,
            )
        previous = os.pread(fd, 64, 0).decode(errors="replace").strip()
        if previous:
            logger.warning("taking over %s from pid %s, which ended without releasing it", path, previous)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _held.add(key)
        try:
            yield
        finally:
            _held.discard(key)
            os.ftruncate(fd, 0)  # kept, not deleted: a process that opened it just now must lock the same file
    finally:
        os.close(fd)


def save_tensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """Write a safetensors file atomically; refuses non-finite floating tensors so no NaN result is ever saved."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"refusing to save non-finite tensor {name!r} to {path}")
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def _reject_nan(value):
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("refusing to write a non-finite number to JSON")
    if isinstance(value, dict):
        for v in value.values():
            _reject_nan(v)
    if isinstance(value, (list, tuple)):
        for v in value:
            _reject_nan(v)


def read_json(path: str | os.PathLike) -> dict:
    """A JSON file the user may have lost or damaged: a missing or corrupt file is a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"file not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"corrupt JSON in {path} (line {err.lineno}): {err.msg}") from None


def write_json(obj, path: str | os.PathLike) -> None:
    """Write JSON atomically (indented, keys in insertion order); NaN/Inf are refused."""
    _reject_nan(obj)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line in one write call, so processes appending to the same log do not interleave."""
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as err:
        raise _write_error(err, Path(path)) from None


def write_text(text: str, path: str | os.PathLike) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
