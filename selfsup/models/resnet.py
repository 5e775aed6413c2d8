"""torchvision ResNets as SSL backbones (classifier removed, optional CIFAR stem)."""

from __future__ import annotations

from typing import Literal

import torch
import torchvision
from torch import Tensor, nn

from selfsup.errors import ConfigError


class ResNet(nn.Module):
    """A torchvision ResNet trunk; ``forward`` returns globally average-pooled features [B, C].

    Sub-modules keep torchvision's names (conv1, bn1, layer1..layer4), so a backbone state dict
    loads into ``torchvision.models.<arch>`` with ``strict=False`` (only ``fc`` is missing).

    Args:
        arch: a torchvision constructor name: resnet18/34/50/101/152, resnext*, wide_resnet*.
        stem: "imagenet" (7x7 stride-2 conv + max-pool) or "cifar" (3x3 stride-1 conv, no
            max-pool), which keeps the resolution of small images such as CIFAR's 32x32.
        zero_init_residual: zero the last BN of each residual branch (SimCLR recipe).
    """

    def __init__(
        self, arch: str = "resnet50", stem: Literal["imagenet", "cifar"] = "imagenet", zero_init_residual: bool = False
    ) -> None:
        super().__init__()
        if not arch.startswith(("resnet", "resnext", "wide_resnet")) or not hasattr(torchvision.models, arch):
            raise ConfigError(f"backbone.arch={arch!r} is not a torchvision ResNet (e.g. resnet18, resnet50)")
        if stem not in ("imagenet", "cifar"):
            raise ConfigError(f"backbone.stem={stem!r} must be 'imagenet' or 'cifar'")
        net = getattr(torchvision.models, arch)(weights=None, zero_init_residual=zero_init_residual)
        if stem == "cifar":
            net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
            net.maxpool = nn.Identity()
        self.arch, self.stem = arch, stem
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.num_features: int = net.fc.in_features

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        """Feature maps after the stem and after each of the four stages."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outs = [x]
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            outs.append(x)
        return outs

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
