"""Launching without SLURM: ``launcher=torchrun`` (workers started by the command itself, on one machine or
as two "nodes" on localhost), rendezvous ports, stop signals with resume, sweeps with a failing member and
their summary, the one-line errors of bad launcher input, and SLURM's rank discovery from its variables.

The command-line tests run ``python -m selfsup.train`` on 64 fake 32 px images with a small SimCLR head,
on the CPU with one thread per process; runs that do not depend on each other are started side by side.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

from conftest import compose_cfg, launch_env, relative_update_error, tiny
from selfsup import distributed
from selfsup.distributed import free_port
from selfsup.engine.run_dir import member_dir
from selfsup.errors import ConfigError
from selfsup.launch import sweep
from selfsup.launch.config import TorchrunConfig
from selfsup.launch.torchrun import MULTI_NODE_DEFAULT_PORT, check_gpus, rendezvous, worker_command

CLI = ["device=cpu", "loader.num_workers=0", "log.tensorboard=false", "log.progress=false"]
QUICK = tiny("simclr") + ["knn.enabled=false", "log.interval=1"] + CLI  # 64 images, 16 per step: 4 steps
# two epochs of 4 steps, reproducible: what the stop-and-resume tests compare bit for bit
STEPS = QUICK + ["schedule.epochs=2", "deterministic=true"]
TORCHRUN2 = ["launcher=torchrun", "launcher.nproc_per_node=2"]
HALF_BATCH = ["schedule.batch_size=8"]  # per process: 2 processes x 8 = the 1-process batch of 16

# variables that would make a test's run something else than a plain local command


# ---------------------------------------------------------------------------------------------- helpers


def _descendants(pid: int) -> list[int]:
    """The processes ``pid`` started, and theirs (torchrun's workers run in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@contextlib.contextmanager
def _processes() -> Iterator[list[subprocess.Popen]]:
    """Commands started in the block; any still running at its end are killed, with their workers."""
    procs: list[subprocess.Popen] = []
    try:
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                for pid in reversed(_descendants(proc.pid)):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.communicate(timeout=10)


def _start(procs: list[subprocess.Popen], args: list[str], cwd: Path, **env: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "selfsup.train", *args],
        cwd=cwd,
        env=launch_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    procs.append(proc)
    return proc


def _finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _run(args: list[str], cwd: Path, timeout: float = 240, **env: str) -> tuple[int, str, str]:
    with _processes() as procs:
        return _finish(_start(procs, args, cwd, **env), timeout)


def _wait_for(proc: subprocess.Popen, text: str) -> list[str]:
    """Read the command's output until a line holds ``text`` (training is under way); the lines read."""
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if text in line:
            return seen
    return seen  # it ended first: the caller's assertions show its output


def _runs(cwd: Path) -> list[Path]:
    root = cwd / "outputs" / "simclr"
    return sorted(root.iterdir()) if root.is_dir() else []


def _status(run_dir: Path) -> dict:
    return json.loads((run_dir / "status.json").read_text())


def _ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = _ckpt(a)["model"], _ckpt(b)["model"]
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _train_steps(run_dir: Path) -> list[int]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if r["kind"] == "train"]


def _announced_run_dir(out: str, where: str) -> Path:
    """The run dir in ``torchrun: N worker(s) on node R of N, rendezvous ADDR:PORT, run dir DIR``, the line
    the command logs (``where``: a pattern for what precedes ", run dir")."""
    found = re.search(where + r", run dir (\S+)", out)
    assert found, out[-3000:]
    return Path(found[1])


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("selfsup: error:")]


