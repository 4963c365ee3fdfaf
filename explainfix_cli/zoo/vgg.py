"""A small VGG (Simonyan & Zisserman, 2015): conv-BN-ReLU stacks, max pools, an MLP head.

Channel couplings it exercises: the classic flatten -> Linear, where one conv channel owns
`H * W` consecutive input columns of the first Linear (`C * H * W` columns in all), so removing
a channel removes a block of columns; plus dropout between the Linear layers.
"""

from __future__ import annotations

import torch
from torch import nn


def _conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, 3, 1, 1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    ]


class VGG(nn.Module):
    """Two stages of two conv-BN-ReLU each with a 2x2 max pool, then Flatten-Linear-ReLU-Dropout-Linear.

    The first Linear's width depends on the spatial size after the pools, so the model is built
    for one `input_size` (square), as the original VGG was for 224x224.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        width: int = 16,
        input_size: int = 16,
        hidden: int = 64,
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn_relu(in_channels, width),
            *_conv_bn_relu(width, width),
            nn.MaxPool2d(2),
            *_conv_bn_relu(width, 2 * width),
            *_conv_bn_relu(2 * width, 2 * width),
            nn.MaxPool2d(2),
        )
        side = input_size // 4
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * width * side * side, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (N, 2w, H/4, W/4)
        return self.classifier(x)  # (N, num_classes)


def vgg(
    num_classes: int = 10,
    in_channels: int = 1,
    width: int = 16,
    input_size: int = 16,
    hidden: int = 64,
    dropout: float = 0.3,
) -> VGG:
    """A ~50k-parameter VGG for `input_size` x `input_size` images (16x16 digits by default)."""
    return VGG(
        num_classes=num_classes,
        in_channels=in_channels,
        width=width,
        input_size=input_size,
        hidden=hidden,
        dropout=dropout,
    )
