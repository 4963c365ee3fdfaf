"""Images with masks, for segmentation: a folder with `images/` and `masks/` (BBBC038-style).

A mask has its image's file name (any image suffix): in `masks/` itself for one class, or in
`masks/<class>/` for several (sorted class names). A mask pixel above 0 is 1 (the class is
there). A mask must have its image's size; both are resized alike (nearest for the mask), and
take the same crop and flip when training with augmentation.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from explainfix_cli.errors import UserError
from explainfix_cli.io.sources.base import Augment, Source, TargetKind
from explainfix_cli.io.sources.images import IMAGE_SUFFIXES, Reading, image_size_of, read_resized, to_input


def is_mask_folder(root: Path) -> bool:
    return (root / "images").is_dir() and (root / "masks").is_dir()


def _by_stem(folder: Path) -> dict[str, Path]:
    return {f.stem: f for f in sorted(folder.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES}


class MaskSource(Source):
    """Images and their masks (K, H, W), both read per sample."""

    kind: TargetKind = "mask"

    def __init__(self, root: Path, reading: Reading) -> None:
        images = _by_stem(root / "images")
        if not images:
            raise UserError(f"{root / 'images'} holds no images.")
        class_dirs = sorted(d for d in (root / "masks").iterdir() if d.is_dir())
        self.classes = [d.name for d in class_dirs] or None
        mask_sets = [_by_stem(d) for d in class_dirs] or [_by_stem(root / "masks")]
        self.files = list(images.values())
        self.masks: list[list[Path]] = []
        for stem, file in images.items():
            found = [m.get(stem) for m in mask_sets]
            if any(f is None for f in found):
                missing = class_dirs[found.index(None)] if class_dirs else root / "masks"
                raise UserError(f"image {file.name} has no mask in {missing} (a mask has its image's name).")
            self.masks.append([f for f in found if f is not None])
        self.reading = reading
        self.size = reading.size or image_size_of(self.files[0])
        self.sample_shape = (1 if reading.mode == "L" else 3, self.size[1], self.size[0])
        self.target_shape = (len(mask_sets), self.size[1], self.size[0])

    def __len__(self) -> int:
        return len(self.files)

    def describe(self, index: int) -> str:
        return str(self.files[index])

    def sample(self, index: int, rng: random.Random | None, augment: Augment) -> tuple[torch.Tensor, torch.Tensor]:
        file = self.files[index]
        stored = image_size_of(file)
        # one generator state for the image and each mask: the same crop and flip
        state = rng.getstate() if rng is not None else None
        pixels = read_resized(file, self.reading, self.size, rng, augment)
        planes = []
        for mask in self.masks[index]:
            if image_size_of(mask) != stored:
                w, h = image_size_of(mask)
                raise UserError(f"mask {mask} is {w}x{h} but its image {file.name} is {stored[0]}x{stored[1]}; a mask must have its image's size.")
            if rng is not None and state is not None:
                rng.setstate(state)
            plane = read_resized(mask, Reading("L", self.reading.size, None), self.size, rng, augment, nearest=True)
            planes.append(torch.from_numpy((plane > 0).astype(np.float32)))
        return to_input(pixels, self.reading.preprocessing), torch.stack(planes)
