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


class MetricLogger:
    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self._file = open(self.path, "a") if enabled else None  # noqa: SIM115 - kept open for the run
        self._tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tb"))

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

    def start(self, epoch: int, epochs: int, total: int) -> None:
        self._total, self._desc = total, f"epoch {epoch + 1}/{epochs}"
        if self.use_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=self._desc, leave=False, dynamic_ncols=True)

    def update(self, step_in_epoch: int, scalars: dict[str, float] | None = None) -> None:
        """Call after each optimizer step; ``scalars`` only on logging steps."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(1)
            if scalars:
                self._bar.set_postfix({k: f"{v:.4g}" for k, v in scalars.items()}, refresh=False)
        elif scalars:
            text = " ".join(f"{k} {v:.4g}" for k, v in scalars.items())
            log.info("%s step %d/%d %s", self._desc, step_in_epoch, self._total, text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
