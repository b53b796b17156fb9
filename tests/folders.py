"""Snapshots of a folder's files, to check that loading a model writes nothing into the user's folder.

A plain module next to conftest.py (pytest puts this folder on sys.path), not a test file.
"""

from __future__ import annotations

from pathlib import Path


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative path -> bytes), hidden ones included."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
