"""Run directories: one per run, never shared by accident, never silently reused.

* Names are unique per run: ``outputs/<algo>/<date>_<time>-<6 hex>`` (the ``${run_id:}`` resolver),
  so two runs started in the same second get two directories.
* All ranks of one run use rank 0's directory (:func:`agree_on_run_dir`): each torchrun worker composes
  its own config and would otherwise draw its own id.
* A directory that already holds a run is refused unless the run continues it (``resume=auto`` or a
  checkpoint in it) or the user asks to start over (``overwrite=true``, which deletes that run's
  checkpoints and logs first) (:func:`prepare`).
* Temporary files left by a process killed while writing a checkpoint are removed at start.
* After a resume, records logged past the checkpoint's step are dropped from ``metrics.jsonl`` (they
  are about to be logged again).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Sequence
from functools import cache
from pathlib import Path

from selfsup import distributed
from selfsup.engine.checkpoint import write_text_atomic
from selfsup.errors import ConfigError

log = logging.getLogger("selfsup")

RUN_FILES = ("last.pt", "metrics.jsonl", "config.yaml")  # a directory with one of these holds a run
HYDRA_FILES = {".hydra", "train.log"}  # what Hydra itself writes into every run directory


@cache
def run_id() -> str:
    """``YYYY-MM-DD_HH-MM-SS-xxxxxx``: the start time and 6 random hex digits, fixed for this process."""
    return f"{time.strftime('%Y-%m-%d_%H-%M-%S')}-{secrets.token_hex(3)}"


# execution settings: they do not tell sweep members apart, so member dir names leave them out
_NOT_IN_MEMBER_NAMES = ("launcher", "hydra.", "dist.", "loader.", "log.", "resume", "overwrite", "device")


def member_dir(num: int, overrides: Sequence[str]) -> str:
    """``${member_dir:${hydra.job.num},${hydra.overrides.task}}``: a sweep member's sub-dir, its number and
    its overrides (``3_algo=odc,schedule.epochs=2``); '/' becomes '%'; a long name is cut and a hash of the
    whole added, so two members never share a directory."""
    kept = [str(o) for o in overrides if not str(o).lstrip("+~").startswith(_NOT_IN_MEMBER_NAMES)]
    name = ",".join(kept).replace("/", "%").replace("\\", "%")
    if len(name) > 100:
        name = f"{name[:90]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return f"{num}_{name}" if name else str(num)


def agree_on_run_dir(run_dir: str | os.PathLike) -> Path:
    """Rank 0's run directory on every rank (collective; the identity in one process). A rank whose own
    directory differs removes it if it holds nothing but what Hydra wrote there."""
    path = Path(run_dir)
    if distributed.get_world_size() == 1:
        return path
    import torch.distributed as dist

    shared = [str(path.resolve())]
    dist.broadcast_object_list(shared, src=0)
    agreed = Path(shared[0])
    if agreed != path.resolve() and path.is_dir() and {p.name for p in path.iterdir()} <= HYDRA_FILES:
        for handler in logging.getLogger().handlers:  # Hydra's file handler points into the directory
            if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == path.resolve():
                handler.close()
                logging.getLogger().removeHandler(handler)
        shutil.rmtree(path, ignore_errors=True)
    return agreed


def _describe(run_dir: Path) -> str:
    last = run_dir / "last.pt"
    if last.is_file():
        try:
            from selfsup.engine import checkpoint as ckpt_io

            state = ckpt_io.load(last, mmap=True)  # only its epoch and step: ODC's can hold 1.3 GB
            return f"last.pt at epoch {state['epoch']}, step {state['step']}"
        except Exception:  # noqa: BLE001 - only a description
            return "last.pt"
    return ", ".join(name for name in RUN_FILES if (run_dir / name).exists())


def holds_run(run_dir: str | os.PathLike) -> bool:
    path = Path(run_dir)
    return any((path / name).exists() for name in RUN_FILES) or any(path.glob("epoch_*.pt"))


def remove_stale_temporaries(run_dir: str | os.PathLike) -> list[Path]:
    """Delete the hidden ``.*.tmp`` files an interrupted checkpoint write left behind."""
    removed = []
    for tmp in Path(run_dir).glob(".*.tmp"):
        if tmp.name.startswith((".last.pt.", ".epoch_")):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    if removed:
        log.info("removed %d temporary file(s) of an interrupted checkpoint write in %s", len(removed), run_dir)
    return removed


def prepare(run_dir: str | os.PathLike, resume: str | None, overwrite: bool) -> None:
    """Before a run writes into ``run_dir`` (every rank calls it; rank 0 deletes): refuse a directory
    that holds another run unless this one continues it or ``overwrite`` deletes it; clean stale
    temporaries."""
    path = Path(run_dir)
    refuse = clean = False
    if path.is_dir() and holds_run(path):
        target = Path(resume).expanduser().resolve() if resume not in (None, "auto") else None
        continues = resume == "auto" or (target is not None and target.parent == path.resolve())
        refuse, clean = not continues and not overwrite, not continues and overwrite
    if refuse:
        raise ConfigError(
            f"run dir {path} already holds a run ({_describe(path)}); pass resume=auto to continue it, "
            "or overwrite=true to delete it and start over (or leave hydra.run.dir unset for a new directory)"
        )
    distributed.barrier()  # every rank has looked before rank 0 changes anything
    if not distributed.is_main_process() or not path.is_dir():
        return
    remove_stale_temporaries(path)
    if clean:
        for name in RUN_FILES:
            (path / name).unlink(missing_ok=True)
        for old in path.glob("epoch_*.pt"):
            old.unlink()
        shutil.rmtree(path / "tb", ignore_errors=True)
        log.info("overwrite=true: deleted the previous run's checkpoints and logs in %s", path)


def truncate_metrics(run_dir: str | os.PathLike, step: int) -> int:
    """Drop the ``metrics.jsonl`` records logged after optimizer step ``step`` (a resumed run logs them
    again); returns how many were dropped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return 0
    keep, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line torn by a crash mid-write
            dropped += 1
            continue
        if int(record.get("step", 0)) > step:
            dropped += 1
        else:
            keep.append(line)
    if dropped:
        write_text_atomic("".join(line + "\n" for line in keep), path)
    return dropped
