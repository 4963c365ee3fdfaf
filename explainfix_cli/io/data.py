"""Data in: `.npz` / `.safetensors` files holding `x` and `y`, or a folder of images per class.

Targets come in the three kinds of docs/method.md §1: integer class labels (N,), multi-label 0/1
vectors (N, K), or segmentation masks (N, K, H, W). `Dataset.targets` turns a minibatch's `y`
into a tensor of the model output's shape, which is what the saliency objective needs.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from explainfix_cli.errors import UserError
from explainfix_cli.io.formats import is_zip, sniff
from explainfix_cli.io.preprocessing import Preprocessing

TargetKind = Literal["labels", "multilabel", "mask"]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


@dataclass
class Dataset:
    """Inputs and targets in a fixed order, served in minibatches."""

    x: torch.Tensor  # (N, C, H, W) float32
    y: torch.Tensor  # (N,) int64 labels | (N, K) multi-label | (N, K, H, W) masks
    batch_size: int = 64
    batches: int | None = None  # use only the first `batches` minibatches
    classes: list[str] | None = None  # class names: an image folder's, or a data file's `classes`

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise UserError(f"`batch_size` must be at least 1, not {self.batch_size}.")
        if self.batches is not None and self.batches < 1:
            raise UserError(f"`batches` must be at least 1, not {self.batches}.")

    @property
    def target_kind(self) -> TargetKind:
        return {1: "labels", 2: "multilabel"}.get(self.y.dim(), "mask")  # type: ignore[return-value]

    @property
    def metric_name(self) -> str:
        return {"labels": "accuracy", "multilabel": "auc", "mask": "dice"}[self.target_kind]

    def __len__(self) -> int:
        n = (len(self.x) + self.batch_size - 1) // self.batch_size
        return n if self.batches is None else min(n, self.batches)

    @property
    def num_samples(self) -> int:
        return min(len(self.x), len(self) * self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for b in range(len(self)):
            sl = slice(b * self.batch_size, (b + 1) * self.batch_size)
            yield self.x[sl], self.y[sl]

    def targets(self, output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """`y` as a tensor of the output's shape: one-hot for labels, as-is otherwise (docs/method.md §1)."""
        if self.target_kind == "labels":
            if output.dim() != 2:
                raise UserError(
                    f"the data has class labels but the model outputs shape {tuple(output.shape)}; "
                    "class labels need an (N, classes) output."
                )
            k = output.shape[1]
            if int(y.max()) >= k:
                raise UserError(f"the data has class label {int(y.max())} but the model has only {k} outputs.")
            return torch.nn.functional.one_hot(y, k).to(output.dtype)
        if tuple(y.shape) != tuple(output.shape):
            raise UserError(
                f"the data's targets have shape {tuple(y.shape[1:])} per sample but the model "
                f"outputs {tuple(output.shape[1:])}; they must match."
            )
        return y.to(output.dtype)


def load_data(
    path: str | Path,
    batch_size: int = 64,
    batches: int | None = None,
    image_size: int | None = None,
    grayscale: bool = False,
    preprocessing: Preprocessing | None = None,
) -> Dataset:
    """Read a data file or image folder (docs/cli.md "Data in").

    An image folder's pixels are scaled to [0, 1] and normalised by `preprocessing` (the model's
    own, or the user's); its `channels` and `size` apply unless `grayscale` / `image_size` say
    otherwise. A data file's `x` is taken as already preprocessed.
    """
    path = Path(path)
    if path.is_dir():
        if preprocessing is not None:
            grayscale = grayscale or preprocessing.channels == 1
            if image_size is None and preprocessing.size is not None and preprocessing.size[0] == preprocessing.size[1]:
                image_size = preprocessing.size[0]
        x, y, classes = _read_image_folder(path, image_size, grayscale)
        if preprocessing is not None:
            x = preprocessing.normalise(x)
        return Dataset(x, y, batch_size, batches, classes)
    if not path.is_file():
        raise UserError(f"data {path} does not exist.")
    arrays = _read_arrays(path)
    for key in ("x", "y"):
        if key not in arrays:
            raise UserError(f"{path} has no array named {key!r} (it has {sorted(arrays)}); store inputs as x and targets as y.")
    x = torch.as_tensor(np.asarray(arrays["x"]))
    y = torch.as_tensor(np.asarray(arrays["y"]))
    return Dataset(*_validated(x, y, path), batch_size=batch_size, batches=batches, classes=_class_names(arrays, path))


