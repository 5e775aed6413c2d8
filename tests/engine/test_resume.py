"""Resume: 2 epochs straight == 1 epoch, interruption, resume for 1 more (bitwise on CPU with
deterministic=true), for every algorithm, ODC's memory included; resume=auto; NaN handling."""

from __future__ import annotations

import pytest
import torch

from conftest import ALGOS, compose_cfg, run_training, tiny
from selfsup.engine import checkpoint as ckpt_io
from selfsup.engine.trainer import Trainer
from selfsup.errors import CheckpointError, ConfigError, TrainingDiverged


class Interrupted(Exception):
    pass


def _interrupt_after_first_epoch(monkeypatch):
    """Simulate a crash (or a preemption) right after the first epoch's checkpoint is written."""
    original = Trainer._save

    def save_then_die(self):
        path = original(self)
        if self.epoch == 1:
            raise Interrupted
        return path

    monkeypatch.setattr(Trainer, "_save", save_then_die)


def _assert_same_state(a: dict, b: dict, where: str = "") -> None:
    assert a.keys() == b.keys(), where
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, dict):
            _assert_same_state(x, y, f"{where}.{key}")
        elif isinstance(x, torch.Tensor):
            assert torch.equal(x, y), f"{where}.{key} differs"
        elif isinstance(x, (list, tuple)) and x and isinstance(x[0], dict):
            for i, (u, v) in enumerate(zip(x, y)):
                _assert_same_state(u, v, f"{where}.{key}[{i}]")
        else:
            assert x == y, f"{where}.{key}: {x} != {y}"


@pytest.mark.slow
@pytest.mark.parametrize("algo", ALGOS)
def test_two_epochs_equal_one_plus_resume(algo, tmp_path, monkeypatch):
    overrides = tiny(algo) + [
        "schedule.epochs=2",
        "schedule.warmup_epochs=0.5",
        "deterministic=true",
        "loader.num_workers=1",
        "knn.enabled=false",
    ]
    if algo == "odc":
        overrides += ["algo.model.centroid_interval=3"]
    straight = run_training(overrides, tmp_path / "straight")
    assert straight.epochs == 2

    with monkeypatch.context() as m:
        _interrupt_after_first_epoch(m)
        with pytest.raises(Interrupted):
            run_training(overrides, tmp_path / "first")
    first = ckpt_io.load(tmp_path / "first" / "last.pt")
    assert first["epoch"] == 1

    resumed = run_training(overrides + [f"resume={tmp_path / 'first' / 'last.pt'}"], tmp_path / "resumed")
    assert resumed.epochs == 2 and resumed.steps == straight.steps

    a = ckpt_io.load(tmp_path / "straight" / "last.pt")
    b = ckpt_io.load(tmp_path / "resumed" / "last.pt")
    _assert_same_state(a["model"], b["model"], "model")  # weights and the algorithm's state
    _assert_same_state(a["optimizer"]["state"], b["optimizer"]["state"], "optimizer")
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"]
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"])
    if algo == "odc":  # the algorithm's state moved on after the resume, identically
        assert "memory.features" in a["model"] and "memory.labels" in a["model"]
        assert not torch.equal(first["model"]["memory.features"], a["model"]["memory.features"])
    if algo == "byol":  # the EMA target continued from the checkpoint (not re-copied from the online network)
        key = "target.module.1.mlp.3.weight"
        assert not torch.equal(first["model"][key], a["model"][key])
        assert not torch.equal(a["model"][key], a["model"]["projector.mlp.3.weight"])


@pytest.mark.slow
def test_resume_auto_continues_in_the_run_dir(tmp_path, monkeypatch):
    overrides = tiny("simclr") + ["schedule.epochs=2", "knn.enabled=false"]
    with monkeypatch.context() as m:
        _interrupt_after_first_epoch(m)
        with pytest.raises(Interrupted):
            run_training(overrides, tmp_path)
    result = run_training(overrides + ["resume=auto"], tmp_path)
    assert result.epochs == 2
    assert ckpt_io.load(tmp_path / "last.pt")["epoch"] == 2
    assert sorted(p.name for p in tmp_path.glob("epoch_*.pt")) == ["epoch_0001.pt", "epoch_0002.pt"]


