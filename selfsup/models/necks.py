"""Necks: the layers between a backbone's pooled feature and an algorithm's head or loss."""

from __future__ import annotations

from torch import Tensor, nn


class MLPNeck(nn.Module):
    """Projection / prediction MLP (MMSelfSup's ``NonLinearNeck``).

    ``num_layers`` linear layers: Linear -> BN -> ReLU for all but the last, then Linear (-> BN if
    ``last_bn``). ``bias=None``: a Linear has a bias only when no BN follows it; ``bias=True``: every
    Linear has one (MMSelfSup's ``with_bias=True``, BYOL). Defaults follow MMSelfSup's SimCLR neck
    (2 layers, hidden 2048, output 128, BN after the last layer).
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int = 2048,
        out_dim: int = 128,
        num_layers: int = 2,
        last_bn: bool = True,
        bias: bool | None = None,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        layers: list[nn.Module] = []
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        for i in range(num_layers):
            last = i == num_layers - 1
            with_bn = last_bn or not last
            layers.append(nn.Linear(dims[i], dims[i + 1], bias=bias if bias is not None else not with_bn))
            if with_bn:
                layers.append(nn.BatchNorm1d(dims[i + 1]))
            if not last:
                layers.append(nn.ReLU(inplace=True))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x)


class SimCLRProjectionHead(MLPNeck):
    """SimCLR's projection head g (Chen et al. 2020, Sec. 2.1; MMSelfSup's neck): ``num_layers`` Linear
    layers with BN (and ReLU between), BN after the last one too, no biases: 2048 -> 2048 -> 128."""

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 128, num_layers: int = 2) -> None:
        super().__init__(in_dim, hidden_dim, out_dim, num_layers, last_bn=True)


class BYOLProjectionHead(MLPNeck):
    """BYOL's projector g (Grill et al. 2020, Sec. 3.3): Linear(4096) -> BN -> ReLU -> Linear(256), with
    biases and no BN on the output (MMSelfSup: ``NonLinearNeck(with_bias=True, with_last_bn=False)``)."""

    def __init__(self, in_dim: int, hidden_dim: int = 4096, out_dim: int = 256) -> None:
        super().__init__(in_dim, hidden_dim, out_dim, num_layers=2, last_bn=False, bias=True)


class BYOLPredictionHead(BYOLProjectionHead):
    """BYOL's predictor q (Grill et al. 2020, Sec. 3.3): the projector's architecture on its 256-d output."""

    def __init__(self, in_dim: int = 256, hidden_dim: int = 4096, out_dim: int = 256) -> None:
        super().__init__(in_dim, hidden_dim, out_dim)


class ODCNeck(nn.Module):
    """ODC's neck (MMSelfSup ``ODCNeck``): Linear -> BN(affine=False, momentum 0.001) -> ReLU ->
    Dropout(0.5) -> Linear -> ReLU; linear weights ~ N(0, 0.01), zero bias."""

    def __init__(self, in_dim: int, hidden_dim: int = 512, out_dim: int = 256) -> None:
        super().__init__()
        self.fc0 = nn.Linear(in_dim, hidden_dim)
        self.bn0 = nn.BatchNorm1d(hidden_dim, momentum=0.001, affine=False)
        self.drop = nn.Dropout(0.5)
        self.fc1 = nn.Linear(hidden_dim, out_dim)
        self.relu = nn.ReLU(inplace=True)
        for fc in (self.fc0, self.fc1):
            nn.init.normal_(fc.weight, std=0.01)
            nn.init.zeros_(fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.drop(self.relu(self.bn0(self.fc0(x))))
        return self.relu(self.fc1(x))