def _clear_env(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    """Unset ``names`` for this test and unset them again after it, even if the code under test sets them."""
    for name in names:
        monkeypatch.setenv(name, "")  # records the original state (absent or a value) for the undo
        monkeypatch.delenv(name)


# ---------------------------------------------------------------------------------------------- torchrun: one machine
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_torchrun_launcher_runs_two_workers_in_one_run_dir_like_one_process(tmp_path):
    """``launcher=torchrun launcher.nproc_per_node=2``: the command starts its 2 workers itself; they write
    one run dir (the command's), which says finished with world size 2, and train the weights of 1 process
    with the same global batch (SyncBN, same views; bounds as in test_distributed.py: float rounding after
    the first step, 1% of the update after the second)."""
    common = QUICK + [
        "dataset.num_samples=16",  # one step per epoch
        "schedule.epochs=2",
        "algo.optimizer.name=sgd",
        "algo.optimizer.lr=0.5",
        "sync_bn=true",
        "backbone.zero_init_residual=true",
    ]
    code, out, err = _run([*common, *TORCHRUN2, *HALF_BATCH], tmp_path)
    assert code == 0, (out + err)[-5000:]
    runs = _runs(tmp_path)
    assert len(runs) == 1, runs  # the workers' own run dirs were not left behind
    run = runs[0]
    assert _announced_run_dir(out, r"on node 0 of 1, rendezvous 127\.0\.0\.1:\d+") == run  # the command's own dir
    status = _status(run)
    assert (status["status"], status["launcher"], status["world_size"], status["steps"]) == (
        "finished",
        "torchrun",
        2,
        2,
    )
    assert "| 2 process(es) on cpu | fp32 | global batch 16 (8 per process x 2" in (run / "train.log").read_text()

    from selfsup.engine.trainer import Trainer

    trainer = Trainer(compose_cfg([*common, "schedule.batch_size=16"]), tmp_path / "one")
    init = {k: v.clone() for k, v in trainer.algo.state_dict().items()}
    assert trainer.fit().steps == 2
    # after step 1 float precision; step 2 amplifies rounding (BatchNorm over 1x1 maps in layer4) by an amount
    # that depends on the thread counts and images (1.6% seen): 3%, as in tests/test_distributed.py
    for epoch, bound in ((1, 1e-4), (2, 3e-2)):
        two, ref = _ckpt(run / f"epoch_{epoch:04d}.pt"), _ckpt(tmp_path / "one" / f"epoch_{epoch:04d}.pt")
        assert two["meta"]["world_size"] == 2 and len(two["rng"]) == 2 and ref["meta"]["world_size"] == 1
        assert (two["epoch"], two["step"]) == (ref["epoch"], ref["step"]) == (epoch, epoch)
        errors = relative_update_error(init, ref["model"], two["model"])
        assert len(errors) > 70
        worst = max(errors, key=errors.get)
        assert errors[worst] < bound, f"after step {epoch}: {worst} differs by {errors[worst]:.2e} of its update"


@pytest.fixture(scope="module")
def concurrent_runs(tmp_path_factory) -> tuple[Path, list[tuple[int, str, str]]]:
    """Two ``launcher=torchrun launcher.nproc_per_node=2`` runs of STEPS started side by side in one
    directory, ports picked by themselves: their (exit status, stdout, stderr)."""
    cwd = tmp_path_factory.mktemp("concurrent")
    with _processes() as procs:
        for _ in range(2):
            _start(procs, [*STEPS, *TORCHRUN2, *HALF_BATCH], cwd)
        results = [_finish(p, 400) for p in procs]
    return cwd, results


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_two_torchrun_runs_side_by_side_pick_their_own_ports(concurrent_runs):
    cwd, results = concurrent_runs
    for code, out, err in results:
        assert code == 0, (out + err)[-5000:]
    ports = [re.findall(r"rendezvous 127\.0\.0\.1:(\d+)", out) for _, out, _ in results]
    assert len(ports[0]) == len(ports[1]) == 1 and ports[0] != ports[1], ports
    runs = _runs(cwd)
    assert len(runs) == 2, runs  # one dir per run, not one per worker
    for run in runs:
        status = _status(run)
        assert (status["status"], status["world_size"], status["steps"]) == ("finished", 2, 8)
        assert _train_steps(run) == list(range(1, 9))
    # same config, deterministic: nothing of one run leaked into the other
    assert _same_weights(runs[0] / "last.pt", runs[1] / "last.pt")


# ---------------------------------------------------------------------------------------------- torchrun: two nodes
NodeResults = dict[str, tuple[Path, int, list[tuple[int, str, str]]]]


@pytest.fixture(scope="module")
def two_node_runs(tmp_path_factory) -> NodeResults:
    """Per way of naming the nodes: 2 commands (node 0 and node 1, one worker each) forming one run, in a
    directory of their own: (that directory, the port, each node's (status, stdout, stderr)). Both pairs
    run side by side."""
    common = [*QUICK, "dataset.num_samples=32", "launcher=torchrun", "launcher.nproc_per_node=1", *HALF_BATCH]
    started: dict[str, tuple[Path, int, list[subprocess.Popen]]] = {}
    with _processes() as procs:
        for how in ("overrides", "environment"):
            cwd, port = tmp_path_factory.mktemp(how), free_port()
            for node in (0, 1):
                if how == "overrides":
                    args = [
                        "launcher.nnodes=2",
                        f"launcher.node_rank={node}",
                        "dist.addr=127.0.0.1",
                        f"dist.port={port}",
                    ]
                    _start(procs, [*common, *args], cwd)
                else:  # the seed's variables
                    env = {"NNODES": "2", "NODE_RANK": str(node), "MASTER_ADDR": "127.0.0.1", "PORT": str(port)}
                    _start(procs, common, cwd, **env)
            started[how] = (cwd, port, procs[-2:])
        return {how: (cwd, port, [_finish(p, 300) for p in pair]) for how, (cwd, port, pair) in started.items()}


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("how", ["overrides", "environment"])
def test_two_nodes_on_localhost_form_one_run(two_node_runs, how):
    """Node 0 and node 1 started as two commands (``launcher.nnodes=2 launcher.node_rank=R dist.addr=...
    dist.port=...``, or NNODES / NODE_RANK / MASTER_ADDR / PORT): one run of world size 2 in node 0's run
    dir; node 1's own dir (which only held what Hydra wrote) is gone."""
    cwd, port, results = two_node_runs[how]
    for node, (code, out, err) in enumerate(results):
        assert code == 0, f"node {node}:\n" + (out + err)[-5000:]
    node0_dir, node1_dir = (
        _announced_run_dir(results[n][1], rf"on node {n} of 2, rendezvous 127\.0\.0\.1:{port}") for n in (0, 1)
    )
    assert _runs(cwd) == [node0_dir]
    assert not node1_dir.exists()
    ckpt = _ckpt(node0_dir / "last.pt")
    assert ckpt["meta"]["world_size"] == 2 and len(ckpt["rng"]) == 2 and ckpt["step"] == 2
    status = _status(node0_dir)
    assert (status["status"], status["world_size"]) == ("finished", 2)


# ---------------------------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def bad_launches(tmp_path_factory) -> dict[str, tuple[int, str, str, int]]:
    """Commands that must fail before any training, started side by side: (status, stdout, stderr, port held)."""
    cwd = tmp_path_factory.mktemp("bad")
    base = ["dataset=fake", "dataset.num_samples=32", "schedule.epochs=1", *CLI]
    with socket.socket() as held:  # another job's rendezvous
        held.bind(("", 0))
        held.listen()
        port = int(held.getsockname()[1])
        cases: dict[str, tuple[list[str], dict[str, str]]] = {
            "port in use: dist.port": ([*TORCHRUN2, f"dist.port={port}"], {}),
            "port in use: PORT": (TORCHRUN2, {"PORT": str(port)}),
            "NNODES without MASTER_ADDR": (["launcher=torchrun"], {"NNODES": "2"}),
            "node rank out of range": (
                ["launcher=torchrun", "launcher.nnodes=2", "launcher.node_rank=2", "dist.addr=127.0.0.1"],
                {},
            ),
            "port out of range": (["launcher=torchrun", "dist.port=70000"], {}),
            "no workers": (["launcher=torchrun", "launcher.nproc_per_node=0"], {}),
        }
        with _processes() as procs:
            started = {name: _start(procs, [*base, *args], cwd, **env) for name, (args, env) in cases.items()}
            return {name: (*_finish(proc, 240), port) for name, proc in started.items()}


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "case, expected",
    [
        ("port in use: dist.port", "dist.port="),
        ("port in use: PORT", "dist.port="),
        ("NNODES without MASTER_ADDR", "pass dist.addr=<host of node 0> (or set MASTER_ADDR)"),
        ("node rank out of range", "launcher.node_rank"),
        ("port out of range", "dist.port must be a TCP port number in 1-65535, got 70000"),
        ("no workers", "launcher.nproc_per_node must be >= 1, got 0"),
    ],
)
def test_bad_launcher_input_is_one_line_and_status_2(bad_launches, case, expected):
    code, out, err, port = bad_launches[case]
    lines = _error_lines(err)
    assert code == 2 and len(lines) == 1, (out + err)[-3000:]
    assert expected in lines[0] and "Traceback" not in err
    if case.startswith("port in use"):
        assert f"port {port} is already in use" in lines[0]
    assert "step 1/" not in out  # no worker trained


