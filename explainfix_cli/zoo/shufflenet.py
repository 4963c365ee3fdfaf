"""A small ShuffleNet v2 (Ma et al., 2018) with one ResNeXt-style grouped bottleneck before the pool.

Channel couplings it exercises: channel splits (`x.chunk(2, dim=1)`: the first half passes
through untouched, the second half feeds a branch), concatenations of the two halves followed by
a channel shuffle (a view/transpose/reshape that interleaves the two halves, so channel i of the
concatenation becomes channel 2i or 2(i - C/2) + 1), depthwise 3x3 convs (stride 1 and 2), a
downsampling unit whose two branches both read the whole input, and a grouped 3x3 conv that is
not depthwise (each output channel reads only `C / groups` inputs, so channels are tied to their
group) inside a residual addition.
"""

from __future__ import annotations

import torch
from torch import nn


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave the channels of `groups` equal blocks, so that each block mixes with the others."""
    n, c, h, w = x.shape
    x = x.view(n, groups, c // groups, h, w)  # (N, g, C/g, H, W)
    return x.transpose(1, 2).reshape(n, c, h, w)  # (N, C, H, W), channel j*g + i <- i*C/g + j


def _branch(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """1x1 conv-BN-ReLU, depthwise 3x3 (stride `stride`)-BN, 1x1 conv-BN-ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
        nn.Conv2d(out_channels, out_channels, 3, stride, 1, groups=out_channels, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.Conv2d(out_channels, out_channels, 1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


class ShuffleUnit(nn.Module):
    """ShuffleNet v2 basic unit: split the channels in half, transform the second, concat, shuffle."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.branch = _branch(channels // 2, channels // 2, stride=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=1)  # (N, C/2, H, W) each
        out = torch.cat([x1, self.branch(x2)], dim=1)  # (N, C, H, W)
        return channel_shuffle(out, 2)


class DownsampleUnit(nn.Module):
    """ShuffleNet v2 downsampling unit: two stride-2 branches on the whole input, concat, shuffle.

    Each branch produces `out_channels // 2` channels at half the resolution.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        half = out_channels // 2
        self.branch1 = nn.Sequential(
            nn.Conv2d(in_channels, in_channels, 3, 2, 1, groups=in_channels, bias=False),
            nn.BatchNorm2d(in_channels),
            nn.Conv2d(in_channels, half, 1, bias=False),
            nn.BatchNorm2d(half),
            nn.ReLU(),
        )
        self.branch2 = _branch(in_channels, half, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.cat([self.branch1(x), self.branch2(x)], dim=1)  # (N, C_out, H/2, W/2)
        return channel_shuffle(out, 2)


class GroupedBottleneck(nn.Module):
    """ResNeXt block: 1x1-BN-ReLU, grouped 3x3-BN-ReLU, 1x1-BN, plus identity, then ReLU."""

    def __init__(self, channels: int, mid: int, groups: int = 4) -> None:
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(channels, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU())
        self.grouped = nn.Sequential(
            nn.Conv2d(mid, mid, 3, 1, 1, groups=groups, bias=False), nn.BatchNorm2d(mid), nn.ReLU()
        )
        self.expand = nn.Sequential(nn.Conv2d(mid, channels, 1, bias=False), nn.BatchNorm2d(channels))
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.expand(self.grouped(self.reduce(x)))  # (N, C, H, W)
        return self.relu(x + out)


class ShuffleNet(nn.Module):
    """Stem, a v2 unit, a v2 downsampling unit, a v2 unit, a grouped bottleneck, pool, Linear."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 24, groups: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.units = nn.Sequential(
            ShuffleUnit(width),
            DownsampleUnit(width, 2 * width),
            ShuffleUnit(2 * width),
            GroupedBottleneck(2 * width, 2 * width, groups=groups),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.units(self.stem(x))  # (N, 2w, H/2, W/2)
        return self.fc(self.flatten(self.pool(x)))  # (N, num_classes)


def shufflenet(num_classes: int = 10, in_channels: int = 1, width: int = 24, groups: int = 4) -> ShuffleNet:
    """A ~15k-parameter ShuffleNet v2 for small images (16x16 digits by default).

    `width` must be even and `2 * width` divisible by `groups` (the grouped bottleneck's groups).
    """
    return ShuffleNet(num_classes=num_classes, in_channels=in_channels, width=width, groups=groups)
