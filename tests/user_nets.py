"""Networks of the kind users write themselves (not the bundled samples): 3x3 convolutions only,
no 1x1 layers, for the adaptive fine-tuning tests and benchmarks/adaptive_finetune.py.

Every one takes the 16x16 one-channel digits and has ten outputs. `trained(name)` trains one
quickly on digits_train.npz (the library's own training loop, every parameter learned, the best
epoch by the first half of digits_val.npz, so the second half chooses nothing).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from explainfix_cli.io.data import Dataset, load_data

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"


def _block(cin: int, cout: int, stride: int = 1, bn: bool = True, padding: int = 1) -> list[nn.Module]:
    conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=padding, bias=not bn)
    return [conv, nn.BatchNorm2d(cout), nn.ReLU()] if bn else [conv, nn.ReLU()]


class Plain(nn.Module):
    """Three 3x3 convolutions with batch norm, the middle one strided, global pooling, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(*_block(1, 16), *_block(16, 32, stride=2), *_block(32, 32))
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


class NoNorm(nn.Module):
    """As `Plain` without batch norm: convolutions with biases."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(*_block(1, 16, bn=False), *_block(16, 32, stride=2, bn=False), *_block(32, 32, bn=False))
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


class OddStride(nn.Module):
    """Strides 3 and 1, no padding on the strided layer: 16 -> 16 -> 5 -> 5."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(*_block(1, 16), *_block(16, 32, stride=3, padding=0), *_block(32, 32))
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


class Residual(nn.Module):
    """The issue's network: a stem conv, a residual block of two 3x3 convs, max pooling, a strided
    3x3 conv, global pooling, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_block(1, 16))
        self.conv1, self.bn1 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.pool = nn.MaxPool2d(2)
        self.down = nn.Sequential(*_block(16, 32, stride=2))
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
        return self.head(self.down(self.pool(x)).mean(dim=(2, 3)))


NETS: dict[str, type[nn.Module]] = {"plain": Plain, "nonorm": NoNorm, "oddstride": OddStride, "residual": Residual}


def digits(split: str, batch_size: int = 64) -> Dataset:
    return load_data(SAMPLES / f"digits_{split}.npz", batch_size=batch_size)


def halves(data: Dataset) -> tuple[Dataset, Dataset]:
    """digits_val.npz in two: A (first half: saliency, fine-tuning's validation) and B (second half: judges only)."""
    n = data.num_samples // 2
    a = Dataset(data.x[:n], data.y[:n], data.batch_size, None, data.classes)
    b = Dataset(data.x[n : data.num_samples], data.y[n : data.num_samples], data.batch_size, None, data.classes)
    return a, b


def trained(name: str, epochs: int = 12, seed: int = 0) -> nn.Module:
    """`NETS[name]` trained `epochs` epochs on digits_train.npz, every parameter learned, best epoch by half A."""
    from explainfix_cli.training.finetune import Recipe, finetune

    torch.manual_seed(seed)
    model = NETS[name]()
    a, _ = halves(digits("val", 256))
    # NCHW: the nets docs/method.md §4 and the tests measured (channels-last would round them apart)
    model, _ = finetune(model, digits("train"), a, recipe=Recipe(epochs=epochs, train="all", seed=seed, memory_format="contiguous"))
    return model
