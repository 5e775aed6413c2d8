"""selfsup's Hydra launchers (``hydra/launcher=selfsup_slurm`` / ``selfsup_submitit_local``), chosen by
``launcher=slurm`` / ``launcher=submitit_local``.

Hydra only takes launcher plugins from the ``hydra_plugins`` namespace; selfsup ships this module
there (``pyproject.toml``: the source lives in ``selfsup/launch/plugin/``). They are Hydra's submitit
launchers (same job-side ``__call__`` and requeue ``checkpoint``) with selfsup's submission
(:func:`selfsup.launch.submitit.submit`): settings from the typed ``launcher`` node, job ids, logs and
run dirs printed, optional waiting, and sweeps that survive a failing member. Imports stay light:
Hydra imports this module at every start.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher


class _SelfsupSubmitit(BaseSubmititLauncher):
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Any:
        from selfsup.launch.submitit import submit

        return submit(self, job_overrides, initial_job_idx)


class SelfsupSlurmLauncher(_SelfsupSubmitit):
    _EXECUTOR = "slurm"


class SelfsupLocalLauncher(_SelfsupSubmitit):
    _EXECUTOR = "local"
