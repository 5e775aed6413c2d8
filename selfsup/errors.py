"""User-facing errors: each carries one line that says what was wrong and what to do.

``python -m selfsup.train`` prints ``selfsup: error: <message>`` for these and exits with status 2
(set ``HYDRA_FULL_ERROR=1`` for the traceback). Anything else is a bug and keeps its traceback.
"""


class SelfsupError(Exception):
    """Base class: a problem with the user's input or environment, reported in one line."""


class ConfigError(SelfsupError):
    """An invalid combination of config values."""


class DataError(SelfsupError):
    """A dataset that is missing, empty or unreadable."""


class CheckpointError(SelfsupError):
    """A checkpoint that is missing, unreadable or does not match the model."""


class TrainingDiverged(SelfsupError):
    """The loss became NaN or infinite."""


class TrainingInterrupted(SelfsupError):
    """The user stopped the run (Ctrl-C / SIGINT); it stopped at a step boundary with a checkpoint."""


class TrainingPreempted(TrainingInterrupted):
    """A signal (SIGUSR1/SIGUSR2 from SLURM before a time limit or preemption, SIGTERM from ``kill`` or
    the scheduler) stopped the run at a step boundary with a checkpoint of that step."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
