"""Necks: the layers between a backbone's pooled feature and an algorithm's head or loss."""

from __future__ import annotations

from torch import Tensor, nn


class MLPNeck(nn.Module):
    """Projection MLP of SimCLR (and MoCo v2 / BYOL-style methods).

    ``num_layers`` linear layers: Linear -> BN -> ReLU for all but the last, then Linear (-> BN if
    ``last_bn``). Linears followed by BN have no bias. Defaults follow MMSelfSup's SimCLR neck
    (2 layers, hidden 2048, output 128, BN after the last layer).
    """

    def __init__(
        self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 128, num_layers: int = 2, last_bn: bool = True
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        layers: list[nn.Module] = []
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        for i in range(num_layers):
            last = i == num_layers - 1
            with_bn = last_bn or not last
            layers.append(nn.Linear(dims[i], dims[i + 1], bias=not with_bn))
            if with_bn:
                layers.append(nn.BatchNorm1d(dims[i + 1]))
            if not last:
                layers.append(nn.ReLU(inplace=True))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x)


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
