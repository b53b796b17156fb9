"""Helpers for tests that start the CLI or torchrun in subprocesses.

A plain module next to conftest.py (pytest puts this folder on sys.path), not a test file.
"""

from __future__ import annotations

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
