"""Tiny hand-written modules with the patterns of issue 14's model zoo (no timm needed), for
tests/test_surgery.py; loaded by `--arch tests/surgery_modules.py:NAME` like a user's script."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _bn_relu(c: int) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm2d(c), nn.ReLU())


class UnequalSplit(nn.Module):
    """MixNet's mixed kernels / Res2Net's scales: split into fixed unequal parts, convolve each, concatenate."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.stem, self.act = nn.Conv2d(1, 6, 3, padding=1), _bn_relu(6)
        self.splits = [2, 4]  # kept by the model's code: a cut of the stem's channels breaks it
        self.small, self.large = nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(4, 4, 5, padding=2)
        self.head = nn.Conv2d(6, 5, 3, padding=1)
        self.fc = nn.Linear(5, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.split(self.act(self.stem(x)), self.splits, dim=1)  # (N, 2, H, W), (N, 4, H, W)
        x = F.relu(self.head(torch.cat([self.small(a), self.large(b)], dim=1)))  # (N, 5, H, W)
        return self.fc(x.mean(dim=(2, 3)))


class FixedWidthSplit(nn.Module):
    """Equal parts by a fixed width (`torch.split(x, 2)`): a cut that is balanced across the parts
    still breaks it (the width stays 2), which no structural rule sees: the check after the cut must."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.stem, self.act = nn.Conv2d(1, 4, 3, padding=1), _bn_relu(4)
        self.left, self.right = nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(2, 3, 3, padding=1)
        self.fc = nn.Linear(6, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.split(self.act(self.stem(x)), 2, dim=1)  # (N, 2, H, W) twice
        x = torch.cat([self.left(a), self.right(b)], dim=1)  # (N, 6, H, W)
        return self.fc(F.relu(x).mean(dim=(2, 3)))


class ScaledStdConv2d(nn.Conv2d):
    """Weight standardisation with a per-output gain, as timm's NF-ResNet/NFNet convolutions:
    each output row of the weight is standardised (mean 0, variance 1) and scaled by its gain."""

    def __init__(self, *args: object, eps: float = 1e-6, **kwargs: object):
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.gain = nn.Parameter(torch.ones(self.out_channels, 1, 1, 1))
        self.scale, self.eps = self.weight[0].numel() ** -0.5, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1), None, None,
            weight=(self.gain * self.scale).view(-1), training=True, momentum=0.0, eps=self.eps,
        ).reshape_as(self.weight)  # fmt: skip
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class StandardisedNet(nn.Module):
    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.conv1 = ScaledStdConv2d(1, 4, 3, padding=1)
        self.conv2 = ScaledStdConv2d(4, 5, 3, padding=1)
        self.fc = nn.Linear(5, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.conv1(x))))  # (N, 5, H, W)
        return self.fc(x.mean(dim=(2, 3)))


class SelfAttention(nn.Module):
    """A convolutional stem, then multi-head self-attention over positions (BoTNet's block):
    the qkv channels are reshaped into heads, so no cut of them can be exact."""

    def __init__(self, num_classes: int = 3, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.stem, self.act = nn.Conv2d(1, 8, 3, padding=1), _bn_relu(8)
        self.qkv = nn.Conv2d(8, 3 * 8, 1)
        self.proj = nn.Conv2d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.stem(x))  # (N, 8, H, W)
        n, c, h, w = x.shape
        q, k, v = self.qkv(x).reshape(n, 3 * self.heads, c // self.heads, h * w).chunk(3, dim=1)  # (N, heads, d, HW) each
        attn = (q.transpose(-1, -2) @ k * (c // self.heads) ** -0.5).softmax(dim=-1)  # (N, heads, HW, HW)
        x = (v @ attn.transpose(-1, -2)).reshape(n, c, h, w)  # (N, 8, H, W)
        return self.fc(F.relu(self.proj(x)).mean(dim=(2, 3)))


class CheckedWidth(nn.Module):
    """Refuses, for batches of more than one sample, a feature width other than the one it was built
    with: the check after the cut (one sample) passes, the outputs on the data then fail. Stands for
    any breakage the check cannot see; the prune must report it as its own failure (exit 1)."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.conv1, self.act = nn.Conv2d(1, 4, 3, padding=1), _bn_relu(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.conv1(x))  # (N, 4, H, W)
        if len(x) > 1 and x.shape[1] != 4:
            raise RuntimeError(f"expected 4 channels, got {x.shape[1]}")
        return self.fc(F.relu(self.conv2(x)).mean(dim=(2, 3)))
