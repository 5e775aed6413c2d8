"""The training loop and what it needs: optimizers, LR schedules, checkpoints, logging."""
