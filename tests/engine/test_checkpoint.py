"""Checkpoints are written atomically, loaded with weights_only=True, and mismatches are reported."""

from __future__ import annotations

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
    with pytest.raises(CheckpointError, match="cannot load checkpoint"):
        ckpt_io.load(path)


def test_load_errors_are_one_clear_line(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        ckpt_io.load(tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot load checkpoint") as e:
        ckpt_io.load(garbage)
    assert "\n" not in str(e.value)
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a selfsup training checkpoint"):
        ckpt_io.load(tmp_path / "other.pt")


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
