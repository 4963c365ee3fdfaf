"""Helpers for the tests: the bundled sample models and data."""

from __future__ import annotations

from pathlib import Path

import pytest

from explainfix_cli.checkpoints import LoadedModel, open_model
from explainfix_cli.data import Dataset, load_data

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
CLASSIFIERS = ["resnet", "densenet", "mobilenet", "vgg", "shufflenet", "convnext"]
DATA_OF = {"unet": "nuclei_val.npz", "resnet_multilabel": "digits_multilabel_val.npz"}


def sample_model(name: str) -> LoadedModel:
    path = SAMPLES / f"{name}.safetensors"
    if not path.exists():
        pytest.skip(f"{path} not generated")
    return open_model(path)


def sample_data(model_name: str, batch_size: int = 64, batches: int | None = None) -> Dataset:
    return load_data(SAMPLES / DATA_OF.get(model_name, "digits_val.npz"), batch_size=batch_size, batches=batches)
