"""io: one lock per output folder, write failures as OSErrors naming the file and cause, safe torch loading."""

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

import mmdistill.io as io_module
from mmdistill.errors import UserError
from mmdistill.io import LOCK_FILE, atomic_path, folder_lock, load_torch, save_tensors, save_torch

SRC = Path(__file__).resolve().parents[1] / "src"
HOLD = """import sys, time
from mmdistill.io import folder_lock
with folder_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_second_holder_is_refused_while_the_first_lives(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(SRC)},
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=f"in use by another mmdistill command \\(pid {holder.pid}") as err:
            with folder_lock(tmp_path):
                pass
        assert str(tmp_path / LOCK_FILE) in str(err.value) and "\n" not in str(err.value)
    finally:
        holder.kill()
        holder.wait()
    with folder_lock(tmp_path):  # the kernel released the dead holder's lock
        assert (tmp_path / LOCK_FILE).read_text() == f"{os.getpid()}\n"


def test_a_dead_holders_lock_is_taken_over_with_a_message(tmp_path, caplog):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / LOCK_FILE).write_text(dead.stdout)  # what a holder killed with -9 leaves
    with folder_lock(tmp_path):
        pass
    assert caplog.messages == [
        f"taking over {tmp_path / LOCK_FILE} from pid {dead.stdout.strip()}, which ended without releasing it"
    ]
    caplog.clear()
    assert (tmp_path / LOCK_FILE).read_text() == ""  # released normally: nothing to take over next time
    with folder_lock(tmp_path):
        with folder_lock(tmp_path):  # a folder this process holds is not locked twice
            pass
    assert caplog.messages == []


def test_a_file_system_without_flock_runs_unlocked_with_a_message(tmp_path, monkeypatch, caplog):
    def no_flock(fd, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")  # Lustre mounted without -o flock

    monkeypatch.setattr(io_module.fcntl, "flock", no_flock)
    with folder_lock(tmp_path):
        assert (tmp_path / LOCK_FILE).read_text() == f"{os.getpid()}\n"
    assert caplog.messages[0].startswith(
        f"cannot lock {tmp_path / LOCK_FILE} (Function not implemented); running without a lock"
    )


def test_a_full_disk_names_the_file_and_the_cause(tmp_path, monkeypatch):
    def full(*args, **kwargs):  # the error safetensors raises on a full disk (seen on a 64 KiB tmpfs)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(io_module, "save_file", full)
    with pytest.raises(OSError) as err:
        save_tensors({"x": torch.zeros(3)}, tmp_path / "a.safetensors")
    assert (err.value.errno, err.value.strerror, err.value.filename) == (
        errno.ENOSPC,
        "No space left on device",
        str(tmp_path / "a.safetensors"),
    )
    assert [p.name for p in tmp_path.iterdir()] == []  # no partial or temporary file left


def test_torch_save_on_a_full_disk_raises_enospc_not_a_runtime_error(tmp_path, monkeypatch):
    """On a full disk torch.save into a Python file raises RuntimeError('unexpected pos ...') while handling the
    file's OSError (seen on a 64 KiB tmpfs); the OSError is what reaches the user."""

    def full(obj, f):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2240 vs 2134") from None

    monkeypatch.setattr(io_module.torch, "save", full)
    with pytest.raises(OSError) as err:
        save_torch({"x": torch.zeros(3)}, tmp_path / "c.pt")
    assert (err.value.errno, err.value.filename) == (errno.ENOSPC, str(tmp_path / "c.pt"))
    assert [p.name for p in tmp_path.iterdir()] == []


def test_a_read_only_folder_names_the_file(tmp_path, monkeypatch):
    def read_only(*args, dir=None, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(Path(dir) / ".tmpname"))

    monkeypatch.setattr(io_module.tempfile, "mkstemp", read_only)
    with pytest.raises(OSError) as err:
        with atomic_path(tmp_path / "b.json"):
            pass
    assert (err.value.errno, err.value.filename) == (errno.EROFS, str(tmp_path / "b.json"))


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_load_torch_never_runs_a_pickle_nor_suggests_unsafe_loading(tmp_path):
    Payload.marker = tmp_path / "executed"
    torch.save({"x": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(UserError) as err:
        load_torch(tmp_path / "evil.pt", "checkpoint")
    message = str(err.value)
    assert message.startswith(f"cannot read checkpoint {tmp_path / 'evil.pt'}: ") and "\n" not in message
    assert "weights_only" not in message and not Payload.marker.exists()
    torch.save({"x": torch.zeros(100)}, tmp_path / "good.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "good.pt").read_bytes()[:200])
    with pytest.raises(UserError, match=f"cannot read checkpoint {tmp_path / 'cut.pt'}: ") as err:
        load_torch(tmp_path / "cut.pt", "checkpoint")
    assert "\n" not in str(err.value) and "weights_only" not in str(err.value)
