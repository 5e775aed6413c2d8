"""``python -m selfsup.train [group=option ...] [key=value ...]``: self-supervised pretraining.

Examples::

    python -m selfsup.train                                  # SimCLR, ResNet-18, digits, CPU
    python -m selfsup.train algo=odc
    python -m selfsup.train algo=mae backbone=vit_small
    python -m selfsup.train backbone=resnet50 dataset=imagefolder dataset.root=/data/in1k/train
    python -m selfsup.train experiment=simclr_resnet50_8xb32-coslr-200e_in1k dataset.root=...
    python -m selfsup.train --cfg job                        # print the composed config
    python -m selfsup.train -m algo=simclr,odc schedule.epochs=2    # a Hydra multirun sweep
    python -m selfsup.train --config-dir ~/my_configs experiment=my_run   # your own config files
    python -m selfsup.train launcher=torchrun launcher.nproc_per_node=4    # 4 workers, one run dir
    python -m selfsup.train launcher=slurm launcher.partition=gpu launcher.nodes=2 \\
        launcher.gpus_per_node=8 launcher.tasks_per_node=8                  # submit to SLURM (README: Launching)

Mistakes in the command line or the data (unknown option, misspelt key, wrong type, missing
dataset root, bad checkpoint, ...) print one line ``selfsup: error: ...`` and exit with status 2.
Set ``HYDRA_FULL_ERROR=1`` to see the traceback instead.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from selfsup import distributed
from selfsup.config import CONFIG_DIR, CONFIG_NAME
from selfsup.errors import SelfsupError, TrainingInterrupted, TrainingPreempted
from selfsup.launch import sweep

log = logging.getLogger("selfsup")

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # the shell's code for Ctrl-C
_USER_ERRORS = (SelfsupError, HydraException, OmegaConfBaseException)


def user_error(exc: BaseException) -> BaseException | None:
    """The user-facing error behind ``exc`` (following ``raise ... from``), or None for a bug."""
    seen: BaseException | None = exc
    found = None
    while seen is not None:
        if isinstance(seen, SelfsupError):
            return seen
        if found is None and isinstance(seen, _USER_ERRORS):
            found = seen
        seen = seen.__cause__ or seen.__context__
    if found is not None and "Error in call to target" in str(found):
        cause = found.__cause__
        # a TypeError from a constructor = a key the target does not take
        return found if isinstance(cause, (TypeError, ValueError)) else None
    return found


def one_line(exc: BaseException) -> str:
    """Collapse a (Hydra / OmegaConf / DataLoader-wrapped) message into one readable line."""
    if isinstance(exc, MissingMandatoryValue) and getattr(exc, "full_key", None):
        return f"{exc.full_key} is not set: pass {exc.full_key}=<value> on the command line"
    text = str(exc)
    if isinstance(exc, HydraException) and isinstance(exc.__cause__, OmegaConfBaseException):
        text += "\n" + str(exc.__cause__)  # e.g. "Could not override 'x'" + "Key 'x' not in 'Y'"
    if "Original Traceback" in text:  # re-raised from a DataLoader worker: keep the last line
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = re.sub(r"^[\w.]+Error: ", "", last)
    text = text.split("Config search path:")[0]
    lines = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("full_key:", "object_type=", "reference_type=", "To append to your config")):
            continue
        lines.append(line)
    joined = " ".join(lines)
    joined = re.sub(r"Available options in '([^']+)': ", r"(available options in '\1': ", joined)
    if "(available options" in joined:
        head, opts = joined.split("(available options", 1)
        name, _, values = opts.partition(": ")
        joined = f"{head.strip()} (available options{name}: {', '.join(values.split())})"
    return joined


def report(exc: BaseException) -> None:
    print(f"selfsup: error: {one_line(exc)}", file=sys.stderr, flush=True)


def _rank() -> int:
    """This process's rank (before the process group exists: from torchrun's or SLURM's variables)."""
    if distributed.get_world_size() > 1:
        return distributed.get_rank()
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) or 0)


def _config_args() -> list[str]:
    """``--config-dir`` / ``--config-name`` as given on this command line (workers need them too)."""
    out, argv = [], sys.argv[1:]
    for i, arg in enumerate(argv):
        if arg in ("--config-dir", "-cd", "--config-name", "-cn") and i + 1 < len(argv):
            out += [arg, argv[i + 1]]
        elif arg.startswith(("--config-dir=", "--config-name=")):
            out.append(arg)
    return out


