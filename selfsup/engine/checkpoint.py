"""Checkpoints: atomic writes, safe loads, RNG state, readable mismatch reports.

A checkpoint is a dict of tensors and plain Python values only, so it loads with
``torch.load(weights_only=True)`` (no pickled code runs when a user hands us a file)::

    {"format": "selfsup-checkpoint", "version": 1, "epoch": int (epochs done), "step": int,
     "model": state_dict (algorithm incl. its memory/queues), "optimizer": ..., "scheduler": ...,
     "scaler": ... or None, "rng": {...}, "meta": {"algo": ..., "backbone": ..., ...},
     "config": resolved config as YAML text}
"""

from __future__ import annotations

import logging
import os
import random
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from selfsup import distributed
from selfsup.errors import CheckpointError

FORMAT = "selfsup-checkpoint"
log = logging.getLogger("selfsup")


@dataclass
class CheckpointConfig:
    """``checkpoint``: which epoch checkpoints are kept (``last.pt`` is rewritten every epoch)."""

    interval: int = 1  # keep epoch_NNNN.pt every N epochs (and the final one); 0 = only last.pt
    keep: int = 3  # keep only the newest N epoch_NNNN.pt (0 = all); MMSelfSup keeps 3

    def __post_init__(self) -> None:
        from selfsup.errors import ConfigError

        if not self.interval >= 0:
            raise ConfigError(f"checkpoint.interval must be >= 0 (0 = only last.pt), got {self.interval}")
        if not self.keep >= 0:
            raise ConfigError(f"checkpoint.keep must be >= 0 (0 = keep all), got {self.keep}")


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


def save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``: a crash at
    any moment leaves either the old complete file or the new complete file, never a torn one.

    A failed write (disk full, quota, read-only or forbidden folder: an ``OSError``, which torch may
    wrap in a ``RuntimeError``) raises a :class:`CheckpointError` naming the file and the OS's reason."""
    import contextlib
    import errno

    path = Path(path)

    def os_error_behind(e: BaseException) -> OSError | None:
        seen: BaseException | None = e
        while seen is not None and not isinstance(seen, OSError):
            seen = seen.__cause__ or seen.__context__
        return seen if isinstance(e, Exception) else None  # never swallow KeyboardInterrupt / SystemExit

    def write_error(e: OSError) -> CheckpointError:
        reason = e.strerror or str(e) or type(e).__name__
        if path.is_file():
            previous = "the previous checkpoint at that path is intact"
        else:
            previous = "there was no previous checkpoint at that path"
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            todo = f"free disk space (or quota) for {path.parent} and run again"
        elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            todo = f"make {path.parent} writable or pick another hydra.run.dir"
        else:
            todo = "fix that and run again"
        return CheckpointError(f"cannot write checkpoint {path}: {reason}; {previous}; {todo}")

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise write_error(e) from e
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):  # keep the original error
            Path(tmp).unlink(missing_ok=True)
        cause = os_error_behind(e)
        if cause is None:
            raise
        raise write_error(cause) from e
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


