"""Nothing silent, nothing lost: unique run dirs, no run written over another, resume that honours
what changed (and says so), no duplicated records, Ctrl-C that stops cleanly with a checkpoint."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import REPO, compose_cfg, run_training, tiny
from selfsup.distributed import free_port
from selfsup.engine import checkpoint as ckpt_io
from selfsup.engine.run_dir import run_id, truncate_metrics
from selfsup.engine.trainer import Trainer
from selfsup.errors import ConfigError, TrainingInterrupted

QUICK = tiny("simclr") + ["knn.enabled=false", "log.interval=1"]


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_run_id_is_time_plus_random_and_fixed_per_process():
    rid = run_id()
    assert rid == run_id() and len(rid.rsplit("-", 1)[1]) == 6
    from omegaconf import OmegaConf

    run_dir = OmegaConf.to_container(compose_cfg([], return_hydra_config=True).hydra.run)["dir"]
    assert run_dir.endswith("/${run_id:}")  # resolved by Hydra (per process) into outputs/<algo>/<run_id>


@pytest.mark.slow
def test_two_runs_started_together_get_two_directories(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "-1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "selfsup.train", *QUICK, "device=cpu", "loader.num_workers=0", "log.tensorboard=false"]
    procs = [
        subprocess.Popen(
            [*cmd, f"seed={s}"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        for s in (0, 1)
    ]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()[-2000:] if p.stderr else ""
    runs = sorted((tmp_path / "outputs" / "simclr").iterdir())
    assert len(runs) == 2
    seeds = sorted(yaml.safe_load((r / "config.yaml").read_text())["seed"] for r in runs)
    assert seeds == [0, 1]
    for r in runs:  # each directory holds exactly one run
        assert [rec["kind"] for rec in _records(r)].count("config") == 1


def test_a_directory_that_holds_a_run_is_refused(tmp_path):
    run_training(QUICK + ["schedule.epochs=2"], tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir() if p.is_file()}
    with pytest.raises(ConfigError, match=r"already holds a run \(last.pt at epoch 2, step 8\); pass resume=auto"):
        Trainer(compose_cfg(QUICK + ["schedule.epochs=1"]), tmp_path)
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir() if p.is_file()} == before  # untouched
    # overwrite=true starts over: the old run's checkpoints and records are gone
    run_training(QUICK + ["schedule.epochs=1", "overwrite=true"], tmp_path)
    assert sorted(p.name for p in tmp_path.glob("epoch_*.pt")) == ["epoch_0001.pt"]
    assert ckpt_io.load(tmp_path / "last.pt")["epoch"] == 1
    assert max(r["step"] for r in _records(tmp_path)) == 4


def test_resume_refuses_changed_settings_unless_forced_and_uses_the_lr_it_prints(tmp_path):
    base = QUICK + ["schedule.epochs=2", "schedule.policy=constant"]
    run_training(base, tmp_path / "a")
    ckpt = tmp_path / "a" / "epoch_0001.pt"
    changed = ["algo.optimizer.lr=3.0", "algo.optimizer.weight_decay=0.05"]
    with pytest.raises(ConfigError, match=r"was trained with other settings \(algo.optimizer.lr: 0.3 -> 3.0; algo"):
        Trainer(compose_cfg(base + changed + [f"resume={ckpt}"]), tmp_path / "b")
    trainer = Trainer(compose_cfg(base + changed + [f"resume={ckpt}", "resume_force=true"]), tmp_path / "b")
    # the lr is the new one, scaled for this run's batch (3.0 x 16 / 256), and so is the weight decay
    assert trainer.lr == pytest.approx(3.0 * 16 / 256)
    seen = []
    trainer.optimizer.register_step_pre_hook(
        lambda opt, a, k: seen.append((opt.param_groups[0]["lr"], max(g["weight_decay"] for g in opt.param_groups)))
    )
    trainer.fit()
    assert len(seen) == 4 and all(lr == pytest.approx(3.0 * 16 / 256) and wd == 0.05 for lr, wd in seen), seen


def test_extending_the_schedule_re_plans_the_remaining_steps(tmp_path):
    """A finished 2-epoch cosine run resumed with schedule.epochs=3: epoch 3 follows the 3-epoch schedule
    (not the old one, which had reached lr 0)."""
    run_training(QUICK + ["schedule.epochs=2"], tmp_path / "a")
    trainer = Trainer(
        compose_cfg(QUICK + ["schedule.epochs=3", f"resume={tmp_path / 'a' / 'last.pt'}"]), tmp_path / "b"
    )
    seen = []
    trainer.optimizer.register_step_pre_hook(lambda opt, a, k: seen.append(opt.param_groups[0]["lr"]))
    result = trainer.fit()
    assert result.epochs == 3 and result.steps == 12 and len(seen) == 4
    for k, lr in zip(range(8, 12), seen):
        assert lr == pytest.approx(trainer.lr * 0.5 * (1 + math.cos(math.pi * k / 12))), k
    assert min(seen) > 0


def test_resuming_a_finished_run_says_there_is_nothing_left(tmp_path, caplog):
    run_training(QUICK, tmp_path / "a")
    last = tmp_path / "a" / "last.pt"
    with caplog.at_level("INFO", logger="selfsup"):
        result = Trainer(compose_cfg(QUICK + [f"resume={last}"]), tmp_path / "b").fit()
    assert result.last_checkpoint == last and result.steps == 4
    assert any("nothing left to train" in r.getMessage() and str(last) in r.getMessage() for r in caplog.records)
    assert not (tmp_path / "b" / "metrics.jsonl").exists()


def test_resume_auto_drops_records_past_the_checkpoint_and_stale_temporaries(tmp_path):
    run_training(QUICK + ["schedule.epochs=2"], tmp_path)
    # what a crash in epoch 3 of a longer run leaves: records past the last checkpoint, a torn write
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"kind": "train", "epoch": 2.25, "step": 9, "loss": 1.0}) + "\n")
        f.write('{"kind": "train", "epo')
    (tmp_path / ".last.pt.abcd1234.tmp").write_bytes(b"x" * 100)
    run_training(QUICK + ["schedule.epochs=3", "resume=auto"], tmp_path)
    steps = [(r["kind"], r["step"]) for r in _records(tmp_path) if r["kind"] == "train"]
    assert steps == [("train", s) for s in range(1, 13)]  # each step once
    assert not list(tmp_path.glob(".*.tmp"))


def test_truncate_metrics_keeps_records_up_to_the_step(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(6)))
    assert truncate_metrics(tmp_path, 3) == 2
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2, 3]


@pytest.mark.slow
def test_ctrl_c_stops_at_a_step_boundary_and_the_run_resumes_step_exactly(tmp_path, monkeypatch):
    """SIGINT during step 3 of epoch 1: the step finishes, a checkpoint of step 3 is written, the error says
    how to continue; resuming there (in the middle of the epoch) ends with the weights of an uninterrupted run."""
    overrides = QUICK + ["schedule.epochs=2", "deterministic=true", "loader.num_workers=1"]
    straight = run_training(overrides, tmp_path / "straight")
    trainer = Trainer(compose_cfg(overrides), tmp_path / "run")
    after_step = trainer.algo.after_step

    def interrupt_at_3(state):
        if state.step == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return after_step(state)

    monkeypatch.setattr(trainer.algo, "after_step", interrupt_at_3)
    with pytest.raises(
        TrainingInterrupted,
        match=r"interrupted at epoch 1, step 3: saved .*last.pt; continue with: "
        r"python -m selfsup.train .*resume=auto",
    ):
        trainer.fit()
    ckpt = ckpt_io.load(tmp_path / "run" / "last.pt")
    assert (ckpt["epoch"], ckpt["step"]) == (0, 3)
    resumed = run_training(overrides + ["resume=auto"], tmp_path / "run")
    assert resumed.steps == straight.steps == 8
    a = ckpt_io.load(tmp_path / "straight" / "last.pt")["model"]
    b = ckpt_io.load(tmp_path / "run" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in _records(tmp_path / "run") if r["kind"] == "train"] == list(range(1, 9))


def test_logs_show_where_the_time_goes(tmp_path):
    run_training(QUICK + ["schedule.epochs=2"], tmp_path)
    records = _records(tmp_path)
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2] and all(r["seconds"] > 0 and "loss" in r for r in epochs)
    train = [r for r in records if r["kind"] == "train"]
    for r in train:
        assert r["data_s"] >= 0 and r["compute_s"] > 0 and r["peak_mem_gib"] > 0.05 and r["eta_s"] >= 0
    assert train[-1]["eta_s"] == 0 and train[0]["eta_s"] > 0


def test_summary_lists_exactly_the_checkpoints_on_disk(tmp_path, caplog):
    with caplog.at_level("INFO", logger="selfsup"):
        run_training(QUICK + ["schedule.epochs=3", "checkpoint.keep=2"], tmp_path)
    line = next(r.getMessage() for r in caplog.records if "checkpoints:" in r.getMessage())
    assert "(= epoch_0003.pt)" in line and "2 epoch checkpoint(s) on disk: epoch_0002.pt, epoch_0003.pt" in line
    assert sorted(p.name for p in tmp_path.glob("epoch_*.pt")) == ["epoch_0002.pt", "epoch_0003.pt"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_torchrun_ranks_share_one_unique_run_dir(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(free_port()),
        "-m",
        "selfsup.train",
        *QUICK,
        "device=cpu",
        "loader.num_workers=0",
        "log.tensorboard=false",
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(CUDA_VISIBLE_DEVICES="-1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    runs = list((tmp_path / "outputs" / "simclr").iterdir())
    assert len(runs) == 1 and (runs[0] / "last.pt").is_file()  # the other rank's own directory was removed


def test_a_checkpoint_of_another_dataset_is_refused(tmp_path):
    run_training(QUICK, tmp_path / "a")
    digits = [o for o in QUICK if not o.startswith(("dataset=", "dataset.num_samples"))] + ["dataset=digits"]
    with pytest.raises(ConfigError, match=r"dataset._target_: selfsup.data.datasets.FakeImages -> selfsup.data.d"):
        Trainer(compose_cfg(digits + [f"resume={tmp_path / 'a' / 'last.pt'}"]), tmp_path / "b")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ctrl_c_on_the_command_line(tmp_path):
    """A real SIGINT to ``python -m selfsup.train``: one message with the resume command, status 130, no
    traceback, and a checkpoint of the step it stopped at."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "-1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    args = QUICK + ["schedule.epochs=50", "device=cpu", "loader.num_workers=0", "log.tensorboard=false"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "selfsup.train", *args, f"hydra.run.dir={tmp_path}"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    for line in proc.stdout:  # wait until training is under way
        if "step 2/4" in line:
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    message = [line for line in err.splitlines() if line.startswith("selfsup: interrupted at")]
    assert len(message) == 1 and "resume=auto" in message[0] and f"hydra.run.dir={tmp_path}" in message[0]
    ckpt = ckpt_io.load(tmp_path / "last.pt")
    assert ckpt["step"] >= 2 and f"saved {tmp_path / 'last.pt'}" in message[0]


def test_a_second_ctrl_c_aborts_at_once(tmp_path):
    trainer = Trainer(compose_cfg(QUICK), tmp_path)
    trainer._on_sigint(signal.SIGINT, None)
    assert trainer._interrupted and trainer._stop_requested(at_log_step=False)  # one process: any step
    with pytest.raises(KeyboardInterrupt):
        trainer._on_sigint(signal.SIGINT, None)


def test_the_resume_rule_sorts_every_change():
    from selfsup.engine.resume import changes, classify

    old = {
        "device": "cpu",
        "schedule": {"epochs": 7, "batch_size": 16},
        "dataset": {"root": "/a", "image_size": 32},
        "knn": {"k": 20},
        "algo": {"optimizer": {"lr": 0.3}},
    }
    new = {
        "device": "cuda",
        "schedule": {"epochs": 9, "batch_size": 16},
        "dataset": {"root": "/b", "image_size": 64},
        "knn": {"k": 10},
        "algo": {"optimizer": {"lr": 0.6}},
    }
    replanned, warned, refused = classify(changes(old, new))
    assert replanned == {"schedule.epochs": (7, 9)}
    assert warned == {"dataset.root": ("/a", "/b")}
    assert refused == {"algo.optimizer.lr": (0.3, 0.6), "dataset.image_size": (32, 64)}  # device, knn: free


def test_resumed_tensorboard_has_each_step_once(tmp_path):
    """Resuming from epoch 1's checkpoint in the same dir: the events logged after it (steps 5-8) are purged
    from TensorBoard and logged again, so each step has one loss."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    overrides = QUICK + ["schedule.epochs=2", "log.tensorboard=true"]
    run_training(overrides, tmp_path)
    run_training(overrides + [f"resume={tmp_path / 'epoch_0001.pt'}"], tmp_path)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 9))