def test_resume_auto_without_checkpoint_starts_fresh(tmp_path):
    result = run_training(tiny("mae") + ["resume=auto", "knn.enabled=false"], tmp_path)
    assert result.epochs == 1 and (tmp_path / "last.pt").is_file()


def test_resume_from_missing_path_fails_clearly(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        Trainer(compose_cfg(tiny("mae") + [f"resume={tmp_path / 'nope.pt'}"]), tmp_path)


def test_resume_into_another_architecture_lists_the_keys(tmp_path):
    run_training(tiny("simclr") + ["knn.enabled=false"], tmp_path / "a")
    ckpt = tmp_path / "a" / "last.pt"
    # the resume rule first: another algorithm is a changed setting, listed (classes first)
    with pytest.raises(ConfigError, match=r"was trained with other settings \(algo.model._target_: selfsup") as e:
        Trainer(compose_cfg(tiny("odc") + [f"resume={ckpt}"]), tmp_path / "b")
    assert "resume_force=true" in str(e.value)
    # forced, the weights still have to fit: every mismatch is listed
    with pytest.raises(CheckpointError, match="another architecture") as e:
        Trainer(compose_cfg(tiny("odc") + [f"resume={ckpt}", "resume_force=true"]), tmp_path / "b")
    assert "missing keys: " in str(e.value) and "unexpected keys: " in str(e.value)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        Trainer(
            compose_cfg(tiny("simclr") + ["algo.model.out_dim=16", f"resume={ckpt}", "resume_force=true"]),
            tmp_path / "c",
        )


def test_checkpoint_holds_everything_needed(tmp_path):
    run_training(tiny("odc") + ["knn.enabled=false"], tmp_path)
    state = torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=True)
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "epoch", "step", "config", "meta"} <= state.keys()
    assert state["meta"]["algo"] == "ODC" and state["meta"]["num_samples"] == 64
    assert {"memory.features", "memory.labels", "memory.centroids", "memory.class_weight"} <= state["model"].keys()
    assert len(state["rng"]) == 1 and {"python", "numpy", "torch"} <= state["rng"][0].keys()
    assert "_target_: selfsup.algorithms.odc.ODC" in state["config"]
    assert (tmp_path / "config.yaml").read_text() == state["config"]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """Epoch 1 trains normally; in epoch 2 the loss turns NaN: the run stops with a clear error
    and last.pt is still epoch 1's (loadable, not overwritten)."""
    overrides = tiny("simclr") + ["schedule.epochs=2", "knn.enabled=false", "log.interval=1"]
    trainer = Trainer(compose_cfg(overrides), tmp_path)
    forward = trainer.algo.forward

    def poisoned(batch):
        out = forward(batch)
        if trainer.epoch >= 1:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(trainer.algo, "forward", poisoned)
    with pytest.raises(TrainingDiverged, match="loss became nan at epoch 2") as e:
        trainer.fit()
    assert "last good checkpoint is" in str(e.value) and "last.pt" in str(e.value)
    assert ckpt_io.load(tmp_path / "last.pt")["epoch"] == 1
    assert not (tmp_path / "epoch_0002.pt").exists()


def test_checkpoint_interval_and_keep(tmp_path):
    """epoch_NNNN.pt every `interval` epochs (and at the end), only the newest `keep`; last.pt is a
    hard link to the newest one, not a second copy."""
    run_training(
        tiny("mae") + ["schedule.epochs=3", "checkpoint.interval=1", "checkpoint.keep=2", "knn.enabled=false"],
        tmp_path / "keep",
    )
    assert sorted(p.name for p in (tmp_path / "keep").glob("epoch_*.pt")) == ["epoch_0002.pt", "epoch_0003.pt"]
    assert (tmp_path / "keep" / "last.pt").stat().st_ino == (tmp_path / "keep" / "epoch_0003.pt").stat().st_ino
    run_training(
        tiny("mae") + ["schedule.epochs=3", "checkpoint.interval=2", "knn.enabled=false"], tmp_path / "interval"
    )
    assert sorted(p.name for p in (tmp_path / "interval").glob("epoch_*.pt")) == ["epoch_0002.pt", "epoch_0003.pt"]
    assert ckpt_io.load(tmp_path / "interval" / "last.pt")["epoch"] == 3
