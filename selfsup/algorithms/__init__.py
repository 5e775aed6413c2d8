"""Self-supervised algorithms, one per file: backbone -> neck -> head -> loss."""

from selfsup.algorithms.base import Algorithm, Batch, TrainContext

__all__ = ["Algorithm", "Batch", "TrainContext"]
