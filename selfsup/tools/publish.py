"""Publish a training checkpoint: MMSelfSup's ``publish_model.py``, in pure Python.

    python -m selfsup.tools.publish IN OUT
    python -m selfsup.tools.publish outputs/<run>/last.pt zoo/                 # -> zoo/last-<sha8>.pth
    python -m selfsup.tools.publish outputs/<run>/last.pt zoo/simclr_r18_200e  # -> zoo/simclr_r18_200e-<sha8>.pth

Loads ``IN`` with ``torch.load(weights_only=True)``, keeps what ``load_pretrained`` needs (the model's
weights and state, the stored config, meta, epoch and step), drops the optimizer, LR scheduler, grad
scaler, RNG states and any other training-only entry, moves every tensor to the CPU, writes the file
atomically and names it ``<stem>-<sha8>.pth``: the first 8 hex digits of the file's SHA-256, the form
torch.hub's ``check_hash`` verifies. ``OUT`` is a folder (an existing one, or a path ending in ``/``:
the stem is ``IN``'s) or a file name stem (a ``.pth`` / ``.pt`` suffix is dropped). Prints the final
path, the size before and after, and the SHA-256.

The result is still a selfsup checkpoint: ``load_pretrained`` and ``count_params ckpt=`` take it; it
cannot resume training (no optimizer state). Bad input prints one line ``selfsup: error: ...`` and
exits with status 2.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from selfsup.engine import checkpoint as ckpt_io
from selfsup.errors import CheckpointError, ConfigError
from selfsup.tools import run_cli

# the entries a published file keeps: what load_pretrained reads (format, model, config, meta, epoch, step)
KEEP = ("format", "version", "epoch", "step", "model", "meta", "config")
CHUNK = 1 << 20


@dataclass
class Published:
    path: Path
    sha256: str
    size_in: int
    size_out: int
    dropped: list[str]


def sha256_file(path: str | os.PathLike, chunk: int = CHUNK) -> str:
    """The SHA-256 of a file's bytes, read ``chunk`` bytes at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def to_cpu(x: Any) -> Any:
    """``x`` with every tensor in it (in dicts, lists, tuples) on the CPU."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if isinstance(x, dict):
        return {k: to_cpu(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(to_cpu(v) for v in x)
    return x


def slim(state: dict[str, Any], source: str) -> tuple[dict[str, Any], list[str]]:
    """(the entries of ``state`` a published file keeps, on the CPU; the names of those dropped)."""
    for key, why in (("model", "no model weights"), ("config", "no config (load_pretrained rebuilds from it)")):
        if not state.get(key):
            raise CheckpointError(
                f"{source} cannot be published: it holds {why}; pass a checkpoint a selfsup run wrote"
            )
    kept = {k: to_cpu(state[k]) for k in KEEP if k in state}
    return kept, sorted(k for k in state if k not in KEEP)


def output_stem(src: Path, out: str | os.PathLike) -> Path:
    """The folder and stem (without ``-<sha8>.pth``) of the published file."""
    text = os.fspath(out)
    out_path = Path(text).expanduser()
    if not text:
        raise ConfigError("OUT is empty: pass a folder or a file name stem")
    if out_path.is_dir() or text.endswith(("/", os.sep)):
        return out_path / src.stem
    if out_path.suffix in (".pth", ".pt"):
        out_path = out_path.with_suffix("")
    return out_path


def publish(src: str | os.PathLike, out: str | os.PathLike) -> Published:
    """Write the published form of checkpoint ``src`` under ``out`` (see the module doc)."""
    from selfsup.engine.pretrained import existing_file

    src = existing_file(src)
    stem = output_stem(src, out)
    state, dropped = slim(ckpt_io.load(src), str(src))
    final, digest = write_hashed(state, stem)
    return Published(final, digest, src.stat().st_size, final.stat().st_size, dropped)


def write_hashed(obj: Any, stem: Path, tag: str = "publish") -> tuple[Path, str]:
    """Write ``obj`` atomically as ``<stem>-<sha8>.pth`` (the first 8 hex digits of the file's SHA-256,
    torch.hub's ``check_hash`` form) with the usual file permissions: (path, full SHA-256)."""
    tmp = stem.with_name(f".{stem.name}.{tag}.tmp")
    try:
        ckpt_io.save_atomic(obj, tmp)
        digest = sha256_file(tmp)
        final = stem.with_name(f"{stem.name}-{digest[:8]}.pth")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # a file to share: the usual permissions, not mkstemp's 0600
        os.replace(tmp, final)
    except OSError as e:
        raise CheckpointError(f"cannot write {stem.parent / (stem.name + '-<sha8>.pth')}: {e.strerror or e}") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # make the rename durable
        fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return final, digest


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


def format_result(p: Published) -> str:
    dropped = f" (dropped {', '.join(p.dropped)})" if p.dropped else ""
    return f"{p.path}\nsize: {_size(p.size_in)} -> {_size(p.size_out)}{dropped}\nsha256: {p.sha256}"


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip())
        return

    def run() -> Published:
        options = [a for a in argv if a.startswith("-") and a != "-"]
        if options:
            raise ConfigError(f"unknown option {options[0]}: usage: python -m selfsup.tools.publish IN OUT")
        if len(argv) != 2:
            raise ConfigError(
                f"publish takes 2 arguments, IN (a checkpoint) and OUT (a folder or a file name stem), got {len(argv)}"
            )
        return publish(argv[0], argv[1])

    result = run_cli(run)
    print(format_result(result), flush=True)


if __name__ == "__main__":
    main()