def write_text_atomic(text: str, path: str | os.PathLike) -> Path:
    """Write a small text file (JSON, markdown, status) through a temporary file and a rename: readers
    see the old or the new content, never half of it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def load(path: str | os.PathLike, mmap: bool = False, plain_ok: bool = False) -> dict[str, Any]:
    """Load a checkpoint on the CPU with ``weights_only=True`` (no code in a file we are given runs);
    ``mmap=True`` maps the tensors instead of reading them (to look at a large file's entries).

    Each way a path can be wrong is one :class:`CheckpointError` line saying what the path is: missing,
    a folder, not a torch file, a torch file of pickled Python objects, a damaged torch file, or one
    without selfsup's ``format`` entry. (torch's advice to retry with unsafe unpickling is never passed on.)
    ``plain_ok=True`` also accepts a plain dict of tensors (an exported backbone's state dict)."""
    import pickle
    import re
    import zipfile

    path = Path(path).expanduser()
    if path.is_dir():
        last = path / "last.pt"
        if last.is_file():
            hint = f"pass the .pt file (e.g. {last}) or run in that folder with hydra.run.dir={path} resume=auto"
        elif others := sorted(path.glob("*.pt")):
            hint = f"pass the .pt file (e.g. {others[-1]}); the folder holds no last.pt for resume=auto"
        else:
            hint = "pass the .pt file of a selfsup run (this folder holds none)"
        raise CheckpointError(f"resume={path} is a folder, not a checkpoint: {hint}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass resume=<path to a .pt file> or resume=auto")
    use = "; pass the last.pt or an epoch_NNNN.pt that a selfsup run wrote"
    not_torch = f"{path} is not a selfsup checkpoint (not a file written by torch.save)"
    damaged = f"{path} is a damaged checkpoint: torch.save wrote it, but it is cut short or corrupt"
    try:
        # what torch.save writes: a zip archive of <name>/data.pkl + tensors (cut short, it is no valid
        # zip), or (legacy format) a pickle that starts with torch's magic number. Anything else is
        # refused before torch reads it.
        with open(path, "rb") as f:
            head = f.read(4096)
        legacy = head.startswith(b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little"))
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                if not any(name.endswith("/data.pkl") for name in z.namelist()):
                    raise CheckpointError(f"{not_torch}: a zip archive without torch's data.pkl{use}")
        elif head.startswith(b"PK\x03\x04") and b"/data.pkl" in head:
            raise CheckpointError(f"{damaged} (an interrupted copy?); use another checkpoint of that run")
        elif not legacy:
            raise CheckpointError(not_torch + (": the file is empty" if not head else "") + use)
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and not legacy)
    except OSError as e:  # unreadable: permissions, I/O error
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    except CheckpointError:
        raise
    except Exception as e:  # a torch file of pickled Python objects, or a damaged one
        text = str(e)
        if isinstance(e, pickle.UnpicklingError) and "weights only" in text.lower():
            found = re.search(r"GLOBAL ([\w.]+)", text)
            what = f" ({found.group(1)})" if found else ""
            raise CheckpointError(
                f"{path} is not a selfsup checkpoint: it holds Python objects{what} that would have to be "
                f"unpickled, which selfsup never does for files it is given{use}"
            ) from None
        reason = (text.strip().splitlines() or [type(e).__name__])[0].split(". ")[0]
        if "weights_only" in reason:
            reason = type(e).__name__
        raise CheckpointError(f"{damaged} ({reason}); use another checkpoint of that run") from None
    plain = isinstance(ckpt, dict) and bool(ckpt) and all(isinstance(v, torch.Tensor) for v in ckpt.values())
    if plain_ok and plain:
        return ckpt
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a selfsup training checkpoint (no 'format: {FORMAT}' entry)")
    return ckpt


def find_last(run_dir: str | os.PathLike) -> Path | None:
    last = Path(run_dir) / "last.pt"
    return last if last.is_file() else None


def summarise(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown} (+{len(keys) - limit} more)" if len(keys) > limit else shown


def load_model_state(model: nn.Module, state: dict[str, Any], source: str) -> None:
    """Strict load that reports every kind of mismatch in one line."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and hasattr(state[k], "shape") and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys: {summarise(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {summarise(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches (checkpoint vs model): {summarise(shapes, 3)}")
        raise CheckpointError(
            f"{source} holds another architecture than this run's model — "
            + "; ".join(parts)
            + ". Resume with the same algo/backbone/dataset options as the run that wrote it"
        )
    model.load_state_dict(state)


def link_or_save(src: Path, dst: Path, state: dict[str, Any]) -> None:
    """Point ``dst`` at the same bytes as ``src`` (hard link, atomic rename); write a copy if the
    file system has no hard links."""
    tmp = dst.with_name(f".{dst.name}.link.tmp")
    try:
        tmp.unlink(missing_ok=True)
        os.link(src, tmp)
        os.replace(tmp, dst)
    except OSError:
        save_atomic(state, dst)


class CheckpointManager:
    """Saves and restores a run's stateful objects (``state_dict`` / ``load_state_dict``) in one
    ``weights_only``-loadable file, with every rank's RNG states.

    ``save`` is collective (all ranks gather their RNG states; rank 0 writes): ``last.pt`` every call,
    and ``epoch_NNNN.pt`` every ``interval`` epochs and at the end, of which the newest ``keep`` are
    kept; ``last.pt`` is then a hard link to the epoch file, not a second copy. ``restore`` loads a
    checkpoint into the objects (the ``model`` entry strictly, with a report of every mismatch) and
    this rank's RNG state, and returns the checkpoint for the caller's own entries.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        cfg: CheckpointConfig,
        stateful: Mapping[str, Stateful],
        save_only: tuple[str, ...] = (),
    ) -> None:
        # ``save_only``: entries written for the record but rebuilt from the config on restore (the lr
        # schedule: its shape follows the current config, see selfsup/engine/resume.py)
        self.run_dir, self.cfg, self.stateful, self.save_only = Path(run_dir), cfg, dict(stateful), save_only

    @property
    def last(self) -> Path | None:
        return find_last(self.run_dir)

    def save(
        self, epoch: int, step: int, final: bool, extra: Mapping[str, Any] | None = None, epoch_end: bool = True
    ) -> Path:
        """Write ``last.pt`` (every rank calls it; rank 0 writes). At an epoch's end (``epoch_end``) every
        ``interval`` epochs (and the final one) as ``epoch_NNNN.pt`` with ``last.pt`` a hard link to it;
        a checkpoint in the middle of an epoch (a stop) replaces only ``last.pt``."""
        rng = rng_state()
        rngs: list[Any] = [rng]
        if distributed.get_world_size() > 1:
            rngs = [None] * distributed.get_world_size()
            dist.all_gather_object(rngs, rng)
        path = self.run_dir / "last.pt"
        if distributed.is_main_process():
            state: dict[str, Any] = {"format": FORMAT, "version": 1, "epoch": epoch, "step": step}
            state.update({name: obj.state_dict() for name, obj in self.stateful.items()})
            state["rng"] = rngs
            state.update(extra or {})
            interval, keep = self.cfg.interval, self.cfg.keep
            if epoch_end and interval > 0 and (epoch % interval == 0 or final):
                epoch_path = save_atomic(state, self.run_dir / f"epoch_{epoch:04d}.pt")
                link_or_save(epoch_path, path, state)
                if keep > 0:
                    for old in sorted(self.run_dir.glob("epoch_*.pt"))[:-keep]:
                        old.unlink(missing_ok=True)
            else:
                save_atomic(state, path)
        distributed.barrier()
        return path

    def restore(self, path: str | os.PathLike, state: dict[str, Any] | None = None) -> dict[str, Any]:
        """Load ``path`` (or its already loaded ``state``) into the stateful objects and this rank's RNG."""
        state = load(path) if state is None else state
        for name, obj in self.stateful.items():
            if name in self.save_only:
                continue
            if name == "model":
                assert isinstance(obj, nn.Module)
                load_model_state(obj, state[name], str(path))
            elif state.get(name):  # e.g. an empty grad-scaler state when fp16 was off
                try:
                    obj.load_state_dict(state[name])
                except (ValueError, KeyError, RuntimeError) as e:
                    raise CheckpointError(
                        f"{path}: its {name} state does not fit this run ({str(e).splitlines()[0]}); resume "
                        "with the settings it was trained with"
                    ) from None
        rngs = state.get("rng") or []
        if len(rngs) == distributed.get_world_size():
            set_rng_state(rngs[distributed.get_rank()])
        else:
            log.warning(
                "checkpoint has RNG states for %d process(es), this run has %d: reseeding",
                len(rngs),
                distributed.get_world_size(),
            )
            state["rng_restored"] = False
        return state


def rng_state() -> dict[str, Any]:
    np_state: tuple[Any, ...] = np.random.get_state(legacy=True)  # type: ignore[assignment]
    return {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.tensor(np_state[1].astype(np.int64)),  # a copy: from_numpy tensors do not pickle
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_to_tuple(state["python"]))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_tuple(x: Any) -> Any:
    """``random.setstate`` wants tuples; be tolerant of lists."""
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x