# ---------------------------------------------------------------------------------------------- stop signal + resume
def _resume_command(line: str) -> list[str]:
    """The arguments of the ``continue with: python -m selfsup.train ...`` the message gives."""
    words = shlex.split(line.split("continue with: ", 1)[1])
    assert words[:3] == ["python", "-m", "selfsup.train"] and words[-1] == "resume=auto", words
    return words[3:]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_sigterm_stops_with_a_checkpoint_and_resume_auto_equals_an_uninterrupted_run(tmp_path):
    """``kill -TERM`` in the middle of epoch 1: status 143, one line that says where it stopped and how to
    continue, status.json ``preempted``, last.pt of that step; the command it prints ends with the weights
    of the run that was never stopped, bit for bit, and each step's record once."""
    run = tmp_path / "run"
    with _processes() as procs:
        straight = _start(procs, [*STEPS, f"hydra.run.dir={tmp_path / 'straight'}"], tmp_path)
        stopped = _start(procs, [*STEPS, f"hydra.run.dir={run}"], tmp_path)
        seen = _wait_for(stopped, "epoch 1/2 step 1/4")
        stopped.send_signal(signal.SIGTERM)
        code, out, err = _finish(stopped)
        assert code == 143, "".join(seen)[-3000:] + out[-3000:] + err[-3000:]
        assert _finish(straight)[0] == 0
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("selfsup:")]
    assert len(lines) == 1 and lines[0].startswith("selfsup: stopped by SIGTERM at epoch 1, step "), err[-3000:]
    ckpt = _ckpt(run / "last.pt")
    assert (ckpt["epoch"], ckpt["meta"]["world_size"]) == (0, 1) and 1 <= ckpt["step"] < 4  # in the middle of epoch 1
    assert f"step {ckpt['step']}: saved {run / 'last.pt'}; continue with: " in lines[0]
    status = _status(run)
    assert status["status"] == "preempted" and status["error"] in lines[0]

    resume = _resume_command(lines[0])
    assert resume == [*STEPS, f"hydra.run.dir={run}", "resume=auto"]
    code, out, err = _run(resume, tmp_path)
    assert code == 0, (out + err)[-5000:]
    assert f"resumed from {run / 'last.pt'} (epoch 0, step {ckpt['step']} of 8)" in out
    assert _status(run)["status"] == "finished"
    assert _same_weights(run / "last.pt", tmp_path / "straight" / "last.pt")
    assert _train_steps(run) == list(range(1, 9))


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_sigterm_to_the_torchrun_launcher_stops_its_workers_and_resume_equals_an_uninterrupted_run(
    tmp_path, concurrent_runs
):
    """SIGTERM to the command that started 2 workers: they stop at one step with a checkpoint of it, the
    command exits 143; the same command with resume=auto trains the weights of an uninterrupted 2-process
    run (one of ``concurrent_runs``) bit for bit."""
    cwd, results = concurrent_runs
    assert results[0][0] == 0, "the uninterrupted runs failed (see test_two_torchrun_runs_side_by_side_...)"
    reference = _runs(cwd)[0] / "last.pt"
    run = tmp_path / "run"
    args = [*STEPS, *TORCHRUN2, *HALF_BATCH, f"hydra.run.dir={run}"]
    with _processes() as procs:
        proc = _start(procs, args, tmp_path)
        seen = _wait_for(proc, "epoch 1/2 step 1/4")
        proc.send_signal(signal.SIGTERM)
        code, out, err = _finish(proc)
    assert code == 143, "".join(seen)[-3000:] + out[-3000:] + err[-3000:]
    assert "Traceback" not in err and not _error_lines(err)
    ckpt = _ckpt(run / "last.pt")
    assert ckpt["meta"]["world_size"] == 2 and ckpt["epoch"] == 0 and 1 <= ckpt["step"] < 4, ckpt["step"]
    lines = [line for line in err.splitlines() if line.startswith("selfsup: stopped by SIGTERM")]
    assert lines and all(f"at epoch 1, step {ckpt['step']}: saved {run / 'last.pt'}" in line for line in lines)
    assert _status(run)["status"] == "preempted"

    resume = _resume_command(lines[0])
    assert resume == [*args, "resume=auto"]  # the same command, in the same dir
    code, out, err = _run(resume, tmp_path, timeout=300)
    assert code == 0, (out + err)[-5000:]
    status = _status(run)
    assert (status["status"], status["world_size"], status["steps"]) == ("finished", 2, 8)
    assert _same_weights(run / "last.pt", reference)
    assert _train_steps(run) == list(range(1, 9))


