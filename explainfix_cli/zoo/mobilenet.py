"""A small MobileNetV3-like network (Howard et al., 2019): inverted residuals with SE.

Channel couplings it exercises: depthwise 3x3 convs (groups == channels, so the expand conv's
outputs, the depthwise conv and its batch norm all share one channel index), squeeze-excitation
(a gate computed from the features by two 1x1 convs is multiplied back onto them), residual
additions where shapes match, and hardswish activations.
"""

from __future__ import annotations

import torch
from torch import nn


class SqueezeExcite(nn.Module):
    """Global pool -> 1x1 conv -> ReLU -> 1x1 conv -> sigmoid, multiplied onto the input."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(8, channels // reduction)
        self.gate = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, hidden, 1),
            nn.ReLU(),
            nn.Conv2d(hidden, channels, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)  # (N, C, H, W) * (N, C, 1, 1)


class InvertedResidual(nn.Module):
    """1x1 expand, depthwise 3x3, optional SE, 1x1 linear projection, residual if shapes match."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        expand: int = 4,
        stride: int = 1,
        use_se: bool = True,
        act: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        hidden = in_channels * expand
        self.expand = nn.Sequential(nn.Conv2d(in_channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), act())
        self.depthwise = nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            act(),
        )
        self.se: nn.Module = SqueezeExcite(hidden) if use_se else nn.Identity()
        # No activation after the projection: MobileNetV2's "linear bottleneck", which keeps the
        # low-dimensional residual stream from losing information to a ReLU.
        self.project = nn.Sequential(nn.Conv2d(hidden, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.se(self.depthwise(self.expand(x)))  # (N, hidden, H/s, W/s)
        out = self.project(out)  # (N, out_channels, H/s, W/s)
        return x + out if self.use_residual else out


class MobileNet(nn.Module):
    """Stem, four inverted residuals (two with a residual add), 1x1 head conv, pool, Linear."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16) -> None:
        super().__init__()
        w1, w2 = width, width * 3 // 2
        w3, head = 2 * width, 8 * width
        self.stem = nn.Sequential(nn.Conv2d(in_channels, w1, 3, 1, 1, bias=False), nn.BatchNorm2d(w1), nn.Hardswish())
        self.blocks = nn.Sequential(
            InvertedResidual(w1, w1, stride=1, act=nn.ReLU),
            InvertedResidual(w1, w2, stride=2, act=nn.Hardswish),
            InvertedResidual(w2, w2, stride=1, act=nn.Hardswish),
            InvertedResidual(w2, w3, stride=2, use_se=False, act=nn.Hardswish),
        )
        self.head = nn.Sequential(
            nn.Conv2d(w3, head, 1, bias=False),
            nn.BatchNorm2d(head),
            nn.Hardswish(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(head, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))  # (N, 2w, H/4, W/4)
        return self.head(x)  # (N, num_classes)


def mobilenet(num_classes: int = 10, in_channels: int = 1, width: int = 16) -> MobileNet:
    """A ~35k-parameter MobileNetV3-like model for small images (16x16 digits by default)."""
    return MobileNet(num_classes=num_classes, in_channels=in_channels, width=width)