def _train(cfg: DictConfig, run_dir: Path) -> float | None:
    """Run this process's part of the run: start the workers (``launcher=torchrun``), or train."""
    from selfsup.config import typed
    from selfsup.engine.run_dir import agree_on_run_dir
    from selfsup.engine.trainer import Trainer
    from selfsup.launch.config import SubmititConfig, TorchrunConfig
    from selfsup.launch.submitit import requeued_job

    c = typed(cfg)
    hc = HydraConfig.get()
    overrides = list(hc.overrides.task)
    if isinstance(c.launcher, TorchrunConfig) and distributed.launcher_of_this_process() == "local":
        from selfsup.launch.torchrun import spawn

        code = spawn(c.launcher, c.dist.addr, c.dist.port, c.device, run_dir, overrides, _config_args())
        record = sweep.read_status(run_dir) or {}
        if code != 0:  # node 0's command records it; the run dir belongs to node 0's rank 0
            raise WorkersFailed(code, record.get("error"), record=c.launcher.resolved_nodes()[1] == 0)
        return record.get("final_loss")
    if isinstance(c.launcher, SubmititConfig) and requeued_job() and c.resume is None:
        c.resume = "auto"  # a requeued job continues its run dir (a new submission into a used one is refused)
    distributed.init(c.device, c.dist.backend, c.dist.timeout_s, c.dist.addr, c.dist.port)
    run_dir = agree_on_run_dir(run_dir)  # torchrun workers each composed their own config and run id
    world = distributed.get_world_size()
    if _rank() == 0:
        sweep.write_status(
            run_dir,
            "running",
            overrides=overrides,
            launcher=c.launcher.name,
            world_size=world,
            master=f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}" if world > 1 else None,
            epochs=c.schedule.epochs,
            log=str(run_dir / "train.log"),
            job_id=os.environ.get("SLURM_JOB_ID"),
            host=socket.gethostname(),
        )
    result = Trainer(c, run_dir).fit()
    if _rank() == 0:
        sweep.write_status(
            run_dir,
            "finished",
            epochs_done=result.epochs,
            steps=result.steps,
            final_loss=result.final_loss,
            knn_before=result.knn_initial,
            knn_after=result.knn_final,
            seconds=round(result.seconds, 1),
            checkpoint=str(result.last_checkpoint) if result.last_checkpoint else None,
        )
    return result.final_loss


class WorkersFailed(Exception):
    """The workers ``launcher=torchrun`` started exited with a non-zero status."""

    def __init__(self, code: int, error: str | None, record: bool = True) -> None:
        super().__init__(error or f"a worker exited with status {code}")
        self.code, self.record = code, record


def _record(run_dir: Path, status: str, error: str, **fields: object) -> None:
    if _rank() == 0:
        record = sweep.read_status(run_dir) or {}
        if record.get("status") in (None, "running"):  # torchrun's workers may have said it already
            sweep.write_status(run_dir, status, error=error, log=str(run_dir / "train.log"), **fields)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name=CONFIG_NAME)
def _task(cfg: DictConfig) -> float | None:
    from selfsup.launch.submitit import requeue_handler

    hc = HydraConfig.get()
    # a sweep member reports a failure and returns, so that the other members run on; one of several SLURM
    # tasks exits instead (srun's --kill-on-bad-exit then stops its peers rather than leave them waiting
    # in a collective), and the sweep learns it from status.json
    multirun = hc.mode == RunMode.MULTIRUN and distributed.launcher_of_this_process() != "slurm"
    run_dir = Path(hc.runtime.output_dir)
    requeue = requeue_handler()  # submitit's (in a SLURM job): requeues after our checkpoint
    try:
        return _train(cfg, run_dir)
    except TrainingPreempted as e:  # a signal: stopped at a step boundary with a checkpoint of it
        if _rank() == 0:
            print(f"selfsup: {e}", file=sys.stderr, flush=True)
        _record(run_dir, "preempted", str(e))
        if requeue is not None:
            requeue(e.signum, None)  # rank 0: requeue the job and exit; the others: let it happen
            return None
        raise SystemExit(128 + e.signum) from None
    except TrainingInterrupted as e:  # Ctrl-C: stopped cleanly at a step boundary
        if _rank() == 0:
            print(f"selfsup: {e}", file=sys.stderr, flush=True)
        _record(run_dir, "interrupted", str(e))
        raise SystemExit(EXIT_INTERRUPTED) from None
    except WorkersFailed as e:  # the workers printed their own error
        if e.record:
            _record(run_dir, "failed", str(e), exit_code=e.code)
        if multirun and e.code not in (130,):
            log.error("sweep member %s failed: %s (log: %s)", hc.job.num, e, run_dir / "train.log")
            return None
        raise SystemExit(e.code) from None
    except Exception as e:  # inside the job: report user errors here, before Hydra wraps them
        err = user_error(e)
        message = one_line(err) if err is not None else f"{type(e).__name__}: {e}"
        _record(run_dir, "failed", message)
        if multirun and os.environ.get("SELFSUP_FULL_ERROR") != "1":
            if err is None:
                log.exception("sweep member %s crashed", hc.job.num)
            log.error("sweep member %s failed: %s (log: %s)", hc.job.num, message, run_dir / "train.log")
            return None
        if err is None or os.environ.get("SELFSUP_FULL_ERROR") == "1":
            raise
        report(err)
        raise SystemExit(EXIT_USER_ERROR) from None
    finally:
        distributed.shutdown()


def main() -> None:
    full = os.environ.get("HYDRA_FULL_ERROR") == "1"
    if full:
        os.environ["SELFSUP_FULL_ERROR"] = "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let composition errors reach us unformatted
    try:
        _task()
    except Exception as e:
        err = user_error(e)
        if full or err is None:
            raise
        report(err)
        sys.exit(EXIT_USER_ERROR)
    if sweep.failed_members:  # a -m sweep in which some members did not finish (the table says which)
        sys.exit(1)


if __name__ == "__main__":
    main()
