"""``launcher=torchrun``: this command starts the workers itself, through torch's elastic launcher API.

``python -m selfsup.train launcher=torchrun launcher.nproc_per_node=4 ...`` does what the seed's
``dist_train.sh CONFIG 4`` (``torchrun --nproc_per_node=4``) does, with no second command: the process
the user started composes the config and creates the run dir, then runs ``nproc_per_node`` workers,
each ``python -m selfsup.train <the same overrides> hydra.run.dir=<that dir>``, so all ranks write to
one directory. Several machines: the same command on each, with ``launcher.nnodes`` and
``launcher.node_rank`` (or the seed's ``NNODES`` / ``NODE_RANK``) and node 0's ``dist.addr`` /
``dist.port`` (or ``MASTER_ADDR`` / ``PORT`` / ``MASTER_PORT``).

The port: ``dist.port``, else $PORT / $MASTER_PORT, else a free one picked here (one machine) or 29500
(several machines must agree on one). Ctrl-C and SIGTERM reach the workers once (they run in their
own sessions): they stop at a step boundary with a checkpoint. The exit status is the workers'.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from selfsup.distributed import configured_port, free_port, port_in_use, port_in_use_error
from selfsup.errors import ConfigError
from selfsup.launch.config import TorchrunConfig

log = logging.getLogger("selfsup")

MULTI_NODE_DEFAULT_PORT = 29500  # torchrun's default: every node must name the same port


def quote_override(value: str) -> str:
    """A value Hydra's override grammar reads back verbatim (paths may hold spaces, '=', ',' or quotes).

    In a quoted value Hydra takes a backslash literally, except in a run of backslashes before a quote or
    before the closing quote: there each one is doubled (and the quote escaped)."""
    escaped = re.sub(r"(\\*)('|\Z)", lambda m: m[1] * 2 + ("\\'" if m[2] else ""), value)
    return f"'{escaped}'"


def rendezvous(launcher: TorchrunConfig, addr: str | None, port: int | None) -> tuple[int, int, str, int]:
    """(nnodes, node_rank, master address, master port) for this node, checked."""
    nnodes, node_rank = launcher.resolved_nodes()
    addr = addr or os.environ.get("MASTER_ADDR") or None
    if nnodes > 1 and not addr:
        raise ConfigError(
            f"{nnodes} nodes need node 0's address on every node: pass dist.addr=<host of node 0> (or set MASTER_ADDR)"
        )
    chosen, _ = configured_port(port)
    if chosen is None:
        chosen = MULTI_NODE_DEFAULT_PORT if nnodes > 1 else free_port()
    if node_rank == 0 and port_in_use(chosen, addr or ""):
        raise port_in_use_error(chosen)
    return nnodes, node_rank, addr or "127.0.0.1", chosen


def check_gpus(launcher: TorchrunConfig, device: str) -> None:
    uses_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if uses_cuda and launcher.nproc_per_node > torch.cuda.device_count():
        raise ConfigError(
            f"launcher.nproc_per_node={launcher.nproc_per_node} but {torch.cuda.device_count()} GPU(s) are visible "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); start one process per GPU, "
            "or use device=cpu"
        )


def worker_command(run_dir: Path, overrides: Sequence[str], config_args: Sequence[str]) -> list[str]:
    """The arguments after ``python`` that each worker runs: this run's overrides in ``run_dir``."""
    kept = [o for o in overrides if not o.lstrip("+~").startswith("hydra.run.dir=")]
    return ["-m", "selfsup.train", *config_args, *kept, f"hydra.run.dir={quote_override(str(run_dir))}"]


def spawn(
    launcher: TorchrunConfig,
    addr: str | None,
    port: int | None,
    device: str,
    run_dir: Path,
    overrides: Sequence[str],
    config_args: Sequence[str] = (),
) -> int:
    """Run this node's workers to the end; their exit status (0 when all succeeded)."""
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    check_gpus(launcher, device)
    nnodes, node_rank, master_addr, master_port = rendezvous(launcher, addr, port)
    # time the workers get to write their checkpoint after a signal (torch >= 2.6 lets us set it)
    grace: dict[str, Any] = {}
    if "shutdown_timeout" in inspect.signature(LaunchConfig).parameters:
        grace["shutdown_timeout"] = 600
    config = LaunchConfig(
        min_nodes=nnodes,
        max_nodes=nnodes,
        nproc_per_node=launcher.nproc_per_node,
        run_id=f"selfsup-{master_port}",
        role="selfsup",
        rdzv_endpoint=f"{master_addr}:{master_port}",
        rdzv_backend="static",
        rdzv_configs={"rank": node_rank, "timeout": 900},
        max_restarts=launcher.max_restarts,
        monitor_interval=0.2,
        start_method="spawn",
        **grace,
    )
    log.info(
        "torchrun: %d worker(s) on node %d of %d, rendezvous %s:%d, run dir %s",
        launcher.nproc_per_node,
        node_rank,
        nnodes,
        master_addr,
        master_port,
        run_dir,
    )
    for name in list(logging.root.manager.loggerDict):  # the workers speak for themselves
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.ERROR)
    args = worker_command(run_dir, overrides, config_args)
    try:
        elastic_launch(config, sys.executable)(*args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode  # -15: killed by SIGTERM
        if code not in (2, 130, 143):  # not a user error or a clean stop: those already printed their line
            print(
                f"selfsup: error: worker rank {rank} failed with exit code {failure.exitcode} (its output is above)",
                file=sys.stderr,
                flush=True,
            )
        return code
    except SignalException as e:
        log.warning("torchrun: %s: the workers were stopped", signal.Signals(e.sigval).name)
        return 128 + int(e.sigval)
    except Exception as e:  # the agent's own rendezvous (a port taken between the check and now, ...)
        text = str(e)
        if "EADDRINUSE" in text or "address already in use" in text.lower():
            raise port_in_use_error(master_port) from None
        raise
    return 0
