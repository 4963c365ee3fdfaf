"""A small ShuffleNet (Zhang et al., 2018): grouped convs, channel shuffles, concat downsampling.

Channel couplings it exercises: grouped 1x1 and 3x3 convs that are not depthwise (each output
channel reads only `I / groups` inputs, so channels are tied to their group), a channel shuffle
(a view/transpose/reshape that permutes channel indices between two grouped convs), a depthwise
3x3, a residual addition, and a downsampling unit whose output concatenates a pooled shortcut
with the branch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave the channels of `groups` groups so the next grouped conv sees all of them."""
    n, c, h, w = x.shape
    x = x.view(n, groups, c // groups, h, w)  # (N, g, C/g, H, W)
    return x.transpose(1, 2).reshape(n, c, h, w)  # (N, C, H, W), channel j*g + i <- i*C/g + j


class ShuffleUnit(nn.Module):
    """ShuffleNet v1 unit: gconv1x1, shuffle, depthwise 3x3, gconv1x1; add (stride 1) or concat.

    With stride 2 the branch only produces `out_channels - in_channels` channels; the rest are
    the input, average-pooled, concatenated in front.
    """

    def __init__(self, in_channels: int, out_channels: int, groups: int = 4, stride: int = 1) -> None:
        super().__init__()
        self.groups = groups
        self.stride = stride
        branch_out = out_channels - in_channels if stride == 2 else out_channels
        # ShuffleNet's bottleneck is 1/4 wide; 1/2 keeps this tiny model from starving.
        mid = out_channels // 2
        self.reduce = nn.Sequential(
            nn.Conv2d(in_channels, mid, 1, groups=groups, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(),
        )
        self.depthwise = nn.Sequential(nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid))
        self.expand = nn.Sequential(
            nn.Conv2d(mid, branch_out, 1, groups=groups, bias=False), nn.BatchNorm2d(branch_out)
        )
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = channel_shuffle(self.reduce(x), self.groups)  # (N, mid, H, W)
        out = self.expand(self.depthwise(out))  # (N, branch_out, H/s, W/s)
        if self.stride == 2:
            shortcut = F.avg_pool2d(x, 3, 2, 1)  # (N, C_in, H/2, W/2)
            return self.relu(torch.cat([shortcut, out], dim=1))  # (N, C_out, H/2, W/2)
        return self.relu(x + out)


class GroupedUnit(nn.Module):
    """Residual pair of grouped (not depthwise) 3x3 convs with a shuffle between them."""

    def __init__(self, channels: int, groups: int = 2) -> None:
        super().__init__()
        self.groups = groups
        self.conv1 = nn.Sequential(
            nn.Conv2d(channels, channels, 3, 1, 1, groups=groups, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
        )
        self.conv2 = nn.Sequential(
            nn.Conv2d(channels, channels, 3, 1, 1, groups=groups, bias=False),
            nn.BatchNorm2d(channels),
        )
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = channel_shuffle(self.conv1(x), self.groups)  # (N, C, H, W)
        return self.relu(x + self.conv2(out))


class ShuffleNet(nn.Module):
    """Stem, a residual shuffle unit, a concat downsampling unit, a grouped 3x3 unit, pool, Linear."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 24, groups: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.units = nn.Sequential(
            ShuffleUnit(width, width, groups=groups, stride=1),
            ShuffleUnit(width, 2 * width, groups=groups, stride=2),
            GroupedUnit(2 * width, groups=2),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.units(self.stem(x))  # (N, 2w, H/2, W/2)
        return self.fc(self.flatten(self.pool(x)))  # (N, num_classes)


def shufflenet(num_classes: int = 10, in_channels: int = 1, width: int = 24, groups: int = 4) -> ShuffleNet:
    """A ~25k-parameter ShuffleNet for small images (16x16 digits by default).

    `width` and `width // 2` must be divisible by `groups`.
    """
    return ShuffleNet(num_classes=num_classes, in_channels=in_channels, width=width, groups=groups)
