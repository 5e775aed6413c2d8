"""Losses: one small ``nn.Module`` each, with the formula and the paper in its docstring."""

from selfsup.losses.byol import BYOLLoss
from selfsup.losses.mae_reconstruction import MAEReconstructionLoss
from selfsup.losses.ntxent import NTXentLoss
from selfsup.losses.weighted_ce import ClassWeightedCrossEntropy

__all__ = ["BYOLLoss", "ClassWeightedCrossEntropy", "MAEReconstructionLoss", "NTXentLoss"]
