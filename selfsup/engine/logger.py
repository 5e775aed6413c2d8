"""Metrics to JSON lines and TensorBoard, and a progress display (rank 0 only).

``metrics.jsonl`` gets one object per record: ``{"kind": "train"|"knn"|..., "epoch": .., "step": ..,
<scalars>}``. TensorBoard event files go to ``<run dir>/tb`` under ``<kind>/<name>``. On a terminal
a tqdm bar shows progress; otherwise (logs, SLURM) plain lines every ``log.interval`` steps.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("selfsup")


@dataclass
class LogConfig:
    """``log``: how often and where metrics go."""

    interval: int = 10  # optimizer steps between log lines / metrics records
    tensorboard: bool = True  # also write TensorBoard event files to <run dir>/tb
    progress: bool = True  # a progress bar on a TTY (plain log lines otherwise)

    def __post_init__(self) -> None:
        from selfsup.errors import ConfigError

        if not self.interval >= 1:
            raise ConfigError(f"log.interval must be >= 1 (optimizer steps between log lines), got {self.interval}")


class MetricLogger:
    """``purge_step``: a resumed run discards TensorBoard events from that step on (logged again)."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = True, purge_step: int | None = None) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self._file = open(self.path, "a") if enabled else None  # noqa: SIM115 - kept open for the run
        self._tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=purge_step)

    def write(self, kind: str, step: int, epoch: float, **scalars: float) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "epoch": round(epoch, 4), "step": step, "time": round(time.time(), 3)}
        record.update({k: float(v) for k, v in scalars.items()})
        assert self._file is not None
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for name, value in scalars.items():
                self._tb.add_scalar(f"{kind}/{name}", float(value), step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class Progress:
    """Per-epoch progress: a tqdm bar on a TTY, else one log line every ``interval`` steps."""

    def __init__(self, enabled: bool, use_bar: bool, interval: int) -> None:
        self.enabled, self.interval = enabled, max(1, interval)
        self.use_bar = enabled and use_bar and sys.stderr.isatty()
        self._bar: Any = None
        self._total = 0
        self._desc = ""

    def start(self, epoch: int, epochs: int, total: int, done: int = 0) -> None:
        self._total, self._desc = total, f"epoch {epoch + 1}/{epochs}"
        if self.use_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=done, desc=self._desc, leave=False, dynamic_ncols=True)

    def update(self, step_in_epoch: int, scalars: dict[str, float] | None = None) -> None:
        """Call after each optimizer step; ``scalars`` only on logging steps."""
        if not self.enabled:
            return
        shown = {k: v for k, v in (scalars or {}).items() if k != "eta_s"}
        eta = format_seconds(scalars["eta_s"]) if scalars and "eta_s" in scalars else None
        if self._bar is not None:
            self._bar.update(1)
            if scalars:
                postfix = {k: f"{v:.4g}" for k, v in shown.items()}
                if eta:
                    postfix["eta"] = eta
                self._bar.set_postfix(postfix, refresh=False)
        elif scalars:
            text = " ".join(f"{k} {v:.4g}" for k, v in shown.items())
            log.info("%s step %d/%d %s%s", self._desc, step_in_epoch, self._total, text, f" eta {eta}" if eta else "")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def format_seconds(seconds: float) -> str:
    """``1h02m``, ``3m07s`` or ``42s``."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"
