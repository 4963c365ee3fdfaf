"""Fixtures shared by the test files (helpers for building them live in helpers.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from helpers import SAMPLES

from explainfix_cli.data import Dataset, load_data


@pytest.fixture
def digits() -> Dataset:
    return load_data(SAMPLES / "digits_val.npz", batch_size=64)


@pytest.fixture
def keep_global_rng() -> Iterator[None]:
    """Leave torch's global RNG as the test found it (the CLI seeds it; models draw from it), so
    that tests run later see the same random state whichever tests ran before them."""
    with torch.random.fork_rng():
        yield
