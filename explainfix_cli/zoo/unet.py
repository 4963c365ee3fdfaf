"""A small U-Net (Ronneberger et al., 2015) for segmentation, as the paper used on BBBC038 nuclei.

Channel couplings it exercises: skip connections concatenated onto decoder features (a channel
of an encoder block is read by its own next block and by a decoder block at an offset), a
transposed-conv upsampling in one level (its weight is (I, O, kh, kw), the transpose of a
conv's) and bilinear interpolation in the other, and a 1x1 head giving per-pixel logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DoubleConv(nn.Sequential):
    """(conv3x3-BN-ReLU) twice."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, 1, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        )


class UNet(nn.Module):
    """Two-level U-Net: widths w, 2w, bottleneck 4w; output (N, num_classes, H, W) logits.

    H and W must be divisible by 4 (two 2x2 max pools).
    """

    def __init__(self, num_classes: int = 1, in_channels: int = 1, width: int = 16) -> None:
        super().__init__()
        self.enc1 = DoubleConv(in_channels, width)
        self.enc2 = DoubleConv(width, 2 * width)
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = DoubleConv(2 * width, 4 * width)
        self.up2 = nn.ConvTranspose2d(4 * width, 2 * width, 2, 2)
        self.dec2 = DoubleConv(4 * width, 2 * width)
        self.dec1 = DoubleConv(3 * width, width)
        self.head = nn.Conv2d(width, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s1 = self.enc1(x)  # (N, w, H, W)
        s2 = self.enc2(self.pool(s1))  # (N, 2w, H/2, W/2)
        b = self.bottleneck(self.pool(s2))  # (N, 4w, H/4, W/4)
        d2 = self.dec2(torch.cat([self.up2(b), s2], dim=1))  # (N, 4w -> 2w, H/2, W/2)
        # Interpolating to the skip's own size (not a fixed factor) keeps the concat legal.
        up1 = F.interpolate(d2, size=s1.shape[-2:], mode="bilinear", align_corners=False)
        d1 = self.dec1(torch.cat([up1, s1], dim=1))  # (N, 3w -> w, H, W)
        return self.head(d1)  # (N, num_classes, H, W)


def unet(num_classes: int = 1, in_channels: int = 1, width: int = 16) -> UNet:
    """A ~115k-parameter U-Net for small images (32x32 nuclei-like blobs by default)."""
    return UNet(num_classes=num_classes, in_channels=in_channels, width=width)
