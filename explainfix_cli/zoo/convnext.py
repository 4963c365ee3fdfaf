"""A small ConvNeXt (Liu et al., 2022): depthwise 5x5, channels-last LayerNorm, pointwise MLP.

Channel couplings it exercises: a depthwise conv with a non-3x3 kernel, LayerNorm over channels
applied channels-last (permute, normalise the last dim, permute back), GroupNorm(1, C) before a
downsampling conv, an inverted-bottleneck MLP made of 1x1 Conv2d, a layer-scale `nn.Parameter`
of shape (C, 1, 1) multiplied onto the block output, stochastic depth, and residual additions.
Patchify convs (2x2, stride 2) stand in for pooling.
"""

from __future__ import annotations

import torch
from torch import nn


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an (N, C, H, W) tensor, computed channels-last."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)  # (N, H, W, C)
        return super().forward(x).permute(0, 3, 1, 2)  # (N, C, H, W)


class DropPath(nn.Module):
    """Stochastic depth: in training, drop the whole residual branch of some samples.

    Identity in eval mode. In training the mask comes from torch's global generator, so a fixed
    seed gives the same drops; survivors are scaled by 1 / (1 - p) to keep the expectation.
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), device=x.device)  # (N, 1, 1, 1)
        return x * (mask < keep).to(x.dtype) / keep


class ConvNeXtBlock(nn.Module):
    """dwconv5x5 -> LayerNorm -> 1x1 (4C) -> GELU -> 1x1 (C) -> layer scale -> drop path -> +x."""

    def __init__(self, channels: int, drop_path: float = 0.0, layer_scale: float = 0.1) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(channels, channels, 5, 1, 2, groups=channels)
        self.norm = LayerNorm2d(channels)
        self.pwconv1 = nn.Conv2d(channels, 4 * channels, 1)
        self.act = nn.GELU()
        self.pwconv2 = nn.Conv2d(4 * channels, channels, 1)
        # ConvNeXt starts layer scale at 1e-6 for deep nets; this model is trained for a few
        # epochs only, so a larger start lets the blocks contribute early.
        self.gamma = nn.Parameter(torch.full((channels, 1, 1), layer_scale))  # (C, 1, 1)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.norm(self.dwconv(x))  # (N, C, H, W)
        out = self.pwconv2(self.act(self.pwconv1(out)))  # (N, 4C, H, W) -> (N, C, H, W)
        return x + self.drop_path(self.gamma * out)


class ConvNeXt(nn.Module):
    """Patchify stem, stage of `depth` blocks, GroupNorm + patchify downsample, stage, head."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        width: int = 24,
        depth: int = 2,
        drop_path: float = 0.1,
        layer_scale: float = 0.1,
    ) -> None:
        super().__init__()
        # Stochastic depth grows linearly with depth, as in the paper.
        rates = torch.linspace(0.0, drop_path, 2 * depth).tolist()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 2, 2), LayerNorm2d(width))
        self.stage1 = nn.Sequential(*(ConvNeXtBlock(width, rates[i], layer_scale) for i in range(depth)))
        self.downsample = nn.Sequential(nn.GroupNorm(1, width), nn.Conv2d(width, 2 * width, 2, 2))
        self.stage2 = nn.Sequential(*(ConvNeXtBlock(2 * width, rates[depth + i], layer_scale) for i in range(depth)))
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.LayerNorm(2 * width),
            nn.Linear(2 * width, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage1(self.stem(x))  # (N, w, H/2, W/2)
        x = self.stage2(self.downsample(x))  # (N, 2w, H/4, W/4)
        return self.head(x)  # (N, num_classes)


def convnext(
    num_classes: int = 10,
    in_channels: int = 1,
    width: int = 24,
    depth: int = 2,
    drop_path: float = 0.1,
    layer_scale: float = 0.1,
) -> ConvNeXt:
    """A ~55k-parameter ConvNeXt for small images (16x16 digits by default)."""
    return ConvNeXt(
        num_classes=num_classes,
        in_channels=in_channels,
        width=width,
        depth=depth,
        drop_path=drop_path,
        layer_scale=layer_scale,
    )