def _class_names(arrays: Mapping[str, np.ndarray], path: Path) -> list[str] | None:
    """The optional class names of a data file, one per class (e.g. the labels of multi-label
    targets): a `classes` string array in a .npz, a JSON list in a .safetensors file's metadata."""
    names = arrays.get("classes")
    if names is None:
        return None
    if names.ndim != 1 or names.dtype.kind not in "US":
        raise UserError(f"{path}: classes must be a 1-D array of class names (strings), not {names.dtype} {names.shape}.")
    return [str(n) for n in names.astype(str)]


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    """The arrays of a .npz or safetensors file, told apart by content, not by name."""
    kind = sniff(path)
    if kind in ("torch-zip", "torch-export"):
        raise UserError(f"data {path} is a PyTorch model file, not data; pass a .npz or .safetensors file with x and y.")
    if is_zip(path):
        try:
            with np.load(path, allow_pickle=False) as f:
                return {k: f[k] for k in f.files}
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
            raise UserError(f"{path} is not a readable .npz file ({e}).") from None
    if kind == "safetensors":
        from safetensors import SafetensorError, safe_open
        from safetensors.numpy import load_file

        try:
            arrays = load_file(str(path))
            with safe_open(str(path), framework="np") as f:
                metadata = f.metadata() or {}
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{path} is not a readable safetensors file ({e}).") from None
        if "classes" in metadata:  # safetensors holds no strings: class names are a JSON list in the metadata
            try:
                arrays["classes"] = np.array(json.loads(metadata["classes"]), dtype=str)
            except (json.JSONDecodeError, ValueError):
                raise UserError(f"{path}: the metadata entry classes must be a JSON list of class names.") from None
        return arrays
    raise UserError(f"data {path} is neither a .npz nor a safetensors file nor a folder of images per class.")


def _validated(x: torch.Tensor, y: torch.Tensor, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    if x.dim() != 4 or not x.is_floating_point():
        raise UserError(f"{path}: x must be a float array of shape (N, C, H, W), not {x.dtype} {tuple(x.shape)}.")
    if len(y) != len(x):
        raise UserError(f"{path}: x has {len(x)} samples but y has {len(y)}.")
    if len(x) == 0:
        raise UserError(f"{path} holds no samples.")
    if not torch.isfinite(x).all():
        raise UserError(f"{path}: x contains NaN or infinite values.")
    if y.dim() == 1:
        if y.is_floating_point() and not torch.equal(y, y.round()):
            raise UserError(f"{path}: y of shape (N,) must hold integer class labels.")
        y = y.long()
        if int(y.min()) < 0:
            raise UserError(f"{path}: class labels must be >= 0, found {int(y.min())}.")
    elif y.dim() in (2, 4):
        y = y.float()
    else:
        raise UserError(f"{path}: y must be labels (N,), multi-label (N, K) or masks (N, K, H, W), not {tuple(y.shape)}.")
    return x.float().contiguous(), y.contiguous()


def _read_image_folder(
    root: Path, image_size: int | None, grayscale: bool
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    from PIL import Image, UnidentifiedImageError

    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise UserError(f"{root} has no sub-folders; put the images of each class in a folder named after it.")
    images, labels = [], []
    for label, cls in enumerate(classes):
        for file in sorted((root / cls).iterdir()):
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(file) as img:
                    img = img.convert("L" if grayscale else "RGB")
                    if image_size is not None and img.size != (image_size, image_size):
                        img = img.resize((image_size, image_size), Image.Resampling.BILINEAR)
                    images.append(np.asarray(img, dtype=np.float32) / 255.0)
            except (UnidentifiedImageError, OSError) as e:
                raise UserError(f"{file} is not a readable image ({e}).") from None
            labels.append(label)
    if not images:
        raise UserError(f"{root} holds no images in its class folders.")
    sizes = {im.shape[:2] for im in images}
    if len(sizes) > 1:
        raise UserError(f"{root} holds images of different sizes {sorted(sizes)[:3]}; pass `image_size` to resize them.")
    x = torch.from_numpy(np.stack(images))  # (N, H, W) or (N, H, W, 3)
    x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)  # (N, C, H, W)
    return x.contiguous(), torch.tensor(labels, dtype=torch.long), classes
