"""Every run under ``outputs/`` and ``multirun/``, one line each: what it trains, how far it got, how it ended.

::

    python -m selfsup.tools.runs                          # outputs/ and multirun/ under the current directory
    python -m selfsup.tools.runs multirun/simclr algo=simclr schedule.epochs=7 --sort=-knn  # best kNN first
    python -m selfsup.tools.runs --json                   # one JSON object per run, for scripts

A run dir is a directory holding ``config.yaml``, ``status.json`` or ``metrics.jsonl`` (a ROOT may be
one itself). Only those small files and ``.hydra/`` are read, never a checkpoint.

Filters are ``key=value`` in override style: a Hydra choice (``algo=simclr``, ``backbone=resnet18``,
from ``.hydra/hydra.yaml``) or a dotted key of the run's resolved ``config.yaml``
(``schedule.epochs=7``, ``algo.model._target_=selfsup.algorithms.simclr.SimCLR``; a ``_target_`` also
matches its class name alone). Values compare as YAML (``7`` matches ``7`` and ``7.0``); a key that no
run has is an error (a typo would otherwise just match nothing).

**Status.** From ``status.json`` when the run wrote one (``finished``, ``failed``, ``interrupted``,
``preempted``, ``running``; ``crashed`` from a sweep). ``running`` is believed only while the run still
writes: when neither ``status.json`` nor ``metrics.jsonl`` changed for ``--stale`` minutes (10 by
default) the process died without a word (killed, out of memory, node lost) and the run shows as
``crashed?``. A run without ``status.json`` is ``finished`` when its last ``epoch`` record reached the
planned ``schedule.epochs``, else ``running`` if ``metrics.jsonl`` (or ``config.yaml``) changed in the
last ``--stale`` minutes, else ``crashed?``.

Lines of ``metrics.jsonl`` that are not JSON (torn by a crash mid-write) are skipped. A ROOT that does
not exist or holds no run prints one ``selfsup: error:`` line and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from selfsup.errors import ConfigError, DataError, SelfsupError
from selfsup.launch.sweep import read_status

DEFAULT_ROOTS = ("outputs", "multirun")
RUN_MARKERS = ("config.yaml", "status.json", "metrics.jsonl")  # a directory with one of these is a run
STALE_MINUTES = 10.0  # a run that wrote nothing for this long is no longer running
# table columns: (key of the row, header); --sort takes any key (or header)
COLUMNS = (
    ("algo", "algo"),
    ("backbone", "backbone"),
    ("dataset", "dataset"),
    ("epochs", "epochs"),
    ("status", "status"),
    ("final_loss", "loss"),
    ("knn", "knn top-1"),
    ("seconds", "time"),
    ("started", "started"),
    ("run_dir", "run dir"),
)
# sort keys that order by a number rather than by the text shown
_SORT_VALUE = {"epochs": "epochs_done", "knn": "knn_after", "loss": "final_loss", "time": "seconds", "run": "run_dir"}


# ------------------------------------------------------------------------------------------- reading
def is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in RUN_MARKERS)


def find_runs(root: str | os.PathLike) -> list[Path]:
    """The run dirs at or under ``root`` (a run's own sub-folders, and hidden ones, are not searched)."""
    top = Path(root)
    if is_run_dir(top):
        return [top]
    found = []
    for here, dirs, _ in os.walk(top):
        base = Path(here)
        keep = []
        for name in sorted(dirs):
            if name.startswith("."):
                continue
            if is_run_dir(base / name):
                found.append(base / name)
            else:
                keep.append(name)
        dirs[:] = keep
    return found


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of ``<run_dir>/metrics.jsonl`` ([] when it has none); lines that are not a JSON object
    (torn by a crash mid-write, like :func:`selfsup.engine.run_dir.truncate_metrics` skips) are skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from e
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line torn by a crash mid-write
            continue
        if isinstance(record, dict) and "kind" in record:
            records.append(record)
    return records


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None


def read_config(run_dir: Path) -> dict[str, Any]:
    """The run's resolved config (``config.yaml``, else Hydra's ``.hydra/config.yaml``), {} if neither."""
    for path in (run_dir / "config.yaml", run_dir / ".hydra" / "config.yaml"):
        cfg = _read_yaml(path)
        if isinstance(cfg, dict):
            return cfg
    return {}


def read_choices(run_dir: Path) -> dict[str, Any]:
    """Hydra's config-group choices of the run (``algo: simclr``, ...), {} without ``.hydra/hydra.yaml``."""
    hydra_cfg = _read_yaml(run_dir / ".hydra" / "hydra.yaml")
    try:
        choices = hydra_cfg["hydra"]["runtime"]["choices"]
    except (TypeError, KeyError):
        return {}
    return choices if isinstance(choices, dict) else {}


def read_overrides(run_dir: Path, status: dict[str, Any] | None = None) -> list[str]:
    if status and isinstance(status.get("overrides"), list):
        return [str(o) for o in status["overrides"]]
    found = _read_yaml(run_dir / ".hydra" / "overrides.yaml")
    return [str(o) for o in found] if isinstance(found, list) else []


def lookup(cfg: Any, dotted: str) -> tuple[bool, Any]:
    """``(True, value)`` of ``a.b.c`` in nested dicts / lists, ``(False, None)`` if absent."""
    node = cfg
    for part in dotted.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.lstrip("-").isdigit() and -len(node) <= int(part) < len(node):
            node = node[int(part)]
        else:
            return False, None
    return True, node


def _class_name(target: Any) -> str | None:
    return str(target).rsplit(".", 1)[-1] if target else None


def _short_names(cfg: dict[str, Any], choices: dict[str, Any]) -> dict[str, str | None]:
    """algo / backbone / dataset: the Hydra choice (simclr, resnet18, fake), else the class name."""
    algo = choices.get("algo") or _class_name(lookup(cfg, "algo.model._target_")[1])
    backbone = choices.get("backbone") or lookup(cfg, "backbone.arch")[1]
    backbone = backbone or _class_name(lookup(cfg, "backbone._target_")[1])
    dataset = choices.get("dataset") or _class_name(lookup(cfg, "dataset._target_")[1])
    return {"algo": algo, "backbone": backbone, "dataset": dataset}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _top1(value: Any) -> float | None:
    return _number(value.get("top1")) if isinstance(value, dict) else None


def _last_change(run_dir: Path) -> float:
    times = [(run_dir / n).stat().st_mtime for n in (*RUN_MARKERS, "train.log") if (run_dir / n).is_file()]
    return max(times, default=0.0)


def describe(run_dir: Path, now: float | None = None, stale_minutes: float = STALE_MINUTES) -> dict[str, Any]:
    """One row: names, epochs, status (see the module docstring), final loss, kNN, wall time, ..."""
    now = time.time() if now is None else now
    status = read_status(run_dir) or {}
    cfg = read_config(run_dir)
    choices = read_choices(run_dir)
    records = read_metrics(run_dir)
    epochs = [r for r in records if r.get("kind") == "epoch"]
    knn = [r for r in records if r.get("kind") == "knn"]

    planned = status.get("epochs") if status.get("epochs") is not None else lookup(cfg, "schedule.epochs")[1]
    done_metrics = int(_number(epochs[-1].get("epoch")) or 0) if epochs else 0
    done = max(done_metrics, int(_number(status.get("epochs_done")) or 0))
    final_loss = _number(status.get("final_loss"))
    if final_loss is None and epochs:
        final_loss = _number(epochs[-1].get("loss"))
    knn_before = _top1(status.get("knn_before"))
    if knn_before is None and knn and knn[0].get("step", 0) == 0:
        knn_before = _number(knn[0].get("top1"))
    knn_after = _top1(status.get("knn_after"))
    if knn_after is None and knn and knn[-1].get("step", 0) > 0:
        knn_after = _number(knn[-1].get("top1"))
    times = [t for t in (_number(r.get("time")) for r in records) if t is not None]
    seconds = _number(status.get("seconds"))
    if seconds is None and len(times) > 1:
        seconds = round(max(times) - min(times), 1)

    writing = now - _last_change(run_dir) < stale_minutes * 60
    state = status.get("status")
    if state == "running" and not writing:
        state = "crashed?"
    elif not state:
        reached = isinstance(planned, int) and done >= planned > 0
        state = "finished" if reached else ("running" if writing else "crashed?")

    started = min(times) if times else None
    row = {
        "run_dir": str(run_dir),
        **_short_names(cfg, choices),
        "epochs_done": done,
        "epochs_planned": planned,
        "epochs": f"{done}/{planned if planned is not None else '?'}",
        "status": state,
        "final_loss": final_loss,
        "knn_before": knn_before,
        "knn_after": knn_after,
        "seconds": seconds,
        "started": time.strftime("%Y-%m-%d %H:%M", time.localtime(started)) if started else None,
        "overrides": read_overrides(run_dir, status),
    }
    if status.get("error"):
        row["error"] = status["error"]
    return row


# --------------------------------------------------------------------------------------------- filters
def parse_filters(args: Iterable[str]) -> list[tuple[str, str]]:
    out = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or not key:
            raise ConfigError(f"filter {arg!r} is not key=value (e.g. algo=simclr or schedule.epochs=7)")
        out.append((key.lstrip("+~"), value))
    return out


def _same(actual: Any, wanted: str, key: str) -> bool:
    try:
        parsed = yaml.safe_load(wanted) if wanted else ""
    except yaml.YAMLError:
        parsed = wanted
    if actual == parsed or str(actual) == wanted:
        return True
    return key.endswith("_target_") and _class_name(actual) == wanted


def _value(run_dir: Path, key: str, cache: dict[Path, tuple[dict, dict]]) -> tuple[bool, Any]:
    if run_dir not in cache:
        cache[run_dir] = (read_choices(run_dir), read_config(run_dir))
    choices, cfg = cache[run_dir]
    if key in choices:
        return True, choices[key]
    return lookup(cfg, key)


def apply_filters(runs: Sequence[Path], filters: Sequence[tuple[str, str]]) -> list[Path]:
    cache: dict[Path, tuple[dict, dict]] = {}
    kept = list(runs)
    for key, wanted in filters:
        if runs and not any(_value(r, key, cache)[0] for r in runs):
            raise ConfigError(f"no run has the key {key!r} (in config.yaml or as a Hydra choice such as algo=simclr)")
        kept = [r for r in kept if (lambda f: f[0] and _same(f[1], wanted, key))(_value(r, key, cache))]
    return kept


# ----------------------------------------------------------------------------------------------- table
def sort_rows(rows: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """Rows ordered by ``key`` (a column key or header; ``-key`` for descending); empty cells last."""
    descending = key.startswith("-")
    name = key.lstrip("-")
    by_header = {header: k for k, header in COLUMNS}
    name = by_header.get(name, name)
    name = _SORT_VALUE.get(name, name)
    if rows and not any(name in r for r in rows):
        keys = ", ".join(k for k, _ in COLUMNS)
        raise ConfigError(f"cannot sort by {key!r}: the columns are {keys} (prefix - for descending)")
    present = [r for r in rows if r.get(name) is not None]
    missing = [r for r in rows if r.get(name) is None]

    def order(r: dict[str, Any]) -> tuple[int, Any]:
        value = r[name]
        return (0, value) if isinstance(value, (int, float)) else (1, str(value))

    return sorted(present, key=order, reverse=descending) + missing


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(round(seconds))
    if s < 60:
        return f"{seconds:.1f}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _cells(row: dict[str, Any], cwd: Path) -> list[str]:
    def num(v: float | None) -> str:
        return "-" if v is None else f"{v:.4f}"

    run_dir = Path(row["run_dir"])
    try:
        shown = str(run_dir.resolve().relative_to(cwd.resolve()))
    except ValueError:
        shown = str(run_dir)
    knn = (
        "-"
        if row["knn_before"] is None and row["knn_after"] is None
        else (f"{num(row['knn_before'])} -> {num(row['knn_after'])}")
    )
    by_key = {
        "final_loss": num(row["final_loss"]),
        "knn": knn,
        "seconds": _duration(row["seconds"]),
        "run_dir": shown,
    }
    return [by_key.get(k, "-" if row.get(k) is None else str(row[k])) for k, _ in COLUMNS]


def format_table(rows: Sequence[dict[str, Any]], cwd: Path | None = None) -> str:
    """The rows as an aligned text table (a header line, then one line per run)."""
    cwd = Path.cwd() if cwd is None else cwd
    lines = [[header for _, header in COLUMNS]] + [_cells(r, cwd) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def collect(
    roots: Sequence[str], filters: Sequence[str] = (), sort: str = "started", stale_minutes: float = STALE_MINUTES
) -> list[dict[str, Any]]:
    """The rows of the runs under ``roots`` (the default roots when empty) that pass ``filters``."""
    explicit = bool(roots)
    runs: list[Path] = []
    for root in roots or DEFAULT_ROOTS:
        path = Path(root)
        if not path.exists():
            if explicit:
                raise DataError(f"{root}: no such file or directory")
            continue
        found = find_runs(path)
        if explicit and not found:
            raise DataError(f"{root} holds no run (a run dir holds {', '.join(RUN_MARKERS)})")
        runs += [r for r in found if r not in runs]
    if not runs and not explicit:
        raise DataError(
            f"no run under {' or '.join(d + '/' for d in DEFAULT_ROOTS)} of {Path.cwd()}; name a ROOT "
            "(python -m selfsup.tools.runs DIR)"
        )
    runs = apply_filters(runs, parse_filters(filters))
    now = time.time()
    rows = [describe(r, now=now, stale_minutes=stale_minutes) for r in runs]
    return sort_rows(rows, sort)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m selfsup.tools.runs",
        description="List the runs under outputs/ and multirun/ (or the ROOTs): algo, backbone, dataset, "
        "epochs, status, final loss, kNN top-1, wall time, run dir.",
    )
    parser.add_argument("args", nargs="*", metavar="ROOT | key=value", help="directories to search; filters")
    parser.add_argument("--sort", default="started", help="column to sort by (--sort=-COLUMN: descending)")
    parser.add_argument("--reverse", action="store_true", help="sort in descending order")
    parser.add_argument("--json", action="store_true", help="print a JSON list of the rows")
    parser.add_argument("--stale", type=float, default=STALE_MINUTES, help="minutes without a write: crashed?")
    ns = parser.parse_args(sys.argv[1:] if argv is None else argv)
    filters = [a for a in ns.args if "=" in a and not Path(a).exists()]
    roots = [a for a in ns.args if a not in filters]
    try:
        rows = collect(roots, filters, ("-" if ns.reverse else "") + ns.sort, ns.stale)
    except SelfsupError as e:
        from selfsup.train import EXIT_USER_ERROR, report

        report(e)
        return EXIT_USER_ERROR
    if ns.json:
        print(json.dumps(rows, indent=1, default=str))
    else:
        print(format_table(rows))
        if filters:
            print(f"({len(rows)} run(s) match {' '.join(filters)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
