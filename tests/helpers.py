"""Helpers for the tests: the bundled sample models and data."""

from __future__ import annotations

from pathlib import Path

import pytest

from explainfix_cli.io.checkpoints import LoadedModel, open_model
from explainfix_cli.io.data import Dataset, load_data

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
CLASSIFIERS = ["resnet", "densenet", "mobilenet", "vgg", "shufflenet", "convnext"]
DATA_OF = {"unet": "nuclei_val.npz", "resnet_multilabel": "digits_multilabel_val.npz"}


def committed_sample(name: str) -> Path:
    """A file of sample_models/, which is committed: a missing one fails the test, never skips it."""
    path = SAMPLES / name
    if not path.exists():
        pytest.fail(f"the committed sample {path} is missing (sample_models/make_samples.py makes it)")
    return path


def sample_model(name: str) -> LoadedModel:
    return open_model(committed_sample(f"{name}.safetensors"))


def sample_data(model_name: str, batch_size: int = 64, batches: int | None = None, split: str = "val") -> Dataset:
    """The sample's data: `val` (what the tests prune on) or `train` (held out from every prune)."""
    name = DATA_OF.get(model_name, "digits_val.npz").replace("_val", f"_{split}")
    return load_data(SAMPLES / name, batch_size=batch_size, batches=batches)
