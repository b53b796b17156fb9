"""Fixtures shared by the export tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_classifier import write_tiny_classifier


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory) -> Path:
    """A tiny random BERT classifier folder (see tests/tiny_classifier.py)."""
    return write_tiny_classifier(tmp_path_factory.mktemp("classifier"))