def test_a_stop_in_the_middle_of_an_epoch_keeps_the_last_epoch_checkpoint(tmp_path, monkeypatch):
    from selfsup.engine.trainer import Trainer
    from selfsup.errors import TrainingPreempted

    trainer = Trainer(compose_cfg(QUICK + ["dataset.num_samples=32", "schedule.epochs=2"]), tmp_path)  # 2 steps/epoch
    after_step = trainer.algo.after_step

    def term_at_3(state):  # step 1 of epoch 2
        if state.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return after_step(state)

    monkeypatch.setattr(trainer.algo, "after_step", term_at_3)
    with pytest.raises(TrainingPreempted, match="stopped by SIGTERM at epoch 2, step 3"):
        trainer.fit()
    assert _ckpt(tmp_path / "last.pt")["step"] == 3
    assert _ckpt(tmp_path / "epoch_0001.pt")["step"] == 2  # the end of epoch 1, as it was


# ---------------------------------------------------------------------------------------------- sweep
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_sweep_runs_every_member_and_summarises_the_failed_one(tmp_path):
    """``-m`` whose first member fails in the trainer (a batch larger than the data): the next one still runs
    and finishes, the sweep exits 1 and prints (and writes) a table with both, the failure's one line and
    its log."""
    quick = [o for o in QUICK if not o.startswith("schedule.batch_size=")]
    args = ["-m", *quick, "dataset.num_samples=32", "schedule.batch_size=100000,16"]
    code, out, err = _run(args, tmp_path)
    assert code == 1, (out + err)[-5000:]
    assert "Traceback" not in out + err
    (sweep_dir,) = (tmp_path / "multirun").iterdir()
    members = sorted(p for p in sweep_dir.iterdir() if (p / ".hydra").is_dir())
    assert len(members) == 2
    for num, member in enumerate(members):
        overrides = yaml.safe_load((member / ".hydra" / "overrides.yaml").read_text())
        assert member.name == member_dir(num, overrides) and member.name.startswith(f"{num}_")
    bad, good = members
    assert _status(good)["status"] == "finished" and (good / "last.pt").is_file()
    assert _status(bad)["status"] == "failed" and not (bad / "last.pt").exists()

    assert "1 of 2 member(s) finished" in out
    rows = [line for line in out.splitlines() if line.startswith(("| 0 |", "| 1 |"))]
    assert len(rows) == 2
    assert "schedule.batch_size=100000 | failed | 0/1 |" in rows[0] and bad.name in rows[0]
    assert "schedule.batch_size=16 | finished | 1/1 |" in rows[1] and good.name in rows[1]
    error = "one optimizer step needs 100000 images"
    (bullet,) = [line for line in out.splitlines() if line.startswith("- member ")]
    assert bullet.startswith("- member 0 (failed): ")
    assert error in bullet and f"(log: {bad / 'train.log'})" in bullet

    assert (sweep_dir / "summary.md").read_text().count("\n| ") == 2 + 1  # header + 2 rows
    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert [(r["member"], r["status"]) for r in summary] == [("0", "failed"), ("1", "finished")]
    assert error in summary[0]["error"] and summary[0]["log"] == str(bad / "train.log")


