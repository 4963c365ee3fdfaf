"""A small CNN of the kind people write themselves: 3x3 convolutions only (no 1x1 layers).

stem conv -> a residual block of two 3x3 convs -> max pooling -> a strided 3x3 conv -> global
average pooling -> a linear head. The README's quick start trains it (train.py) and then prunes,
fine-tunes, evaluates, benchmarks and explains it with `--arch examples/own_model/net.py:Net`.
"""

from __future__ import annotations

import torch
from torch import nn


def conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    """A 3x3 convolution, a batch norm and a ReLU."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class Net(nn.Module):
    """Digits (1x16x16) to 10 classes; about 29,000 parameters."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.stem = conv_bn(in_channels, width)
        self.block = nn.Sequential(conv_bn(width, width), nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width))
        self.pool = nn.MaxPool2d(2)
        self.down = conv_bn(width, 2 * width, stride=2)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.block(x))
        x = self.down(self.pool(x))
        return self.head(x.mean(dim=(2, 3)))
