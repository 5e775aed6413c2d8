"""Checkpoints are written atomically, loaded with weights_only=True, and mismatches are reported."""

from __future__ import annotations

import errno
import os
import pickle

import pytest
import torch
from torch import nn

from selfsup.engine import checkpoint as ckpt_io
from selfsup.errors import CheckpointError


def _state(value: float) -> dict:
    return {"format": ckpt_io.FORMAT, "version": 1, "epoch": 1, "model": {"w": torch.full((4,), value)}}


def test_save_atomic_replaces_and_leaves_no_temporaries(tmp_path):
    path = tmp_path / "last.pt"
    ckpt_io.save_atomic(_state(1.0), path)
    ckpt_io.save_atomic(_state(2.0), path)
    assert ckpt_io.load(path)["model"]["w"][0] == 2.0
    assert sorted(os.listdir(tmp_path)) == ["last.pt"]


def test_a_crash_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ckpt_io.save_atomic(_state(1.0), path)
    real_save = torch.save

    def crash_half_way(obj, f, *args, **kwargs):
        f.write(b"partial bytes of a checkpoint")  # what a killed process leaves behind
        raise KeyboardInterrupt  # e.g. SIGINT or the SLURM time limit in the middle of a write

    monkeypatch.setattr(torch, "save", crash_half_way)
    with pytest.raises(KeyboardInterrupt):
        ckpt_io.save_atomic(_state(2.0), path)
    monkeypatch.setattr(torch, "save", real_save)
    assert ckpt_io.load(path)["model"]["w"][0] == 1.0  # the old, complete file
    assert sorted(os.listdir(tmp_path)) == ["last.pt"]  # and no temporary debris


def test_load_refuses_pickled_code(tmp_path):
    """A user-supplied file that needs arbitrary unpickling is refused (weights_only=True)."""

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        torch.save({"format": ckpt_io.FORMAT, "x": Payload()}, f, pickle_module=pickle)
    with pytest.raises(CheckpointError, match="it holds Python objects \\(posix.system\\) that would have to be") as e:
        ckpt_io.load(path)
    _assert_safe_one_line(str(e.value))


def _assert_safe_one_line(message: str) -> None:
    assert "\n" not in message
    assert "weights_only=False" not in message and "weights_only" not in message  # never suggest unsafe loading


