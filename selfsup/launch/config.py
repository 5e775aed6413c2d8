"""``launcher``: how the processes of a run are started. One typed schema per ``conf/launcher/`` option.

* ``local`` — this process (one CPU or GPU), or whatever an external ``torchrun`` / ``srun`` started.
* ``torchrun`` — this command starts ``nproc_per_node`` workers itself through torch's elastic launcher,
  on one machine or as node ``node_rank`` of ``nnodes`` (``dist.addr`` / ``dist.port`` name node 0).
* ``slurm`` — submits the run (or a ``-m`` sweep, as one job array) to SLURM through submitit:
  ``nodes`` x ``tasks_per_node`` processes, one task per GPU.
* ``submitit_local`` — the same submitit path as local processes, without a cluster (for debugging).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from selfsup.errors import ConfigError


@dataclass
class LauncherConfig:
    name: str = "local"


def _env_int(names: tuple[str, ...], default: int) -> tuple[int, str | None]:
    """The first of ``names`` set in the environment, as an int (and the variable it came from)."""
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            try:
                return int(value), name
            except ValueError:
                raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None
    return default, None


@dataclass
class TorchrunConfig(LauncherConfig):
    """``launcher=torchrun``: the seed's ``dist_train.sh CONFIG GPUS`` / multi-node variables in one command."""

    name: str = "torchrun"
    nproc_per_node: int = 1  # worker processes on this machine (one per GPU on CUDA)
    nnodes: int | None = None  # None = $NNODES, else 1
    node_rank: int | None = None  # None = $NODE_RANK, else 0
    max_restarts: int = 0  # restart the whole worker group this many times after a failure

    def __post_init__(self) -> None:
        if not self.nproc_per_node >= 1:
            raise ConfigError(f"launcher.nproc_per_node must be >= 1, got {self.nproc_per_node}")
        if self.nnodes is not None and not self.nnodes >= 1:
            raise ConfigError(f"launcher.nnodes must be >= 1, got {self.nnodes}")
        if self.node_rank is not None and not self.node_rank >= 0:
            raise ConfigError(f"launcher.node_rank must be >= 0, got {self.node_rank}")
        if not self.max_restarts >= 0:
            raise ConfigError(f"launcher.max_restarts must be >= 0, got {self.max_restarts}")

    def resolved_nodes(self) -> tuple[int, int]:
        """(nnodes, node_rank): the config's values, else ``NNODES`` / ``NODE_RANK``, else (1, 0)."""
        nnodes = self.nnodes if self.nnodes is not None else _env_int(("NNODES",), 1)[0]
        node_rank = self.node_rank if self.node_rank is not None else _env_int(("NODE_RANK",), 0)[0]
        if nnodes < 1:
            raise ConfigError(f"NNODES must be >= 1, got {nnodes}")
        if not 0 <= node_rank < nnodes:
            raise ConfigError(
                f"node rank {node_rank} is not in 0..{nnodes - 1}: set launcher.node_rank (or NODE_RANK) on each "
                f"machine to 0, 1, ..., {nnodes - 1}"
            )
        return nnodes, node_rank


@dataclass
class SubmititConfig(LauncherConfig):
    """What every submitit job asks for (``launcher=submitit_local`` uses only these)."""

    name: str = "submitit_local"
    nodes: int = 1
    tasks_per_node: int = 1  # processes per node: one per GPU on a GPU job
    gpus_per_node: int | None = None
    cpus_per_task: int | None = None
    mem_gb: int | None = None
    timeout_min: int = 60
    # wait for the job(s) to end (and print the sweep summary), or return once they are submitted
    wait: bool = True

    def __post_init__(self) -> None:
        for key in ("nodes", "tasks_per_node", "timeout_min"):
            if not getattr(self, key) >= 1:
                raise ConfigError(f"launcher.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("gpus_per_node", "cpus_per_task", "mem_gb"):
            value = getattr(self, key)
            if value is not None and not value >= 0:
                raise ConfigError(f"launcher.{key} must be >= 0 or null, got {value}")
        if self.gpus_per_node and self.tasks_per_node != self.gpus_per_node:
            raise ConfigError(
                f"launcher.tasks_per_node={self.tasks_per_node} but launcher.gpus_per_node={self.gpus_per_node}: "
                f"selfsup runs one task per GPU; set launcher.tasks_per_node={self.gpus_per_node}"
            )

    def executor_parameters(self) -> dict[str, Any]:
        """The submitit ``update_parameters`` keys shared by every cluster type."""
        params: dict[str, Any] = {
            "nodes": self.nodes,
            "tasks_per_node": self.tasks_per_node,
            "timeout_min": self.timeout_min,
        }
        for key in ("gpus_per_node", "cpus_per_task", "mem_gb"):
            if getattr(self, key) is not None:
                params[key] = getattr(self, key)
        return params


@dataclass
class SlurmConfig(SubmititConfig):
    """``launcher=slurm``: the seed's ``slurm_train.sh PARTITION JOB CONFIG`` (with ``GPUS_PER_NODE``,
    ``SRUN_ARGS``) as one command."""

    name: str = "slurm"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    # extra ``#SBATCH --key=value`` lines: +launcher.additional_parameters.mail-type=END on the command line
    additional_parameters: dict[str, Any] = field(default_factory=dict)
    # shell lines run before the tasks start: module load ..., conda activate ..., export ...
    setup: list[str] = field(default_factory=list)
    # requeues after a time limit or preemption (the job resumes from its last step)
    max_num_timeout: int = 3
    # SLURM signals the job this many seconds before its time limit (it checkpoints and requeues)
    signal_delay_s: int = 120
    array_parallelism: int = 256  # sweep members running at once
    wait: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.max_num_timeout >= 0:
            raise ConfigError(f"launcher.max_num_timeout must be >= 0, got {self.max_num_timeout}")
        if not self.signal_delay_s >= 0:
            raise ConfigError(f"launcher.signal_delay_s must be >= 0, got {self.signal_delay_s}")
        if not self.array_parallelism >= 1:
            raise ConfigError(f"launcher.array_parallelism must be >= 1, got {self.array_parallelism}")

    def executor_parameters(self) -> dict[str, Any]:
        params = super().executor_parameters()
        params.update(
            slurm_signal_delay_s=self.signal_delay_s,
            slurm_array_parallelism=self.array_parallelism,
            # a task that fails ends its job's other tasks at once (they would wait in a collective)
            slurm_srun_args=["--kill-on-bad-exit=1"],
        )
        for key in ("partition", "account", "qos", "constraint"):
            if getattr(self, key) is not None:
                params[f"slurm_{key}"] = getattr(self, key)
        if self.additional_parameters:
            params["slurm_additional_parameters"] = dict(self.additional_parameters)
        if self.setup:
            params["slurm_setup"] = list(self.setup)
        return params
