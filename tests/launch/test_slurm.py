"""``launcher=slurm`` on a real SLURM cluster: sbatch -> srun -> ``python -m selfsup.train`` in the job.

The cluster is the one-node loopback cluster of ``../shared/slurm/slurm-up.sh`` (slurmctld, slurmd and
slurmdbd, so ``sacct`` works); ``make slurm-up`` starts it. Without one these tests skip, saying how to
start it; CI (``.ci/run``) starts it and sets ``SELFSUP_REQUIRE_SLURM=1``, which turns the skip into a
failure. ``SLURM_UP_CPUS=4`` lets two 2-task jobs run side by side on the 2-core machine.

Every test runs the command line as a user would, from its own ``tmp_path`` (its own multirun dir and
submitit folder: job ids restart at 1 when the cluster's state is wiped, and a reused folder would hand
back an old job's result), on 64 fake 32 px images with a small SimCLR head, one thread per task.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch

from conftest import FAST, compose_cfg, launch_env, relative_update_error, tiny
from selfsup.distributed import free_port
from selfsup.engine import checkpoint as ckpt_io

QUICK = tiny("simclr") + FAST + ["knn.enabled=false"]  # 64 images, 16 per step: 4 steps per epoch
SLURM = ["launcher=slurm", "launcher.wait=true", "launcher.cpus_per_task=1", "launcher.timeout_min=10"]
UP = "sudo SLURM_UP_CPUS=4 bash ../shared/slurm/slurm-up.sh (or: make slurm-up)"


# ---------------------------------------------------------------------------------------------- fixture
def _slurm_problem() -> str | None:
    """Why there is no usable SLURM cluster here (None when there is one)."""
    if shutil.which("sbatch") is None:
        return "sbatch is not on PATH"
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"sinfo failed: {e}"
    states = proc.stdout.split()
    # "completing": a node still cleaning up after the previous test's job; it takes the next one (queued)
    up = ("idle", "mixed", "allocated", "completing")
    if proc.returncode != 0 or not any(s.rstrip("*~#") in up for s in states):
        reply = " ".join((proc.stdout + proc.stderr).split())[:200] or "nothing"
        return f"no SLURM node is up (sinfo -h -o %T says: {reply})"
    return None


@pytest.fixture
def slurm() -> None:
    """A SLURM cluster that takes jobs: else skip (fail under SELFSUP_REQUIRE_SLURM=1, as in CI).

    (Here and not in a ``tests/launch/conftest.py``: ``tests/`` is no package, so a second conftest module
    would replace the top-level one that the test modules import with ``from conftest import ...``.)"""
    problem = _slurm_problem()
    if problem is None:
        return
    if os.environ.get("SELFSUP_REQUIRE_SLURM") == "1":
        pytest.fail(f"no SLURM cluster ({problem}); SELFSUP_REQUIRE_SLURM=1 makes this a failure", pytrace=False)
    pytest.skip(f"no SLURM cluster ({problem}); start one with: {UP}")


# ---------------------------------------------------------------------------------------------- helpers


def _cmd(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "selfsup.train", *args]


def _run(args: list[str], cwd: Path, timeout: float = 150, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(args), cwd=cwd, env=launch_env(**env), capture_output=True, text=True, timeout=timeout)


_STARTED: list[subprocess.Popen] = []  # this test's commands, stopped at its end if still running


def _popen(args: list[str], cwd: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        _cmd(args), cwd=cwd, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    _STARTED.append(proc)
    return proc


@pytest.fixture(autouse=True)
def _no_leftovers(tmp_path):
    """After each test (a failed one above all): stop its commands still running and cancel its jobs, so
    that they hold no CPUs of the node the next test needs."""
    yield
    for proc in _STARTED:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    _STARTED.clear()
    ids = {p.name.split("_")[0] for p in tmp_path.rglob(".submitit/*") if p.name.split("_")[0].isdigit()}
    if ids and shutil.which("scancel"):
        subprocess.run(["scancel", *sorted(ids)], capture_output=True)


def _out(proc: subprocess.CompletedProcess | tuple[str, str]) -> str:
    out, err = (proc.stdout, proc.stderr) if isinstance(proc, subprocess.CompletedProcess) else proc
    return f"--- stdout\n{out[-4000:]}\n--- stderr\n{err[-4000:]}"


def _jobs(stdout: str, cwd: Path) -> list[dict]:
    """What the launcher printed about each job: number, job id, run dir, stdout and stderr logs."""
    found = re.findall(r"#(\d+) job (\S+): .*\n\s+run dir: (.+)\n\s+logs:\s+(\S+) / (\S+)", stdout)
    return [
        {"num": int(n), "job_id": j, "run_dir": cwd / d.strip(), "stdout": Path(o), "stderr": Path(o).parent / e}
        for n, j, d, o, e in found
    ]


def _sweep_dir(stdout: str, cwd: Path) -> Path:
    match = re.search(r"; sweep dir (\S+)", stdout)
    assert match, stdout
    return cwd / match.group(1)


def _status(run_dir: Path) -> dict:
    return json.loads((run_dir / "status.json").read_text())


def _records(run_dir: Path, kind: str = "train") -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def _sacct(job_id: str, fields: str = "State") -> str:
    """Fields of the job's allocation in SLURM's accounting, once it has ended there (slurmdbd lags a moment
    behind the job's end: End is "Unknown" and State RUNNING until then)."""
    value = ""
    for _ in range(60):
        proc = subprocess.run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", fields], capture_output=True, text=True)
        value = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
        if value and not set(value.split("|")) & {"RUNNING", "PENDING", "COMPLETING", "REQUEUED", "Unknown"}:
            return value
        time.sleep(0.25)
    return value


def _scontrol(job_id: str) -> dict[str, str]:
    proc = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True)
    return dict(re.findall(r"(\w+)=(\S*)", proc.stdout))