def test_load_errors_are_one_clear_line(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        ckpt_io.load(tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(
        CheckpointError, match=r"garbage.pt is not a selfsup checkpoint \(not a file written by torch"
    ) as e:
        ckpt_io.load(garbage)
    _assert_safe_one_line(str(e.value))
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a selfsup training checkpoint \\(no 'format: selfsup-checkpoint'"):
        ckpt_io.load(tmp_path / "other.pt")


def _jpeg(path):
    from PIL import Image

    Image.new("RGB", (16, 16), (200, 30, 30)).save(path, format="JPEG")


def _foreign_zip(path):
    import zipfile

    with zipfile.ZipFile(path, "w") as z:
        z.writestr("notes/readme.txt", "a zip archive, but not torch's")


@pytest.mark.parametrize(
    "make, detail",
    [
        (lambda p: p.write_text("epoch: 3\nthis is a text file\n"), ""),
        (lambda p: p.write_bytes(os.urandom(8192)), ""),
        (_jpeg, ""),
        (lambda p: p.write_bytes(b""), ": the file is empty"),
        (lambda p: p.write_bytes(pickle.dumps({"format": ckpt_io.FORMAT})), ""),  # a plain pickle, not torch's
        (_foreign_zip, ": a zip archive without torch's data.pkl"),
    ],
    ids=["text", "random-bytes", "jpeg", "empty", "plain-pickle", "foreign-zip"],
)
def test_load_refuses_files_torch_did_not_write(tmp_path, make, detail):
    path = tmp_path / "last.pt"
    make(path)
    expected = f"{path} is not a selfsup checkpoint (not a file written by torch.save){detail}; pass the last.pt"
    with pytest.raises(CheckpointError) as e:
        ckpt_io.load(path)
    assert str(e.value).startswith(expected), str(e.value)
    _assert_safe_one_line(str(e.value))


def test_load_refuses_torch_files_of_python_objects(tmp_path):
    """A whole nn.Module saved with torch.save: loading it would unpickle code; weights_only refuses."""
    path = tmp_path / "model.pt"
    torch.save(nn.Linear(2, 2), path)
    with pytest.raises(CheckpointError, match="would have to be unpickled, which selfsup never does") as e:
        ckpt_io.load(path)
    assert str(e.value).startswith(f"{path} is not a selfsup checkpoint: it holds Python objects (torch.nn.")
    _assert_safe_one_line(str(e.value))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-format"])
def test_load_reports_a_cut_short_torch_file_as_damaged(tmp_path, legacy):
    full = tmp_path / "full.pt"
    torch.save(_state(1.0) | {"big": torch.zeros(50_000)}, full, _use_new_zipfile_serialization=not legacy)
    assert ckpt_io.load(full)["model"]["w"][0] == 1.0  # both formats load whole
    cut = tmp_path / "cut.pt"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(
        CheckpointError, match=f"{cut} is a damaged checkpoint: torch.save wrote it, but it is cut short"
    ) as e:
        ckpt_io.load(cut)
    _assert_safe_one_line(str(e.value))


def test_load_of_a_folder_says_which_file_to_pass(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=f"resume={empty} is a folder, not a checkpoint: pass the .pt file") as e:
        ckpt_io.load(empty)
    assert str(e.value).endswith("(this folder holds none)") and "last.pt" not in str(e.value)
    run = tmp_path / "run"
    ckpt_io.save_atomic(_state(1.0), run / "epoch_0002.pt")
    with pytest.raises(CheckpointError, match=f"pass the .pt file \\(e.g. {run}/epoch_0002.pt\\)") as e:
        ckpt_io.load(run)
    assert "resume=auto" in str(e.value) and f"{run}/last.pt" not in str(e.value)
    ckpt_io.save_atomic(_state(1.0), run / "last.pt")
    with pytest.raises(CheckpointError) as e:
        ckpt_io.load(run)
    assert str(e.value) == (
        f"resume={run} is a folder, not a checkpoint: pass the .pt file (e.g. {run}/last.pt) "
        f"or run in that folder with hydra.run.dir={run} resume=auto"
    )


# ---------------------------------------------------------------------------------------------- failed writes
def _disk_full(obj, f, *args, **kwargs):
    f.write(b"the first bytes fit")
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ckpt_io.save_atomic(_state(1.0), path)
    monkeypatch.setattr(torch, "save", _disk_full)
    with pytest.raises(CheckpointError) as e:
        ckpt_io.save_atomic(_state(2.0), path)
    monkeypatch.undo()
    assert str(e.value) == (
        f"cannot write checkpoint {path}: No space left on device; the previous checkpoint at that path is intact; "
        f"free disk space (or quota) for {tmp_path} and run again"
    )
    assert isinstance(e.value.__cause__, OSError)  # HYDRA_FULL_ERROR=1 still shows where it failed
    assert ckpt_io.load(path)["model"]["w"][0] == 1.0  # the old, complete file
    assert sorted(os.listdir(tmp_path)) == ["last.pt"]  # and the temporary file is gone


def test_a_full_disk_on_the_first_write_says_there_was_no_previous_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "save", _disk_full)
    with pytest.raises(CheckpointError, match="No space left on device; there was no previous checkpoint at that"):
        ckpt_io.save_atomic(_state(2.0), tmp_path / "epoch_0001.pt")
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_a_full_disk_through_torchs_own_writer(tmp_path, monkeypatch):
    """A real ENOSPC from the file system: torch's zip writer turns it into a RuntimeError whose context
    is the OSError; still one line with the OS's reason."""
    real_mkstemp = ckpt_io.tempfile.mkstemp

    def mkstemp_on_a_full_disk(*args, **kwargs):
        fd, tmp = real_mkstemp(*args, **kwargs)
        os.close(fd)
        return os.open("/dev/full", os.O_WRONLY), tmp  # every write fails with ENOSPC

    path = tmp_path / "last.pt"
    ckpt_io.save_atomic(_state(1.0), path)
    monkeypatch.setattr(ckpt_io.tempfile, "mkstemp", mkstemp_on_a_full_disk)
    with pytest.raises(CheckpointError, match=f"cannot write checkpoint {path}: No space left on device; the prev"):
        ckpt_io.save_atomic(_state(2.0) | {"big": torch.zeros(1_000_000)}, path)
    monkeypatch.undo()
    assert ckpt_io.load(path)["model"]["w"][0] == 1.0
    assert sorted(os.listdir(tmp_path)) == ["last.pt"]


def test_an_unwritable_folder_is_one_line(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(ckpt_io.tempfile, "mkstemp", read_only)
    with pytest.raises(CheckpointError, match=f"cannot write checkpoint {tmp_path}/last.pt: Read-only file system; "):
        ckpt_io.save_atomic(_state(1.0), tmp_path / "last.pt")


def test_a_bug_while_writing_keeps_its_traceback(tmp_path, monkeypatch):
    def bug(obj, f, *args, **kwargs):
        raise TypeError("cannot pickle 'generator' object")

    monkeypatch.setattr(torch, "save", bug)
    with pytest.raises(TypeError, match="cannot pickle"):
        ckpt_io.save_atomic(_state(1.0), tmp_path / "last.pt")
    assert os.listdir(tmp_path) == []


def test_load_model_state_reports_missing_unexpected_and_shapes():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    state = model.state_dict()
    ckpt_io.load_model_state(model, state, "ok.pt")  # identical: loads
    bad = dict(state)
    bad.pop("1.bias")
    bad["extra.weight"] = torch.zeros(1)
    bad["0.weight"] = torch.zeros(5, 3)
    with pytest.raises(CheckpointError) as e:
        ckpt_io.load_model_state(model, bad, "bad.pt")
    msg = str(e.value)
    assert "missing keys: 1.bias" in msg and "unexpected keys: extra.weight" in msg
    assert "0.weight (5, 3) vs (4, 3)" in msg and "\n" not in msg


def test_rng_state_round_trip_through_a_checkpoint(tmp_path):
    import random

    import numpy as np

    state = ckpt_io.rng_state()
    expected = (random.random(), float(np.random.rand()), torch.rand(1).item())
    ckpt_io.save_atomic({"format": ckpt_io.FORMAT, "rng": state}, tmp_path / "r.pt")
    ckpt_io.set_rng_state(ckpt_io.load(tmp_path / "r.pt")["rng"])
    assert (random.random(), float(np.random.rand()), torch.rand(1).item()) == expected
    assert pickle.loads(pickle.dumps(state))["numpy"]["keys"].shape == (624,)  # all_gather_object needs this
