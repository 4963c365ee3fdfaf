"""Helpers for the tests: the bundled sample models and data."""

from __future__ import annotations

from pathlib import Path

import pytest

from explainfix_cli.io.checkpoints import LoadedModel, open_model
from explainfix_cli.io.data import Dataset, load_data

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
CLASSIFIERS = ["resnet", "densenet", "mobilenet", "vgg", "shufflenet", "convnext"]
DATA_OF = {"unet": "nuclei_val.npz", "resnet_multilabel": "digits_multilabel_val.npz"}


def sample_model(name: str) -> LoadedModel:
    path = SAMPLES / f"{name}.safetensors"
    if not path.exists():
        pytest.skip(f"{path} not generated")
    return open_model(path)


def sample_data(model_name: str, batch_size: int = 64, batches: int | None = None, split: str = "val") -> Dataset:
    """The sample's data: `val` (what the tests prune on) or `train` (held out from every prune)."""
    name = DATA_OF.get(model_name, "digits_val.npz").replace("_val", f"_{split}")
    return load_data(SAMPLES / name, batch_size=batch_size, batches=batches)