def _model(path: Path) -> dict[str, torch.Tensor]:
    return ckpt_io.load(path)["model"]


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, _out(proc)
    assert "Traceback" not in proc.stderr, _out(proc)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("selfsup: error:")]
    assert len(errors) == 1, _out(proc)
    return errors[0]


# ---------------------------------------------------------------------------------------------- 1. a single run
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_single_run_through_sbatch(slurm, tmp_path):
    """``launcher=slurm`` without -m: one job; the command names its id, logs and run dir, waits for it
    (launcher.wait=true) and exits 0; the run finished in its run dir and SLURM accounts it COMPLETED."""
    proc = _run(QUICK + SLURM, tmp_path)
    assert proc.returncode == 0, _out(proc)
    jobs = _jobs(proc.stdout, tmp_path)
    assert len(jobs) == 1, _out(proc)
    job = jobs[0]
    assert re.fullmatch(r"\d+", job["job_id"]), job  # a plain job, not an array task
    assert "submitted 1 job(s) to SLURM" in proc.stdout
    assert job["stdout"].name == f"{job['job_id']}_0_log.out" and job["stdout"].is_file(), job
    assert job["stderr"].name == f"{job['job_id']}_0_log.err" and job["stderr"].is_file(), job
    status = _status(job["run_dir"])
    assert status["status"] == "finished", status
    assert (status["launcher"], status["job_id"], status["world_size"]) == ("slurm", job["job_id"], 1), status
    assert status["epochs_done"] == 1 and status["steps"] == 4 and status["final_loss"] > 0, status
    assert (job["run_dir"] / "last.pt").is_file() and "finished SimCLR" in (job["run_dir"] / "train.log").read_text()
    assert _sacct(job["job_id"]) == "COMPLETED"


