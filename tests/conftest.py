"""Shared fixtures: a small generated dataset, cached once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

# A few images are enough for the plumbing tests; the demo uses the generator's defaults.
TINY_SYNTHETIC = {"num_train": 16, "num_val": 8, "image_size": 128, "max_instances": 3}


@pytest.fixture(scope="session")
def synthetic_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("synthetic-cache")


@pytest.fixture
def synthetic_data(synthetic_cache: Path) -> dict:
    """The experiment `data` section of the tiny generated dataset."""
    return {"backend": "synthetic", "cache_dir": str(synthetic_cache), "synthetic": TINY_SYNTHETIC}
