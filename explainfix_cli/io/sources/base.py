"""What every data source serves: samples by index, read on demand (docs/cli.md "Data in").

A source is a `torch.utils.data.Dataset` whose items are whole minibatches: the key is
`(indices, seed, augment)` and the item `(x, y)` stacked, or a `Failed` sentence when an entry is
bad, so that a DataLoader worker's failure reaches the user as one sentence, not a traceback.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from explainfix_cli.errors import UserError

TargetKind = Literal["labels", "multilabel", "mask"]
Augment = Literal["none", "light", "standard"]
Key = tuple[Sequence[int], int | None, Augment]


@dataclass(frozen=True)
class Failed:
    """A bad entry met while streaming, told back from a worker as the sentence to show."""

    message: str


class Source(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Samples by index. `labels` holds every target when they are known without reading a sample
    (class labels, multi-label vectors); masks are read with their images."""

    kind: TargetKind
    labels: torch.Tensor | None = None
    sample_shape: tuple[int, ...]
    target_shape: tuple[int, ...]
    decoded: int = 0  # samples read in this process: flat memory means this follows the batches read, not N

    def __len__(self) -> int:
        raise NotImplementedError

    def describe(self, index: int) -> str:
        """The entry in words, for messages: a file name or a row of a list."""
        return f"sample {index}"

    def sample(self, index: int, rng: random.Random | None, augment: Augment) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def fetch(self, indices: Sequence[int], seed: int | None, augment: Augment) -> tuple[torch.Tensor, torch.Tensor]:
        """The minibatch of `indices`, stacked; `seed` draws each sample's augmentation."""
        pairs = [self.sample(i, None if seed is None else random.Random(seed * 1_000_003 + i), augment) for i in indices]
        self.decoded += len(pairs)
        return stacked([p[0] for p in pairs]), stacked([p[1] for p in pairs])

    def __getitem__(self, key: Key) -> tuple[torch.Tensor, torch.Tensor] | Failed:
        try:
            return self.fetch(*key)
        except UserError as e:
            return Failed(str(e))


def stacked(tensors: list[torch.Tensor]) -> torch.Tensor:
    """`torch.stack(tensors)`; in a DataLoader worker, straight into shared memory (as PyTorch's
    own collation does). A batch stacked in private memory is copied into shared memory to cross
    to the main process, and the freed copies fragment the worker's heap: one worker streaming
    128x128 RGB minibatches of 32 held 414 MB, and 46 MB this way."""
    return torch.utils.data.default_collate(tensors)


def as_is(item: object) -> object:
    """The DataLoader's collate function: a source already serves whole minibatches."""
    return item


class Subset(Source):
    """Some samples of another source, by index (a check split, `Dataset.subset`)."""

    def __init__(self, parent: Source, indices: Sequence[int]) -> None:
        self.parent, self.indices = parent, list(indices)
        self.kind, self.sample_shape, self.target_shape = parent.kind, parent.sample_shape, parent.target_shape
        self.labels = None if parent.labels is None else parent.labels[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def describe(self, index: int) -> str:
        return self.parent.describe(self.indices[index])

    def fetch(self, indices: Sequence[int], seed: int | None, augment: Augment) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.parent.fetch([self.indices[i] for i in indices], seed, augment)
        self.decoded += len(x)
        return x, y
