"""Augmentation for training (finetune): a random resized crop and a horizontal flip.

`light` crops 75-100 % of the image's area, `standard` 8-100 % (the ImageNet recipe of
torchvision's RandomResizedCrop), both with aspect ratios 3/4-4/3 and a flip half of the time.
A segmentation mask takes the very same crop and flip as its image (nearest-neighbour). Each
sample draws from its own seeded generator, so an epoch is the same whatever the worker count.
"""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F

from explainfix_cli.errors import UserError

SCALES = {"light": (0.75, 1.0), "standard": (0.08, 1.0)}
RATIO = (3 / 4, 4 / 3)
AUGMENTS = ("none", "light", "standard")

Box = tuple[int, int, int, int]  # left, top, right, bottom


def check_augment(augment: str) -> None:
    if augment not in AUGMENTS:
        raise UserError(f"`augment` must be one of {', '.join(AUGMENTS)}, not {augment!r}.")


def crop_box(width: int, height: int, rng: random.Random, augment: str) -> Box:
    """A random crop of an area share in the mode's scale and an aspect ratio in 3/4-4/3; the
    whole image when ten draws do not fit (as torchvision's RandomResizedCrop)."""
    lo, hi = SCALES[augment]
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(lo, hi)
        ratio = math.exp(rng.uniform(math.log(RATIO[0]), math.log(RATIO[1])))
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            left, top = rng.randint(0, width - w), rng.randint(0, height - h)
            return left, top, left + w, top + h
    return 0, 0, width, height


def draw(width: int, height: int, rng: random.Random | None, augment: str) -> tuple[Box | None, bool]:
    """The crop box (None: no crop) and whether to flip, for one sample."""
    if rng is None or augment == "none":
        return None, False
    return crop_box(width, height, rng, augment), rng.random() < 0.5


def augment_tensors(x: torch.Tensor, y: torch.Tensor, is_mask: bool, rng: random.Random | None, augment: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One stored sample `x` (C, H, W) cropped, resized back and maybe flipped; a mask `y` (K, H, W) alike."""
    box, flip = draw(x.shape[2], x.shape[1], rng, augment)
    if box is None:
        return x, y
    left, top, right, bottom = box

    def apply(t: torch.Tensor, mode: str) -> torch.Tensor:
        part = t[None, :, top:bottom, left:right].float()  # (1, C, h, w)
        kwargs = {"align_corners": False} if mode == "bilinear" else {}
        out = F.interpolate(part, size=t.shape[1:], mode=mode, **kwargs)[0]
        return out.flip(-1) if flip else out

    return apply(x, "bilinear"), apply(y, "nearest") if is_mask else y
