"""Shared fixtures: where the real datasets live, and small local models built on the fly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    """The real datasets beside the checkout (`../shared/datasets`), or $SLM_SHARED_DATASETS."""
    path = Path(os.environ.get("SLM_SHARED_DATASETS", REPO.parent / "shared" / "datasets"))
    if not path.is_dir():
        pytest.skip(f"real datasets not found at {path}")
    return path