# ---------------------------------------------------------------------------------------------- 2. a sweep
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_sweep_with_a_failing_member_reports_both(slurm, tmp_path):
    """A 2-member job array whose second member asks for a batch larger than the data: the first finishes,
    the second fails in the job; the table names both (the failure with its error line and log), is
    written to summary.md / summary.json, and the command exits 1."""
    proc = _run(["-m", *QUICK, *SLURM, "schedule.batch_size=16,100000"], tmp_path)
    assert proc.returncode == 1, _out(proc)
    assert "Traceback" not in proc.stderr, _out(proc)
    jobs = _jobs(proc.stdout, tmp_path)
    assert [j["num"] for j in jobs] == [0, 1], _out(proc)
    assert jobs[0]["job_id"].endswith("_0") and jobs[1]["job_id"].endswith("_1"), jobs  # one job array
    good, bad = (_status(j["run_dir"]) for j in jobs)
    assert good["status"] == "finished" and good["epochs_done"] == 1, good
    assert bad["status"] == "failed", bad
    assert "schedule.batch_size=100000" in bad["overrides"] and "lower schedule.batch_size" in bad["error"], bad
    sweep_dir = _sweep_dir(proc.stdout, tmp_path)
    rows = json.loads((sweep_dir / "summary.json").read_text())
    assert [(r["member"], r["status"]) for r in rows] == [("0", "finished"), ("1", "failed")], rows
    assert rows[1]["error"] == bad["error"] and rows[1]["log"] == str(jobs[1]["run_dir"] / "train.log"), rows
    assert "error" not in rows[0], rows
    table = proc.stdout[proc.stdout.index(f"sweep {sweep_dir.relative_to(tmp_path)}: 1 of 2 member(s) finished") :]
    assert re.search(r"\| 0 \| .*schedule.batch_size=16 .*\| finished \|", table), table
    assert re.search(r"\| 1 \| .*schedule.batch_size=100000 .*\| failed \|", table), table
    assert f"- member 1 (failed): {bad['error']} (log: {rows[1]['log']})" in table, table
    md = (sweep_dir / "summary.md").read_text()
    assert "| finished |" in md and "| failed |" in md and bad["error"] in md


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_a_failing_task_of_a_two_task_job_ends_the_job(slurm, tmp_path):
    """Both tasks of a 2-task job fail (the batch exceeds the data): they exit instead of returning, srun's
    --kill-on-bad-exit ends the job (no task is left waiting in a collective), and the submitter reports
    the member failed with its error and log."""
    proc = _run([*QUICK, *SLURM, "launcher.tasks_per_node=2", "schedule.batch_size=100000"], tmp_path, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, _out(proc)
    (job,) = _jobs(proc.stdout, tmp_path)
    status = _status(job["run_dir"])
    assert status["status"] == "failed" and "lower schedule.batch_size" in status["error"], status
    assert f"job {job['job_id']} failed: {status['error']} (log: {status['log']})" in proc.stdout, _out(proc)
    assert _sacct(job["job_id"]) == "FAILED"


# ---------------------------------------------------------------------------------------------- 3. DDP in one job


# SyncBN, zero-initialised residual branches and one step per epoch: 2 tasks x 8 images train the weights of
# 1 process x 16 up to float summation order (the set-up of test_training_two_processes_equals_one_process)
DDP = (
    tiny("simclr")
    + FAST
    + [
        "knn.enabled=false",
        "dataset.num_samples=16",
        "schedule.epochs=2",
        "algo.optimizer.name=sgd",
        "algo.optimizer.lr=0.5",
        "sync_bn=true",
        "backbone.zero_init_residual=true",
        "deterministic=true",
    ]
)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_tasks_in_one_job_train_like_one_process(slurm, tmp_path):
    """``launcher.tasks_per_node=2``: one job whose 2 srun tasks form a gloo process group (ranks from
    SLURM's variables) and train, 8 images each, what one process trains on 16."""
    reference = _popen([*DDP, "schedule.batch_size=16", f"hydra.run.dir={tmp_path / 'one'}"], tmp_path)
    proc = _run([*DDP, *SLURM, "launcher.tasks_per_node=2", "schedule.batch_size=8"], tmp_path)
    ref_out = reference.communicate(timeout=150)
    assert proc.returncode == 0, _out(proc)
    assert reference.returncode == 0, _out(ref_out)
    (job,) = _jobs(proc.stdout, tmp_path)
    two_dir, one_dir = job["run_dir"], tmp_path / "one"
    status = _status(two_dir)
    assert status["status"] == "finished" and status["world_size"] == 2, status
    assert re.fullmatch(r"\S+:\d+", status["master"] or ""), status
    assert "| 2 process(es) on cpu | fp32 | global batch 16 (8 per process x 2" in (two_dir / "train.log").read_text()
    ckpt = ckpt_io.load(two_dir / "last.pt")
    assert ckpt["meta"]["world_size"] == 2 and len(ckpt["rng"]) == 2 and (ckpt["epoch"], ckpt["step"]) == (2, 2)

    init = compose_cfg([*DDP, "schedule.batch_size=16"])
    from selfsup.engine.trainer import Trainer

    init_weights = Trainer(init, tmp_path / "init").algo.state_dict()
    # the first step to float precision; after two, rounding amplified through BatchNorm (see
    # tests/test_distributed.py::test_training_two_processes_equals_one_process): 3% of the update
    for name, bound in (("epoch_0001.pt", 1e-4), ("last.pt", 3e-2)):
        errors = relative_update_error(init_weights, _model(one_dir / name), _model(two_dir / name))
        assert len(errors) > 70, name  # weights and BN statistics of backbone and heads moved
        worst = max(errors, key=errors.get)
        assert errors[worst] < bound, f"{name}: {worst} differs by {errors[worst]:.2e} of its update"
    one = _status(one_dir)
    assert one["world_size"] == 1 and one["steps"] == status["steps"] == 2, one
    assert status["final_loss"] == pytest.approx(one["final_loss"], rel=1e-5, abs=0), (status, one)


# ---------------------------------------------------------------------------------------------- 4. two jobs at once
TWO_TASKS = QUICK + SLURM + ["launcher.tasks_per_node=2", "dataset.num_samples=32"]  # one step of 2 x 16


def _assert_overlap(job_ids: list[str]) -> None:
    """The jobs ran at the same time on the one node (else a shared port would not have mattered)."""
    spans = [[datetime.fromisoformat(t) for t in _sacct(j, "Start,End").split("|")] for j in job_ids]
    (s0, e0), (s1, e1) = spans
    assert s0 <= e1 and s1 <= e0, f"jobs {job_ids} did not overlap: {spans} (start the cluster with SLURM_UP_CPUS=4)"


def _finished_two_task_runs(out: tuple[str, str], returncode: int | None, cwd: Path) -> list[tuple[dict, dict]]:
    assert returncode == 0, _out(out)
    found = []
    for job in _jobs(out[0], cwd):
        status = _status(job["run_dir"])
        assert status["status"] == "finished" and status["world_size"] == 2, status
        found.append((job, status))
    return found


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_jobs_on_one_node_use_their_own_ports(slurm, tmp_path):
    """Two 2-task jobs submitted side by side by two commands, each with its own ``dist.port``: both run at
    once and rendezvous on their own port. Without ``dist.port`` (a 2-member job array, its tasks running
    at once) each rendezvous on the port derived from its job id (submitit's rule), and those differ."""
    ports = [free_port(), free_port()]
    while ports[0] == ports[1]:
        ports[1] = free_port()
    dirs = [tmp_path / f"explicit{i}" for i in range(2)]
    for d in dirs:
        d.mkdir()
    procs = [
        _popen([*TWO_TASKS, f"dist.port={port}", f"hydra.sweep.dir={d / 'sweep'}"], d) for port, d in zip(ports, dirs)
    ]

    # the array's command starts (python, imports: seconds on 2 cores) while those two jobs run; its jobs wait
    # for their CPUs and then run side by side
    def running() -> bool:
        ids = _submitted(dirs)
        return len(ids) == 2 and all(_started(j) == "RUNNING" for j in ids)

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not running():
        assert all(p.poll() is None for p in procs), [_out(p.communicate()) for p in procs]
        time.sleep(0.2)
    array = _popen(["-m", *TWO_TASKS, "seed=0,1"], tmp_path)
    outs = [p.communicate(timeout=170) for p in procs]
    explicit = [_finished_two_task_runs(out, p.returncode, d)[0] for out, p, d in zip(outs, procs, dirs)]
    for (_, status), port in zip(explicit, ports):
        assert status["master"].endswith(f":{port}"), (status["master"], port)
    _assert_overlap([job["job_id"] for job, _ in explicit])

    out = array.communicate(timeout=170)
    derived = _finished_two_task_runs(out, array.returncode, tmp_path)
    assert len(derived) == 2, _out(out)
    masters = [status["master"] for _, status in derived]
    assert masters[0] != masters[1], masters
    for job, status in derived:
        port = random.Random(job["job_id"]).randint(20000, 60000)  # submitit's port for this job id
        assert status["master"].endswith(f":{port}"), (status["master"], job["job_id"], port)
    _assert_overlap([job["job_id"] for job, _ in derived])


def _submitted(dirs: list[Path]) -> list[str]:
    """The job ids submitted so far from these dirs (submitit's folder is named after the job id)."""
    return [p.name for d in dirs for p in (d / "sweep" / ".submitit").glob("*") if p.name.isdigit()]


# ---------------------------------------------------------------------------------------------- 5. preemption
# 160 images, 16 per step: 10 steps per epoch; every step logged
PREEMPT = QUICK + ["dataset.num_samples=160", "schedule.epochs=2", "deterministic=true", "log.interval=1"]
STEPS_PER_EPOCH, TOTAL_STEPS = 10, 20


def _started(job_id: str) -> str | None:
    state = _scontrol(job_id).get("JobState")
    return None if state in (None, "PENDING") else state


def _wait_for(what: str, check, proc: subprocess.Popen, timeout: float = 90):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if proc.poll() is not None:
            pytest.fail(
                f"the command ended (status {proc.returncode}) while waiting for {what}:\n{_out(proc.communicate())}"
            )
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"timed out waiting for {what}:\n{_out(proc.communicate())}")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_signalled_job_checkpoints_requeues_and_resumes_exactly(slurm, tmp_path):
    """``scancel --signal=USR1`` in the middle of an epoch: the trainer finishes its step, checkpoints it,
    submitit requeues the job; the requeued job (started at once with ``scontrol update StartTime=now``)
    resumes that step in the same run dir (resume=auto under submitit), logs each step once and ends with
    the weights of an uninterrupted run, bit for bit."""
    run_dir = tmp_path / "sweep" / "run"
    sweep = [f"hydra.sweep.dir={tmp_path / 'sweep'}", "hydra.sweep.subdir=run"]
    proc = _popen(PREEMPT + SLURM + sweep, tmp_path)
    # the uninterrupted reference, here in one process (the job has one task): same thing bitwise on the CPU
    reference = _popen([*PREEMPT, f"hydra.run.dir={tmp_path / 'straight'}"], tmp_path)

    def first_step() -> str | None:
        try:
            if not _records(run_dir):
                return None
        except (OSError, ValueError):
            return None
        return str(_status(run_dir)["job_id"])

    job_id = _wait_for("the job's first logged step", first_step, proc)
    subprocess.run(["scancel", "--signal=USR1", job_id], check=True)

    def requeued() -> dict | None:  # submitit ran `scontrol requeue`: the job waits (Reason=BeginTime)
        info = _scontrol(job_id)
        settled = info.get("JobState") in ("PENDING", "RUNNING", "COMPLETED")  # not REQUEUED / COMPLETING
        return info if int(info.get("Restarts") or 0) >= 1 and settled else None

    info = _wait_for("the requeue", requeued, proc)
    if info["JobState"] == "PENDING":  # start it now instead of after SLURM's requeue delay (BeginTime)
        # but not within the second of the requeue: slurmd refuses a job credential issued in the same second
        # as the killed run's was revoked ("Killing non-startable batch JobId=N: Job credential revoked")
        time.sleep(2)
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)
        started = _wait_for("the requeued job to start", lambda: _started(job_id), proc, 30)
        assert started in ("RUNNING", "COMPLETING", "COMPLETED"), f"the requeued job did not start: {started}"
    out, err = proc.communicate(timeout=150)
    ref_out = reference.communicate(timeout=150)
    assert proc.returncode == 0, _out((out, err))
    assert reference.returncode == 0, _out(ref_out)

    assert int(_scontrol(job_id).get("Restarts", "0")) == 1 or _sacct(job_id) == "COMPLETED"
    status = _status(run_dir)
    assert status["status"] == "finished" and status["steps"] == TOTAL_STEPS, status
    log = (run_dir / "train.log").read_text()
    assert "SIGUSR1: stopping after this step and writing a checkpoint" in log, log
    job_err = (tmp_path / "sweep" / ".submitit" / job_id / f"{job_id}_0_log.err").read_text()
    stopped = re.search(r"selfsup: stopped by SIGUSR1 at epoch \d+, step (\d+): saved (\S+)", job_err)
    resumed = re.search(r"resumed from (\S+) \(epoch (\d+), step (\d+) of (\d+)\)", log)
    assert stopped and resumed, f"{log}\n--- job stderr\n{job_err}"
    step = int(resumed.group(3))
    assert int(stopped.group(1)) == step and resumed.group(1) == str(run_dir / "last.pt"), log
    assert 0 < step < TOTAL_STEPS and step % STEPS_PER_EPOCH != 0, f"stopped at step {step}: not mid-epoch"
    assert [r["step"] for r in _records(run_dir)] == list(range(1, TOTAL_STEPS + 1))  # each step once

    a, b = _model(tmp_path / "straight" / "last.pt"), _model(run_dir / "last.pt")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]


