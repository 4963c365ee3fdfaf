"""Images read on demand: a folder with one sub-folder per class, or the entries of a list.

Each sample is decoded (PIL), converted to the colour mode, cropped and flipped when training
with augmentation, resized, scaled to [0, 1] and normalised by the preprocessing, in the
DataLoader's workers. Without `image_size` the first image's size is every image's size.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from explainfix_cli.errors import UserError
from explainfix_cli.io.augment import Box, draw
from explainfix_cli.io.preprocessing import Preprocessing
from explainfix_cli.io.sources.base import Augment, Source, TargetKind

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


@dataclass(frozen=True)
class Reading:
    """How images become inputs: colour mode ("L" one channel, "RGB" three), size (W, H) or None
    (each image's own, which must then be one size), and the normalisation."""

    mode: str
    size: tuple[int, int] | None
    preprocessing: Preprocessing | None


def image_size_of(path: Path) -> tuple[int, int]:
    """(W, H) from the image's header, without decoding it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return img.size
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"{path} is not a readable image ({e}).") from None


def decode(path: Path, mode: str, size: tuple[int, int] | None, box: Box | None, flip: bool, nearest: bool = False) -> tuple[np.ndarray, tuple[int, int]]:
    """The image's pixels (H, W) or (H, W, 3) uint8, cropped to `box`, resized to `size`, flipped;
    and its size as stored."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            stored = img.size
            img = img.convert(mode)
            target = size or stored
            if box is not None or img.size != target:
                method = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
                img = img.resize(target, method, box=box)
            if flip:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            return np.asarray(img), stored
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"{path} is not a readable image ({e}).") from None


def to_input(pixels: np.ndarray, preprocessing: Preprocessing | None) -> torch.Tensor:
    """uint8 pixels as a (C, H, W) float32 input in [0, 1], then normalised."""
    x = torch.from_numpy(pixels.astype(np.float32) / 255.0)
    x = x.unsqueeze(0) if x.dim() == 2 else x.permute(2, 0, 1).contiguous()  # (C, H, W)
    return x if preprocessing is None else preprocessing.normalise(x[None])[0]


def read_resized(file: Path, reading: Reading, size: tuple[int, int], rng: random.Random | None, augment: Augment, nearest: bool = False) -> np.ndarray:
    """One image at `size` (W, H): resized to `reading.size`, or else required to be `size`
    already; cropped and flipped first when training with augmentation."""
    augmenting = rng is not None and augment != "none"
    stored = image_size_of(file) if augmenting and reading.size is not None else size
    box, flip = draw(*stored, rng, augment)
    pixels, own = decode(file, reading.mode, size, box, flip, nearest)
    if reading.size is None and own != size:
        raise UserError(f"{file} is {own[0]}x{own[1]} but the first image is {size[0]}x{size[1]}; pass `image_size` (--image-size) to resize them.")
    return pixels


class ImageSource(Source):
    """Image files with targets known up front: class labels (N,) or multi-label vectors (N, K)."""

    def __init__(self, files: list[Path], labels: torch.Tensor, reading: Reading, names: list[str] | None = None) -> None:
        if not files:
            raise UserError("the data holds no images.")
        self.files, self.labels, self.reading, self.names = files, labels, reading, names
        self.kind: TargetKind = "labels" if labels.dim() == 1 else "multilabel"
        size = self.size = reading.size or image_size_of(files[0])
        self.sample_shape = (1 if reading.mode == "L" else 3, size[1], size[0])
        self.target_shape = tuple(labels.shape[1:])

    def __len__(self) -> int:
        return len(self.files)

    def describe(self, index: int) -> str:
        return self.names[index] if self.names else str(self.files[index])

    def sample(self, index: int, rng: random.Random | None, augment: Augment) -> tuple[torch.Tensor, torch.Tensor]:
        file = self.files[index]
        pixels = read_resized(file, self.reading, self.size, rng, augment)
        return to_input(pixels, self.reading.preprocessing), self.labels[index]


def class_folder(root: Path, reading: Reading) -> tuple[ImageSource, list[str]]:
    """A folder with one sub-folder per class (sorted names: the labels 0, 1, ...)."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise UserError(f"{root} has no sub-folders; put the images of each class in a folder named after it.")
    files, labels = [], []
    for label, cls in enumerate(classes):
        for file in sorted((root / cls).iterdir()):
            if file.suffix.lower() in IMAGE_SUFFIXES:
                files.append(file)
                labels.append(label)
    if not files:
        raise UserError(f"{root} holds no images in its class folders.")
    return ImageSource(files, torch.tensor(labels, dtype=torch.long), reading), classes
