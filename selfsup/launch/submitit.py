"""``launcher=slurm`` / ``launcher=submitit_local``: submission through submitit, and the job's side.

The Hydra launcher plugin (``hydra_plugins.selfsup_launcher``, shipped with selfsup) subclasses Hydra's
``submitit_slurm`` / ``submitit_local`` launchers and calls :func:`submit`, which reads every job
setting from the typed ``launcher`` node (one home: ``launcher.partition=...``, not
``hydra.launcher.partition=...``). A single run and a ``-m`` sweep go the same way: the sweep as one
job array, the single run as a sweep of one (``conf/launcher/slurm.yaml`` sets ``hydra.mode``).

In the job, submitit has installed its handler for SLURM's warning signal (USR2, ``signal_delay_s``
before the time limit). The trainer replaces it while training: on USR1, USR2 or TERM it finishes the
step, writes a checkpoint of that step and stops; :func:`requeue` then hands over to submitit's
handler, which requeues the job (up to ``max_num_timeout`` times). The requeued job composes the same
config with the same run dir, and ``resume=auto`` (the default under submitit) continues it.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from selfsup.errors import ConfigError
from selfsup.launch import sweep
from selfsup.launch.config import SlurmConfig, SubmititConfig

log = logging.getLogger("selfsup")


def _launcher_config(cfg: DictConfig) -> SubmititConfig:
    node = OmegaConf.to_object(cfg.launcher)
    if not isinstance(node, SubmititConfig):
        raise ConfigError(
            f"hydra/launcher is a submitit launcher but launcher={cfg.launcher.name}: choose launcher=slurm or "
            "launcher=submitit_local instead of setting hydra/launcher"
        )
    return node


def _member_dir(launcher: Any, overrides: Sequence[str], job_num: int) -> Path:
    """The run dir a member will get (what Hydra computes in the job from the same config)."""
    cfg = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, list(overrides))
    with open_dict(cfg.hydra.job):
        cfg.hydra.job.num = job_num
    return (Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)).absolute()


def submit(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[Any]:
    """Submit one job per member (a job array), print job ids, logs and run dirs; wait for them when
    ``launcher.wait``. Returns Hydra ``JobReturn`` s that never raise: a member that failed is reported
    by its ``status.json`` and in the sweep summary, so the others' results are not lost."""
    import submitit
    from hydra.core.singleton import Singleton
    from hydra.core.utils import JobReturn, JobStatus, filter_overrides

    cfg: DictConfig = launcher.config
    lc = _launcher_config(cfg)
    cluster = "slurm" if isinstance(lc, SlurmConfig) else "local"
    if cluster == "slurm" and shutil.which("sbatch") is None:
        raise ConfigError(
            "launcher=slurm needs SLURM's sbatch on PATH and it is not there (run this on the cluster's login node); "
            "to try the same path without a cluster use launcher=submitit_local"
        )
    sweep_dir = Path(str(cfg.hydra.sweep.dir)).absolute()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    init: dict[str, Any] = {"folder": str(sweep_dir / ".submitit" / "%j")}
    if isinstance(lc, SlurmConfig):
        init["slurm_max_num_timeout"] = lc.max_num_timeout
    executor = submitit.AutoExecutor(cluster=cluster, **init)
    executor.update_parameters(name=str(cfg.hydra.job.name), **lc.executor_parameters())

    params, dirs = [], []
    for idx, overrides in enumerate(job_overrides):
        num = initial_job_idx + idx
        params.append((list(overrides), "hydra.sweep.dir", num, f"job_id_for_{num}", Singleton.get_state()))
        dirs.append(_member_dir(launcher, overrides, num))
    try:
        jobs = executor.map_array(launcher, *zip(*params))
    except submitit.core.utils.FailedJobError as e:  # sbatch refused the job: its own words
        message = " ".join(str(e).split())
        raise ConfigError(f"SLURM refused the job: {message}") from None

    where = f"SLURM ({lc.partition or 'default partition'})" if isinstance(lc, SlurmConfig) else "local processes"
    print(f"submitted {len(jobs)} job(s) to {where}; sweep dir {sweep_dir}", flush=True)
    for job, overrides, num, run_dir in zip(jobs, job_overrides, range(initial_job_idx, 10**9), dirs):
        shown = " ".join(filter_overrides(overrides)) or "(no overrides)"
        print(f"  #{num} job {job.job_id}: {shown}", flush=True)
        print(f"      run dir: {run_dir}", flush=True)
        print(f"      logs:    {job.paths.stdout} / {job.paths.stderr.name}", flush=True)

    returns = []
    if not lc.wait:
        sweep._pending[str(cfg.hydra.sweep.dir)] = True
        ids = ",".join(str(j.job_id).split("_")[0] for j in jobs[:1])
        follow = f"squeue -j {ids}" if cluster == "slurm" else f"tail -f {jobs[0].paths.stdout}"
        print(f"not waiting (launcher.wait=false); follow with: {follow}", flush=True)
    for job, overrides, run_dir in zip(jobs, job_overrides, dirs):
        value: Any = None
        if lc.wait:
            try:
                value = job.results()[0].return_value
            except Exception as e:  # noqa: BLE001 - a task exited with an error, or the job died (killed, OOM, ...)
                record = sweep.read_status(run_dir) or {}
                if record.get("status") in (None, "running"):  # it died without a word: submitit's is all we have
                    first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
                    sweep.write_status(run_dir, "crashed", error=first, log=str(job.paths.stderr))
                    record = sweep.read_status(run_dir) or {}
                print(
                    f"  job {job.job_id} {record.get('status')}: {record.get('error')} (log: {record.get('log')})",
                    flush=True,
                )
        returns.append(
            JobReturn(
                overrides=list(overrides), working_dir=str(run_dir), status=JobStatus.COMPLETED, _return_value=value
            )
        )
    return returns


# ------------------------------------------------------------------------------------ in the job
def in_submitit_job() -> bool:
    return "SUBMITIT_FOLDER" in os.environ or bool(os.environ.get("SUBMITIT_EXECUTOR"))


def requeued_job() -> bool:
    """A submitit job that SLURM has restarted (requeued after a signal, a time limit or a node failure)."""
    return in_submitit_job() and int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0


def requeue_handler() -> Callable[[int, Any], Any] | None:
    """submitit's handler for its preemption signal in this job (None outside a submitit job): call it
    after the checkpoint is written and it requeues the job and exits."""
    if not in_submitit_job():
        return None
    try:
        from submitit.core.job_environment import JobEnvironment

        sig = JobEnvironment._usr_sig()
    except Exception:  # noqa: BLE001 - an unknown submitit version: nothing to hand over to
        return None
    handler = signal.getsignal(sig)
    if not callable(handler) or getattr(handler, "__name__", "") != "checkpoint_and_try_requeue":
        return None

    def call(_signum: int, frame: Any = None) -> Any:
        return handler(sig, frame)

    return call