# ---------------------------------------------------------------------------------------------- 6. submitit_local
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_submitit_local_runs_the_same_path_without_a_cluster(tmp_path):
    """``launcher=submitit_local``: submitit's job machinery as a local process, no sbatch involved."""
    proc = _run(QUICK + ["launcher=submitit_local", "launcher.timeout_min=10"], tmp_path)
    assert proc.returncode == 0, _out(proc)
    assert "submitted 1 job(s) to local processes" in proc.stdout, _out(proc)
    (job,) = _jobs(proc.stdout, tmp_path)
    status = _status(job["run_dir"])
    assert status["status"] == "finished" and status["launcher"] == "submitit_local", status
    assert status["job_id"] is None and status["steps"] == 4, status  # not a SLURM job
    assert job["stdout"].is_file() and (job["run_dir"] / "last.pt").is_file()


# ---------------------------------------------------------------------------------------------- 7. bad input
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_launcher_slurm_without_sbatch_is_one_line(tmp_path):
    proc = _run(QUICK + SLURM, tmp_path, timeout=100, PATH=str(Path(sys.executable).parent))
    line = _one_error_line(proc)
    assert "launcher=slurm needs SLURM's sbatch on PATH" in line and "launcher=submitit_local" in line, line
    assert not list(tmp_path.glob("multirun/*/.submitit/*")), "nothing is submitted"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_more_gpus_than_tasks_is_one_line(tmp_path):
    proc = _run(QUICK + SLURM + ["launcher.gpus_per_node=2", "launcher.tasks_per_node=1"], tmp_path, timeout=100)
    line = _one_error_line(proc)
    assert "launcher.tasks_per_node=1 but launcher.gpus_per_node=2" in line, line
    assert "set launcher.tasks_per_node=2" in line, line
    assert not list(tmp_path.glob("multirun/*/.submitit/*")), "nothing is submitted"


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_job_finding_a_checkpoint_of_another_config_is_refused(slurm, tmp_path):
    """A job started in a run dir that holds a checkpoint of another config. A new submission is refused
    (the dir holds a run); a resuming one (``resume=auto``, what a requeued job runs with) meets the resume
    rule, which refuses the changed lr; either way the member fails and names why."""
    fixed = [f"hydra.sweep.dir={tmp_path / 'sweep'}", "hydra.sweep.subdir=run"]
    run_dir = tmp_path / "sweep" / "run"
    first = _run(["-m", *QUICK, *fixed], tmp_path)  # here, in this process: only its checkpoint matters
    assert first.returncode == 0, _out(first)
    assert _status(run_dir)["status"] == "finished"
    before = ckpt_io.load(run_dir / "last.pt")

    fresh = _run(QUICK + SLURM + fixed + ["algo.optimizer.lr=0.6"], tmp_path)
    assert fresh.returncode == 1 and "Traceback" not in fresh.stderr, _out(fresh)
    assert "already holds a run" in _status(run_dir)["error"], _status(run_dir)

    proc = _run(QUICK + SLURM + fixed + ["algo.optimizer.lr=0.6", "resume=auto"], tmp_path)
    assert proc.returncode == 1, _out(proc)
    assert "Traceback" not in proc.stderr, _out(proc)
    status = _status(run_dir)
    assert status["status"] == "failed", status
    assert "algo.optimizer.lr: 0.3 -> 0.6" in status["error"] and "resume_force=true" in status["error"], status
    rows = json.loads((tmp_path / "sweep" / "summary.json").read_text())
    assert [(r["member"], r["status"]) for r in rows] == [("run", "failed")], rows
    assert rows[0]["error"] == status["error"]
    after = ckpt_io.load(run_dir / "last.pt")  # the refused job wrote nothing over the run
    assert after["step"] == before["step"] and all(
        torch.equal(after["model"][k], before["model"][k]) for k in before["model"]
    )
