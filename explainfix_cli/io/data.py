"""Data in: tensors in a file, an image folder per class, a list of images, or images with masks.

Targets come in the three kinds of docs/method.md §1: integer class labels (N,), multi-label 0/1
vectors (N, K), or segmentation masks (N, K, H, W). `Dataset.targets` turns a minibatch's `y`
into a tensor of the model output's shape, which is what the saliency objective needs.

Every source streams: a `Dataset` serves minibatches through a `torch.utils.data.DataLoader`
(decoding and resizing in its workers, pinned memory on CUDA), in a fixed order except when
training (`Dataset.shuffled`), so memory follows the batch, not the number of samples, and
`batches=N` reads only the first N minibatches.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from explainfix_cli.errors import UserError
from explainfix_cli.io.augment import check_augment
from explainfix_cli.io.formats import is_images
from explainfix_cli.io.heap import give_back_free_memory
from explainfix_cli.io.preprocessing import Preprocessing
from explainfix_cli.io.sources.arrays import ArraySource, class_names, read_arrays, validated
from explainfix_cli.io.sources.base import Augment, Failed, Key, Source, Subset, TargetKind, as_is
from explainfix_cli.io.sources.images import IMAGE_SUFFIXES, Reading, class_folder
from explainfix_cli.io.sources.lists import image_list
from explainfix_cli.io.sources.masks import MaskSource, is_mask_folder

__all__ = ["IMAGE_SUFFIXES", "Dataset", "Rows", "TargetKind", "default_workers", "input_channels", "load_data"]
MAP_BYTES = 64 << 20  # a data file's inputs above this size are memory-mapped, not read whole


def default_workers() -> int:
    """DataLoader workers for decoding images: EXPLAINFIX_WORKERS if set; 0 under pytest; else the
    cores this process may use (shared by torchrun's local processes) less one for the model, at most 8."""
    if os.environ.get("EXPLAINFIX_WORKERS"):
        return max(0, int(os.environ["EXPLAINFIX_WORKERS"]))
    if "PYTEST_CURRENT_TEST" in os.environ:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(8, cores // local - 1))


class Rows:
    """The rows of a streamed `x` or mask `y`, read on demand: `data.x[:k]`, `data.x.shape`."""

    dtype = torch.float32

    def __init__(self, data: Dataset, part: int) -> None:
        self.data, self.part = data, part

    @property
    def shape(self) -> torch.Size:
        source = self.data.source
        return torch.Size((len(source), *(source.sample_shape if self.part == 0 else source.target_shape)))

    def __len__(self) -> int:
        return len(self.data.source)

    def dim(self) -> int:
        return len(self.shape)

    def __getitem__(self, index: Any) -> torch.Tensor:
        rows, rest = (index[0], index[1:]) if isinstance(index, tuple) else (index, ())
        if isinstance(rows, int):
            return self[rows : rows + 1 if rows != -1 else None][(0, *rest)]
        if isinstance(rows, slice):
            picked: Sequence[int] = range(*rows.indices(len(self)))
        else:
            picked = torch.as_tensor(rows).tolist()
        out = self.data.read(picked)[self.part]
        return out[(slice(None), *rest)] if rest else out


class Dataset:
    """Inputs and targets in a fixed order, served in minibatches.

    `Dataset(x, y)` holds tensors in memory; `load_data` streams files and folders (a `source`).
    """

    def __init__(
        self,
        x: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        batch_size: int = 64,
        batches: int | None = None,  # use only the first `batches` minibatches
        classes: list[str] | None = None,  # class names: an image folder's, or a data file's `classes`
        *,
        source: Source | None = None,
        workers: int = 0,
        augment: Augment = "none",  # for `shuffled` (training) only
        pin_memory: bool = False,
        preprocessing: Preprocessing | None = None,  # how an image source was read (recorded in the model written)
    ) -> None:
        if batch_size < 1:
            raise UserError(f"`batch_size` must be at least 1, not {batch_size}.")
        if batches is not None and batches < 1:
            raise UserError(f"`batches` must be at least 1, not {batches}.")
        check_augment(augment)
        if source is None:
            if x is None or y is None:
                raise UserError("a Dataset needs x and y, or a source.")
            source = ArraySource(x, y)
            self.x: torch.Tensor | Rows = x
            self.y: torch.Tensor | Rows = y
        else:
            self.x = Rows(self, 0)
            self.y = source.labels if source.labels is not None else Rows(self, 1)
        self.source, self.batch_size, self.batches, self.classes = source, batch_size, batches, classes
        self.workers, self.augment, self.pin_memory, self.preprocessing = workers, augment, pin_memory, preprocessing
        self.in_memory = isinstance(self.x, torch.Tensor)

    @property
    def target_kind(self) -> TargetKind:
        return self.source.kind

    @property
    def metric_name(self) -> str:
        return {"labels": "accuracy", "multilabel": "auc", "mask": "dice"}[self.target_kind]

    def __len__(self) -> int:
        n = (len(self.source) + self.batch_size - 1) // self.batch_size
        return n if self.batches is None else min(n, self.batches)

    @property
    def num_samples(self) -> int:
        return min(len(self.source), len(self) * self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.shard(0, 1)

    def shard(self, rank: int, world: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The minibatches b with b % world == rank, in order: under torchrun each process reads
        only its own (the others are not decoded), and together they read each minibatch once."""
        n = len(self.source)
        spans = [range(b * self.batch_size, min(n, (b + 1) * self.batch_size)) for b in range(rank, len(self), world)]
        if self.in_memory:
            for span in spans:
                yield self.x[span.start : span.stop], self.y[span.start : span.stop]  # type: ignore[misc]
            return
        yield from self._stream([(span, None, "none") for span in spans])

    def shuffled(self, order: torch.Tensor, world: int = 1, rank: int = 0, seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Training minibatches in `order` (a permutation of the samples used): (the global
        minibatch's indices, this process's shard of x, of y), augmented by `augment` with draws
        seeded by `seed` and the sample. A process reads only its shard; a minibatch too small
        for every process to hold two samples (batch norm) is skipped."""
        batches = [b for b in order.split(self.batch_size) if len(b) >= 2 * world]
        keys: list[Key] = [(b.tensor_split(world)[rank].tolist(), seed, self.augment) for b in batches]
        for batch, (x, y) in zip(batches, self._stream(keys), strict=True):
            yield batch, x, y

    def _stream(self, keys: list[Key], in_process: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        workers = 0 if in_process else min(self.workers, len(keys))
        if workers == 0:
            items: Iterator[Any] = (self.source[k] for k in keys)
        else:
            items = iter(torch.utils.data.DataLoader(
                self.source, batch_size=None, sampler=keys, num_workers=workers, pin_memory=self.pin_memory, collate_fn=as_is,
            ))
        for item in items:
            give_back_free_memory()  # what the last minibatch used is free by now (io.heap)
            if isinstance(item, Failed):
                raise UserError(item.message)
            if self.pin_memory and workers == 0 and not in_process:
                item = (item[0].pin_memory(), item[1].pin_memory())
            yield item

    def read(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The samples at `indices`, in this process, a minibatch at a time (a few, for examples)."""
        parts = [list(indices[k : k + self.batch_size]) for k in range(0, len(indices), self.batch_size)] or [[]]
        if parts == [[]]:
            return torch.zeros(0, *self.source.sample_shape), torch.zeros(0, *self.source.target_shape)
        got = list(self._stream([(p, None, "none") for p in parts], in_process=True))  # a few: no workers to start
        return torch.cat([g[0] for g in got]), torch.cat([g[1] for g in got])

    def subset(self, indices: Sequence[int]) -> Dataset:
        """The samples at `indices` (of those used, in that order) as a dataset of their own, read
        alike: in memory when this one is, streamed from the same source otherwise."""
        if self.in_memory:
            rows = torch.as_tensor(list(indices), dtype=torch.long)
            return Dataset(self.x[rows], self.y[rows], self.batch_size, None, self.classes, augment=self.augment, preprocessing=self.preprocessing)
        return Dataset(
            None, None, self.batch_size, None, self.classes, source=Subset(self.source, indices), workers=self.workers,
            augment=self.augment, pin_memory=self.pin_memory, preprocessing=self.preprocessing,
        )  # fmt: skip

    def describe(self, index: int) -> str:
        """The entry at `index` in words: a file, a row of a list, or 'sample i'."""
        return self.source.describe(index)

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
                labels = self.source.labels
                entry = "" if labels is None else f" ({self.describe(int((labels >= k).nonzero()[0]))})"
                raise UserError(f"the data has class label {int(y.max())}{entry} but the model has only {k} outputs.")
            return torch.nn.functional.one_hot(y, k).to(output.dtype)
        if tuple(y.shape) != tuple(output.shape):
            raise UserError(
                f"the data's targets have shape {tuple(y.shape[1:])} per sample but the model "
                f"outputs {tuple(output.shape[1:])}; they must match."
            )
        return y.to(output.dtype)


def input_channels(model: torch.nn.Module) -> int | None:
    """The input channels of the model's first convolution: what `load_data(channels=...)` reads
    images as (1: grey, 3: colour); None when the model has no convolution."""
    conv = next((m for m in model.modules() if isinstance(m, torch.nn.Conv2d)), None)
    return None if conv is None else conv.in_channels


def load_data(
    path: str | Path,
    batch_size: int = 64,
    batches: int | None = None,
    image_size: int | None = None,
    grayscale: bool = False,
    preprocessing: Preprocessing | None = None,
    *,
    channels: int | None = None,
    workers: int | None = None,
    augment: Augment = "none",
    uncertain: str = "zeros",
    pin_memory: bool | None = None,
) -> Dataset:
    """Read a data file, an image folder, a list of images or images with masks (docs/cli.md "Data in").

    Images are scaled to [0, 1] and normalised by `preprocessing` (the model's own, or the
    user's); its `channels` and `size` apply unless `grayscale` / `image_size` say otherwise;
    `channels`, the model's first convolution's input channels, reads grey or colour as it needs.
    A data file's `x` is taken as already preprocessed. `workers`: DataLoader processes decoding
    images (`default_workers()` when None; tensor files are read in-process). `augment` applies
    to `Dataset.shuffled` (training). `uncertain`: a list's -1 labels as "zeros" or "ones".
    """
    path = Path(path)
    pin = torch.cuda.is_available() if pin_memory is None else pin_memory
    if is_images(path):
        if not path.exists():
            raise UserError(f"data {path} does not exist.")
        reading = _reading(path, image_size, grayscale, preprocessing, channels)
        source: Source
        if path.is_dir() and is_mask_folder(path):
            source = MaskSource(path, reading)
            classes = source.classes
        elif path.is_dir():
            source, classes = class_folder(path, reading)
        else:
            source, classes = image_list(path, reading, uncertain)
        used = _applied(reading, source)
        workers = default_workers() if workers is None else workers
        return Dataset(None, None, batch_size, batches, classes, source=source, workers=workers, augment=augment, pin_memory=pin, preprocessing=used)
    if not path.is_file():
        raise UserError(f"data {path} does not exist.")
    return _tensor_file(path, batch_size, batches, augment)


def _tensor_file(path: Path, batch_size: int, batches: int | None, augment: Augment) -> Dataset:
    """A .npz / .safetensors file: in memory when small or compressed, memory-mapped otherwise."""
    arrays = read_arrays(path, mapped=True)
    for key in ("x", "y"):
        if key not in arrays:
            raise UserError(f"{path} has no array named {key!r} (it has {sorted(arrays)}); store inputs as x and targets as y.")
    x, y = validated(arrays["x"], arrays["y"], path)
    classes = class_names(arrays, path)
    if x.nbytes <= MAP_BYTES or not isinstance(x, np.memmap):  # small, or read whole already: tensors in memory
        xt = torch.from_numpy(np.array(x, dtype=np.float32, copy=isinstance(x, np.memmap)))
        yt = y if isinstance(y, torch.Tensor) else torch.from_numpy(np.array(y, dtype=np.float32))
        return Dataset(xt.contiguous(), yt.contiguous(), batch_size, batches, classes, augment=augment)
    return Dataset(None, None, batch_size, batches, classes, source=ArraySource(x, y, str(path)), augment=augment)


def _reading(path: Path, image_size: int | None, grayscale: bool, pre: Preprocessing | None, channels: int | None) -> Reading:
    """Colour mode and size: the flags, else the model's recorded preprocessing, else its first convolution."""
    if channels not in (None, 1, 3):
        raise UserError(f"the model's first convolution takes {channels} channels; images give 1 (grey) or 3 (RGB).")
    if grayscale and channels == 3:
        raise UserError("--grayscale reads one channel but the model's first convolution takes 3; drop --grayscale.")
    grey = grayscale or (pre is not None and pre.channels == 1) or channels == 1
    if image_size is None and pre is not None and pre.size is not None and pre.size[0] == pre.size[1]:
        image_size = pre.size[0]
    if pre is not None and len(pre.mean) not in (1, 1 if grey else 3):
        raise UserError(f"the images have {1 if grey else 3} channels but mean and std give {len(pre.mean)} values.")
    return Reading("L" if grey else "RGB", None if image_size is None else (image_size, image_size), pre)


def _applied(reading: Reading, source: Source) -> Preprocessing:
    """The preprocessing an image source applies, with its channels and size: what the model
    trained on it expects, recorded in the file written so the next command reads alike."""
    pre = reading.preprocessing or Preprocessing((0.0,), (1.0,))
    c, h, w = source.sample_shape
    return Preprocessing(pre.mean, pre.std, c, (h, w))
