"""Where training stands, handed to every algorithm hook and every scalar schedule."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainState:
    """The trainer's position: ``epoch`` epochs and ``step`` optimizer steps completed, out of
    ``epochs`` x ``steps_per_epoch``. Hooks read it; only the trainer advances it."""

    epoch: int = 0
    step: int = 0
    steps_per_epoch: int = 1
    epochs: int = 1

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def progress(self) -> float:
        """Fraction of training done, in [0, 1]."""
        return min(1.0, self.step / max(1, self.total_steps))