def _member(sweep_dir: Path, name: str, overrides: list[str], **status) -> Path:
    path = sweep_dir / name
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if status:
        (path / "status.json").write_text(json.dumps(status))
    return path


def test_sweep_summary_of_member_dirs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sweep, "failed_members", [])
    monkeypatch.setattr(sweep, "_pending", {})
    _member(
        tmp_path,
        "0_seed=0",
        ["seed=0"],
        status="finished",
        epochs_done=2,
        epochs=2,
        final_loss=1.23456,
        knn_after={"top1": 0.9},
    )
    _member(tmp_path, "1_seed=1", ["seed=1"], status="failed", epochs=2, error="boom", log="/logs/1.log")
    _member(tmp_path, "2_seed=2", ["seed=2"], status="running", epochs_done=1, epochs=2)  # killed: never said
    _member(tmp_path, "10_x=a|b", ["x=a|b"])  # died before it wrote anything
    (tmp_path / ".submitit").mkdir()  # not a member

    rows = sweep.summarize(tmp_path)
    assert [(r["member"], r["status"]) for r in rows] == [
        ("0", "finished"),
        ("1", "failed"),
        ("2", "crashed"),
        ("10", "crashed"),
    ]
    assert rows[0]["epochs"] == "2/2" and rows[0]["final_loss"] == 1.23456 and rows[0]["knn_top1"] == 0.9
    assert "error" not in rows[0]
    assert (rows[1]["error"], rows[1]["log"]) == ("boom", "/logs/1.log")
    assert "killed?" in rows[2]["error"] and rows[2]["log"] == str(tmp_path / "2_seed=2" / "train.log")
    assert rows[3]["overrides"] == "x=a|b" and rows[3]["epochs"] == "0/?"

    text = sweep.to_markdown(rows)
    lines = text.splitlines()
    assert lines[0] == "| " + " | ".join(sweep.SUMMARY_FIELDS) + " |"
    assert lines[2] == f"| 0 | seed=0 | finished | 2/2 | 1.2346 | 0.9000 | {tmp_path / '0_seed=0'} |"
    escaped = str(tmp_path / "10_x=a|b").replace("|", "\\|")  # a '|' in a cell would split it
    assert f"| 10 | x=a\\|b | crashed | 0/? | - | - | {escaped} |" in lines
    assert "- member 1 (failed): boom (log: /logs/1.log)" in lines
    assert sum(line.startswith("- member ") for line in lines) == 3

    assert sweep.main([str(tmp_path)]) == 1  # ``python -m selfsup.launch.sweep DIR``
    assert json.loads((tmp_path / "summary.json").read_text()) == rows
    assert "1 of 4 member(s) finished" in capsys.readouterr().out
    assert sweep.failed_members == ["1", "2", "10"]
    assert sweep.main([str(tmp_path / "nothing")]) == 2

    # a sweep submitted without waiting: its members have not ended yet
    monkeypatch.setitem(sweep._pending, str(tmp_path), True)
    assert [r["status"] for r in sweep.summarize(tmp_path)] == ["finished", "failed", "running", "submitted"]


