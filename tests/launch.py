"""Helpers for tests that start the CLI or torchrun in subprocesses.

A plain module next to conftest.py (pytest puts this folder on sys.path), not a test file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A loopback port nobody listens on now (tests of several checkouts may run at once)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env() -> dict:
    """This checkout on the path, no progress bars, one thread per process (the cores are shared)."""
    return {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}


def saved_step(checkpoint: Path) -> int:
    """The global step of the checkpoint a running job last saved, 0 if none yet. The folder is
    swapped by two renames (`smallmighty.io.atomic_path`), so the old side is read in between."""
    from smallmighty.io import set_aside_path

    for folder in (checkpoint, set_aside_path(checkpoint)):
        try:
            return json.loads((folder / "state.json").read_text())["global_step"]
        except (FileNotFoundError, NotADirectoryError):
            continue
    return 0
