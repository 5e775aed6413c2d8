"""How the processes of a run are started: the ``launcher`` config group.

* ``config.py`` — the typed schema of each ``conf/launcher/`` option (local, torchrun, slurm,
  submitit_local).
* ``torchrun.py`` — ``launcher=torchrun``: the command starts its workers through torch's elastic
  launcher (one machine or several), all writing to one run dir.
* ``submitit.py`` — ``launcher=slurm`` / ``submitit_local``: submission through submitit (Hydra's
  launcher plugin in ``plugin/hydra_plugins/selfsup_launcher``), and the job's requeue after a signal.
* ``sweep.py`` — ``status.json`` of every run and the summary table of a ``-m`` sweep.

Rank discovery (torchrun's or SLURM's environment) and port choice live in ``selfsup.distributed``.
"""
