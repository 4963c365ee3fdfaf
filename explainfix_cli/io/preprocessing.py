"""Input preprocessing: how a model's inputs are made from images (mean and std per channel).

Torch-free at import, so that the command line checks `--mean`/`--std` before torch loads.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from explainfix_cli.errors import UserError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Preprocessing:
    """How a model's inputs are made from images: pixels scaled to [0, 1], then per channel
    `(x - mean[c]) / std[c]` (one value serves every channel).

    The files explainfix writes record it (`checkpoints.save_model`), so a folder of images is
    normalised the way the model was trained; `channels` and `size` (H, W) are the input the model
    was trained on, and set a folder's colour mode and image size when the user does not.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels: int | None = None
    size: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if not self.mean or len(self.mean) != len(self.std):
            raise UserError(f"mean and std need one value per channel each, not {len(self.mean)} and {len(self.std)}.")
        if not all(math.isfinite(v) for v in (*self.mean, *self.std)) or min(self.std) <= 0:
            raise UserError(f"mean must be finite and std positive, not mean {list(self.mean)}, std {list(self.std)}.")

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """`x` (N, C, H, W) in [0, 1] as the model's input."""
        import torch

        if len(self.mean) not in (1, x.shape[1]):
            raise UserError(f"the images have {x.shape[1]} channels but mean and std give {len(self.mean)} values.")
        mean = torch.tensor(self.mean, dtype=x.dtype).reshape(1, -1, 1, 1)  # (1, C or 1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype).reshape(1, -1, 1, 1)
        return ((x - mean) / std).contiguous()

    def to_json(self) -> dict[str, Any]:
        return {
            "mean": list(self.mean),
            "std": list(self.std),
            "channels": self.channels,
            "size": None if self.size is None else list(self.size),
        }

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> Preprocessing:
        size = value.get("size")
        return cls(
            tuple(float(v) for v in value["mean"]),
            tuple(float(v) for v in value["std"]),
            value.get("channels"),
            None if size is None else (int(size[0]), int(size[1])),
        )


def parse_preprocessing(mean: str | None, std: str | None) -> Preprocessing | None:
    """Per-channel `mean` and `std` given as comma-separated numbers, e.g. "0.485,0.456,0.406"."""
    if mean is None and std is None:
        return None
    if mean is None or std is None:
        raise UserError("`mean` and `std` go together; give both (one value, or one per channel).")
    values = []
    for name, text in (("`mean`", mean), ("`std`", std)):
        try:
            values.append(tuple(float(v) for v in text.split(",")))
        except ValueError:
            raise UserError(f"{name} must be comma-separated numbers, e.g. 0.5 or 0.485,0.456,0.406, not {text!r}.") from None
    return Preprocessing(values[0], values[1])
