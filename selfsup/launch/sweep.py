"""What every run leaves behind about how it ended (``status.json``), and the table of a sweep.

Each run's rank 0 writes ``<run dir>/status.json`` when it starts (``running``) and when it ends:
``finished``, ``failed`` (with the error's one line and the log to read), ``interrupted`` (Ctrl-C) or
``preempted`` (a signal from SLURM or ``kill``; a requeued job continues). A sweep (``-m``) runs every
member to its end even when some fail; then :class:`SweepSummary` (a Hydra callback, in the process
that started the sweep) prints one table — member, overrides, status, epochs, final loss, kNN, run
dir — and writes it to the sweep dir as ``summary.md`` and ``summary.json``. A sweep submitted to SLURM
without waiting (``launcher.wait=false``) is summarised later by ``python -m selfsup.launch.sweep DIR``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from selfsup.engine.checkpoint import write_text_atomic

STATUS_FILE = "status.json"
FAILED = ("failed", "crashed")
SUMMARY_FIELDS = ("member", "overrides", "status", "epochs", "final_loss", "knn_top1", "run_dir")

# set by the submitit launcher when it returned without waiting: the members have not ended yet
_pending: dict[str, bool] = {}
# members that did not finish, counted by the last summary (``python -m selfsup.train -m`` exits 1 then)
failed_members: list[str] = []


def read_status(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    try:
        return json.loads((Path(run_dir) / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None


def write_status(run_dir: str | os.PathLike, status: str, **fields: Any) -> None:
    """Write (atomically) ``status.json`` in ``run_dir``: ``status`` plus ``fields``, merged into what
    the run wrote before (so the end keeps what the start recorded)."""
    path = Path(run_dir)
    path.mkdir(parents=True, exist_ok=True)
    record = read_status(path) or {}
    if status in ("running", "finished"):  # an error of an earlier attempt (before a requeue) is over
        record.pop("error", None)
    record.update(fields, status=status, updated=time.strftime("%Y-%m-%d %H:%M:%S"))
    write_text_atomic(json.dumps(record, indent=1, default=str) + "\n", path / STATUS_FILE)


def _overrides(member_dir: Path) -> list[str]:
    try:
        return [str(o) for o in yaml.safe_load((member_dir / ".hydra" / "overrides.yaml").read_text()) or []]
    except (OSError, yaml.YAMLError):
        return []


def members(sweep_dir: str | os.PathLike) -> list[Path]:
    """The member run dirs of a sweep (Hydra wrote ``.hydra/`` in each), in job-number order."""
    root = Path(sweep_dir)
    found = [p for p in root.iterdir() if p.is_dir() and (p / ".hydra").is_dir()] if root.is_dir() else []

    def key(p: Path) -> tuple[int, str]:
        head = p.name.split("_", 1)[0]
        return (int(head) if head.isdigit() else 1 << 30, p.name)

    return sorted(found, key=key)


def summarize(sweep_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """One row per member: its number, overrides, status, epochs done/planned, final loss, kNN, run dir
    (and the error and log of a member that failed)."""
    rows = []
    for member_dir in members(sweep_dir):
        status = read_status(member_dir) or {}
        state = status.get("status", "crashed" if not _pending.get(str(sweep_dir)) else "submitted")
        if state == "running" and not _pending.get(str(sweep_dir)):
            state = "crashed"  # the sweep is over, yet the run never said how it ended
        knn = status.get("knn_after") or {}
        row = {
            "member": member_dir.name.split("_", 1)[0],
            "overrides": " ".join(status.get("overrides") or _overrides(member_dir)),
            "status": state,
            "epochs": f"{status.get('epochs_done', 0)}/{status.get('epochs', '?')}",
            "final_loss": status.get("final_loss"),
            "knn_top1": knn.get("top1"),
            "run_dir": str(member_dir),
        }
        if state in FAILED or state in ("interrupted", "preempted"):
            row["error"] = status.get("error") or "the job ended without a word (killed?); see its log"
            row["log"] = status.get("log") or str(member_dir / "train.log")
        rows.append(row)
    return rows


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value).replace("|", "\\|")


def to_markdown(rows: list[dict[str, Any]]) -> str:
    head = "| " + " | ".join(SUMMARY_FIELDS) + " |\n|" + "---|" * len(SUMMARY_FIELDS) + "\n"
    body = "".join("| " + " | ".join(_cell(r.get(k)) for k in SUMMARY_FIELDS) + " |\n" for r in rows)
    errors = "".join(
        f"\n- member {r['member']} ({r['status']}): {r['error']} (log: {r['log']})" for r in rows if "error" in r
    )
    return head + body + (("\n" + errors.lstrip("\n") + "\n") if errors else "")


def write_summary(sweep_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Summarise the sweep, write ``summary.md`` / ``summary.json`` into it and print the table."""
    rows = summarize(sweep_dir)
    text = to_markdown(rows)
    root = Path(sweep_dir)
    if root.is_dir():
        (root / "summary.md").write_text(f"# sweep {root}\n\n{text}")
        (root / "summary.json").write_text(json.dumps(rows, indent=1, default=str) + "\n")
    done = sum(r["status"] == "finished" for r in rows)
    print(f"\nsweep {root}: {done} of {len(rows)} member(s) finished\n{text}", flush=True)
    print(f"(written to {root / 'summary.md'} and {root / 'summary.json'})", flush=True)
    failed_members[:] = [r["member"] for r in rows if r["status"] != "finished"]
    return rows


class SweepSummary(Callback):
    """Hydra callback (``hydra.callbacks.sweep_summary`` in ``conf/train.yaml``): the table at the end of
    every ``-m`` sweep."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = str(config.hydra.sweep.dir)
        if _pending.get(sweep_dir):
            print(
                f"\nthe sweep's jobs are submitted; when they have ended, its summary: "
                f"python -m selfsup.launch.sweep {sweep_dir}",
                flush=True,
            )
            return
        write_summary(sweep_dir)


def main(argv: list[str] | None = None) -> int:
    """``python -m selfsup.launch.sweep SWEEP_DIR``: print and write the summary of a sweep."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not Path(args[0]).is_dir():
        print("usage: python -m selfsup.launch.sweep SWEEP_DIR  (a multirun/... directory)", file=sys.stderr)
        return 2
    rows = write_summary(args[0])
    return 0 if rows and all(r["status"] == "finished" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