# -------------------------------------------------------------------------------------- unit: names, ports, nodes
def test_member_dir_names():
    assert member_dir(3, ["algo=odc", "schedule.epochs=2"]) == "3_algo=odc,schedule.epochs=2"
    # execution settings do not name a member
    execution = [
        "launcher=torchrun",
        "launcher.nproc_per_node=2",
        "hydra.run.dir=x",
        "dist.port=1234",
        "loader.num_workers=4",
        "log.interval=1",
        "resume=auto",
        "overwrite=true",
        "device=cpu",
        "+hydra.job.env_set.A=1",
    ]
    assert member_dir(0, [*execution, "seed=1"]) == "0_seed=1"
    assert member_dir(7, execution) == "7"
    assert member_dir(1, ["dataset.root=/data/in1k/train"]) == "1_dataset.root=%data%in1k%train"
    # long names are cut, with a hash of the whole: two members never share a directory
    long = [f"dataset.root=/{'d' * 120}", "backbone=resnet50"]
    a, b = member_dir(2, [*long, "seed=0"]), member_dir(2, [*long, "seed=1"])
    assert a != b and len(a) <= 2 + 100 and len(b) <= 2 + 100 and "/" not in a + b
    assert a.startswith("2_dataset.root=%ddd") and a == member_dir(2, [*long, "seed=0"])


def test_configured_port_prefers_dist_port_then_port_then_master_port(monkeypatch):
    _clear_env(monkeypatch, "PORT", "MASTER_PORT")
    assert distributed.configured_port(None) == (None, "")
    monkeypatch.setenv("MASTER_PORT", "23456")
    assert distributed.configured_port(None) == (23456, "$MASTER_PORT")
    monkeypatch.setenv("PORT", "12345")
    assert distributed.configured_port(None) == (12345, "$PORT")
    assert distributed.configured_port(34567) == (34567, "dist.port")
    monkeypatch.setenv("PORT", "")  # empty = unset
    assert distributed.configured_port(None) == (23456, "$MASTER_PORT")
    monkeypatch.setenv("PORT", "99999")
    with pytest.raises(ConfigError, match=r"PORT='99999' is not a port number"):
        distributed.configured_port(None)


