"""selfsup: Hydra-composed self-supervised pretraining (ODC, MAE, SimCLR, ...) in plain PyTorch."""

__version__ = "0.1.0"
