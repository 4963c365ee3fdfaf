"""A small DenseNet (Huang et al., 2017): dense blocks that concatenate, one transition.

Channel couplings it exercises: `torch.cat` of every earlier feature map (a channel of one layer
is read by all later layers of the block, each at a different offset), pre-activation
BN-ReLU-conv ordering (the batch norm belongs to the consumer, not the producer), and a 1x1
transition conv with average pooling.
"""

from __future__ import annotations

import torch
from torch import nn


class DenseLayer(nn.Module):
    """BN-ReLU-conv3x3 producing `growth` new channels, appended to its input.

    With `bottleneck` (DenseNet-B, as in DenseNet-121) a BN-ReLU-conv1x1 to `4 * growth`
    channels comes first: most of the layer's parameters are then pointwise.
    """

    def __init__(self, in_channels: int, growth: int, bottleneck: bool = False) -> None:
        super().__init__()
        self.reduce: nn.Module = nn.Identity()
        if bottleneck:
            self.reduce = nn.Sequential(
                nn.BatchNorm2d(in_channels), nn.ReLU(), nn.Conv2d(in_channels, 4 * growth, 1, bias=False)
            )
            in_channels = 4 * growth
        self.norm = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(in_channels, growth, 3, 1, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        new = self.conv(self.relu(self.norm(self.reduce(x))))  # (N, growth, H, W)
        return torch.cat([x, new], dim=1)  # (N, C + growth, H, W)


class DenseBlock(nn.Sequential):
    """`num_layers` dense layers; the block grows its input by `num_layers * growth` channels."""

    def __init__(self, in_channels: int, num_layers: int, growth: int, bottleneck: bool = False) -> None:
        super().__init__(*(DenseLayer(in_channels + i * growth, growth, bottleneck) for i in range(num_layers)))


class Transition(nn.Sequential):
    """BN-ReLU-conv1x1 to compress channels, then 2x2 average pool to halve the resolution."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.BatchNorm2d(in_channels),
            nn.ReLU(),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.AvgPool2d(2),
        )


class DenseNet(nn.Module):
    """Stem conv, dense block, transition, dense block, BN-ReLU, pool, Linear."""

    def __init__(
        self, num_classes: int = 10, in_channels: int = 1, growth: int = 12, num_layers: int = 3, bottleneck: bool = False
    ) -> None:
        super().__init__()
        stem_channels = 2 * growth
        self.stem = nn.Conv2d(in_channels, stem_channels, 3, 1, 1, bias=False)
        self.block1 = DenseBlock(stem_channels, num_layers, growth, bottleneck)
        c1 = stem_channels + num_layers * growth
        # Halving at the transition is DenseNet-BC's compression; it keeps block2 affordable.
        self.transition = Transition(c1, c1 // 2)
        self.block2 = DenseBlock(c1 // 2, num_layers, growth, bottleneck)
        c2 = c1 // 2 + num_layers * growth
        self.head = nn.Sequential(
            nn.BatchNorm2d(c2),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(c2, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block1(self.stem(x))  # (N, c1, H, W)
        x = self.block2(self.transition(x))  # (N, c2, H/2, W/2)
        return self.head(x)  # (N, num_classes)


def densenet(num_classes: int = 10, in_channels: int = 1, growth: int = 12, num_layers: int = 3) -> DenseNet:
    """A ~30k-parameter DenseNet for small images (16x16 digits by default)."""
    return DenseNet(num_classes=num_classes, in_channels=in_channels, growth=growth, num_layers=num_layers)


def densenet_bc(num_classes: int = 10, in_channels: int = 1, growth: int = 12, num_layers: int = 3) -> DenseNet:
    """DenseNet-BC (bottleneck + compression, the family of DenseNet-121): 1x1 convs before every 3x3.

    Its pointwise layers stay learnable when the spatial filters are fixed, as in the paper's networks.
    """
    return DenseNet(num_classes=num_classes, in_channels=in_channels, growth=growth, num_layers=num_layers, bottleneck=True)
