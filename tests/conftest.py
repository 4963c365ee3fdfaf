"""Fixtures shared by the test files (helpers for building them live in helpers.py)."""

from __future__ import annotations

import pytest
from helpers import SAMPLES

from explainfix_cli.data import Dataset, load_data


@pytest.fixture
def digits() -> Dataset:
    return load_data(SAMPLES / "digits_val.npz", batch_size=64)