def test_torchrun_nodes_from_config_or_environment(monkeypatch):
    _clear_env(monkeypatch, "NNODES", "NODE_RANK")
    assert TorchrunConfig().resolved_nodes() == (1, 0)
    monkeypatch.setenv("NNODES", "3")
    monkeypatch.setenv("NODE_RANK", "2")
    assert TorchrunConfig().resolved_nodes() == (3, 2)
    assert TorchrunConfig(nnodes=2, node_rank=1).resolved_nodes() == (2, 1)  # the config wins
    monkeypatch.setenv("NODE_RANK", "3")
    with pytest.raises(ConfigError, match=r"node rank 3 is not in 0..2: set launcher.node_rank \(or NODE_RANK\)"):
        TorchrunConfig().resolved_nodes()
    monkeypatch.setenv("NNODES", "two")
    with pytest.raises(ConfigError, match="NNODES='two' is not an integer"):
        TorchrunConfig().resolved_nodes()
    with pytest.raises(ConfigError, match="launcher.nproc_per_node must be >= 1"):
        TorchrunConfig(nproc_per_node=0)


def test_rendezvous_address_and_port(monkeypatch):
    _clear_env(monkeypatch, "NNODES", "NODE_RANK", "MASTER_ADDR", "PORT", "MASTER_PORT")
    nnodes, node_rank, addr, port = rendezvous(TorchrunConfig(), None, None)  # one machine: a free port
    assert (nnodes, node_rank, addr) == (1, 0, "127.0.0.1") and not distributed.port_in_use(port)
    with pytest.raises(ConfigError, match=r"2 nodes need node 0's address on every node: pass dist.addr="):
        rendezvous(TorchrunConfig(nnodes=2, node_rank=1), None, None)
    monkeypatch.setenv("MASTER_ADDR", "node0.example")
    # several machines must agree on a port without talking: torchrun's default, unless one is given
    assert rendezvous(TorchrunConfig(nnodes=2, node_rank=1), None, None) == (2, 1, "node0.example", 29500)
    assert MULTI_NODE_DEFAULT_PORT == 29500
    assert rendezvous(TorchrunConfig(nnodes=2, node_rank=1), "10.0.0.1", 4321) == (2, 1, "10.0.0.1", 4321)
    with socket.socket() as held:
        held.bind(("", 0))
        held.listen()
        taken = held.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"port {taken} is already in use .* dist.port=\d+"):
            rendezvous(TorchrunConfig(), None, taken)
        monkeypatch.setenv("PORT", str(taken))
        with pytest.raises(ConfigError, match=rf"port {taken} is already in use"):
            rendezvous(TorchrunConfig(), None, None)


def test_check_gpus_refuses_more_workers_than_visible_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for device in ("auto", "cuda"):
        with pytest.raises(ConfigError, match=r"launcher.nproc_per_node=2 but 1 GPU\(s\) are visible"):
            check_gpus(TorchrunConfig(nproc_per_node=2), device)
        check_gpus(TorchrunConfig(nproc_per_node=1), device)
    check_gpus(TorchrunConfig(nproc_per_node=2), "cpu")  # CPU workers need no GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    check_gpus(TorchrunConfig(nproc_per_node=4), "auto")


def test_worker_command_runs_the_same_overrides_in_the_run_dir():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for name in ("a dir, with 'quotes' = and \\ backslash", "x\\'y", "z\\\\", "$HOME [1] {a: 2}"):
        run_dir = Path("/tmp") / name
        args = worker_command(run_dir, ["algo=odc", "hydra.run.dir=elsewhere", "seed=1"], ["--config-dir", "/c"])
        assert args[:-1] == ["-m", "selfsup.train", "--config-dir", "/c", "algo=odc", "seed=1"]
        (override,) = parser.parse_overrides([args[-1]])
        assert (override.key_or_group, override.value()) == ("hydra.run.dir", str(run_dir)), args[-1]


