"""Fixtures shared by the test files (helpers for building them live in helpers.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch
from helpers import SAMPLES

from explainfix_cli.io.data import Dataset, load_data

# The suite runs in two worker processes (pyproject.toml: -n 2) on two cores: one thread each, for
# them and for the processes they start, keeps the cores from being oversubscribed.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture
def digits() -> Dataset:
    return load_data(SAMPLES / "digits_val.npz", batch_size=64)


@pytest.fixture
def keep_global_rng() -> Iterator[None]:
    """Leave torch's global RNG as the test found it (the CLI seeds it; models draw from it), so
    that tests run later see the same random state whichever tests ran before them."""
    with torch.random.fork_rng():
        yield