# ---------------------------------------------------------------------------------------------- unit: SLURM's variables
SLURM_TASK = {  # task 1 of an srun step of 2 tasks, on the job's 2 nodes
    "SLURM_PROCID": "1",
    "SLURM_LOCALID": "1",
    "SLURM_STEP_NUM_TASKS": "2",
    "SLURM_JOB_NODELIST": "node[03-04]",
    "SLURM_JOB_ID": "1234",
    "SLURM_NNODES": "1",
}
_EXPORTED = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def slurm_task(monkeypatch):
    _clear_env(monkeypatch, *_EXPORTED, "PORT", "SLURM_STEP_NUM_NODES", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID")
    for name, value in SLURM_TASK.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")  # what launcher=slurm's jobs run with
    return monkeypatch


def _exported() -> dict[str, str]:
    return {name: os.environ[name] for name in _EXPORTED}


def test_slurm_task_is_recognised_and_exports_torch_variables(slurm_task):
    assert distributed.launcher_of_this_process() == "slurm"
    distributed._export_slurm_env(None, None)
    exported = _exported()
    port = int(exported.pop("MASTER_PORT"))
    assert exported == {
        "RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "node03",  # the first host of the job
    }
    # no port given: one derived from the job id (the same in every task of the job), in 20000-60000
    assert 20000 <= port <= 60000
    slurm_task.delenv("MASTER_PORT")
    distributed._export_slurm_env(None, None)
    assert int(os.environ["MASTER_PORT"]) == port
    slurm_task.delenv("MASTER_PORT")
    slurm_task.setenv("SLURM_JOB_ID", "1235")
    distributed._export_slurm_env(None, None)
    assert int(os.environ["MASTER_PORT"]) != port  # another job, another port
    # dist.addr names the master
    distributed._export_slurm_env("10.1.2.3", None)
    assert os.environ["MASTER_ADDR"] == "10.1.2.3"
    # 2 nodes x 2 tasks: the 4th task is rank 3, local rank 1 on the second node
    for name, value in {"SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_NUM_NODES": "2"}.items():
        slurm_task.setenv(name, value)
    distributed._export_slurm_env(None, None)
    exported = _exported()
    assert [exported[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")] == ["3", "4", "1", "2"]


def test_slurm_port_prefers_dist_port_then_port_then_master_port(slurm_task):
    slurm_task.setenv("MASTER_PORT", "23456")
    distributed._export_slurm_env(None, None)
    assert os.environ["MASTER_PORT"] == "23456"
    slurm_task.setenv("PORT", "12345")
    distributed._export_slurm_env(None, None)
    assert os.environ["MASTER_PORT"] == "12345"
    distributed._export_slurm_env(None, 34567)
    assert os.environ["MASTER_PORT"] == "34567"


def test_slurm_local_world_from_the_step_nodes(slurm_task):
    slurm_task.setenv("SLURM_STEP_NUM_TASKS", "8")
    slurm_task.setenv("SLURM_STEP_NUM_NODES", "2")
    slurm_task.setenv("SLURM_PROCID", "5")
    distributed._export_slurm_env(None, None)
    exported = _exported()
    assert [exported[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")] == ["5", "8", "1", "4"]


def test_which_launcher_started_this_process(slurm_task):
    slurm_task.delenv("SLURM_STEP_NUM_TASKS")  # a batch script's own shell: not a task of a step
    assert distributed.launcher_of_this_process() == "local"
    slurm_task.setenv("SLURM_STEP_NUM_TASKS", "1")  # a step of one task
    assert distributed.launcher_of_this_process() == "local"
    slurm_task.setenv("SLURM_STEP_NUM_TASKS", "2")
    assert distributed.launcher_of_this_process() == "slurm"
    slurm_task.setenv("RANK", "0")
    slurm_task.setenv("WORLD_SIZE", "2")
    assert distributed.launcher_of_this_process() == "torchrun"  # torchrun inside an srun step: torchrun's


def test_a_plain_srun_task_without_submitit_exports_torch_variables(slurm_task):
    slurm_task.delenv("SUBMITIT_EXECUTOR")
    assert distributed.launcher_of_this_process() == "slurm"
    distributed._export_slurm_env(None, None)
    assert (os.environ["RANK"], os.environ["MASTER_ADDR"]) == ("1", "node03")
