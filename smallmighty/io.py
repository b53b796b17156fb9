"""Atomic file and directory writes, so a killed run never leaves a half-written output behind."""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from smallmighty.errors import DataError, SlmError


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success move it into place in one rename.

    Works for files and directories alike: whatever the caller writes at the yielded path replaces
    `path` only once the block finishes without an exception. A folder that already exists is
    swapped with the new one in one step where the OS can (`exchange_paths`); elsewhere it takes two
    renames, and `restore_interrupted` repairs a swap cut between them.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    restore_interrupted(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent)) / path.name
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            if not exchange_paths(tmp, path):  # then `tmp` holds the old folder, removed below
                old = set_aside_path(path)
                shutil.rmtree(old, ignore_errors=True)
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


@functools.cache
def _renameat2():
    """libc's renameat2 (Linux, glibc 2.28+), or None."""
    if not sys.platform.startswith("linux"):
        return None
    function = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if function is not None:
        function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return function


def exchange_paths(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Swap what `a` and `b` name in one atomic step; False, touching nothing, where the OS or the
    filesystem cannot (then the caller renames twice).

    Why: a folder cannot replace another in one plain rename, and between two renames a reader, or a
    `--resume` after a kill, would find nothing at the name. Linux's RENAME_EXCHANGE has no such gap.
    """
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    at_cwd, rename_exchange = -100, 2  # AT_FDCWD, RENAME_EXCHANGE
    if renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # not supported here
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def set_aside_path(path: str | os.PathLike) -> Path:
    """Where `atomic_path` keeps the previous version of a folder while it swaps in the new one."""
    path = Path(path)
    return path.with_name(f".{path.name}.old")


def restore_interrupted(path: str | os.PathLike) -> None:
    """Put back a folder whose replacement by `atomic_path` was cut between its two renames.

    Why: where folders cannot be exchanged in one step, `atomic_path` moves the old one aside to
    `.<name>.old` and then the new one in. A run killed between the two leaves its previous version
    only under that name; readers such as `--resume` call this first, so nothing written is lost.
    """
    old = set_aside_path(path)
    if not Path(path).exists() and old.is_dir():
        os.replace(old, path)


def check_writable(path: str | os.PathLike) -> None:
    """Raise SlmError naming `path` unless files can be created at it (a folder or file to be).

    Why: commands check their outputs before hours of training, not after. The check creates
    (and removes) a temporary file where the output, or its nearest existing parent, would go:
    permission bits alone say nothing under root or on a read-only mount.
    """
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise SlmError(f"cannot write {path}: {folder} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise SlmError(f"cannot write {path}: {err.strerror or err} ({folder})") from None


_MISSING = object()


def read_json(path: str | os.PathLike, default: Any = _MISSING) -> Any:
    """Read a JSON file; a broken one is a `DataError` naming the file and line.

    A missing file returns `default` when one is given (optional configs), else is an error that
    names the file.
    """
    path = Path(path)
    if not path.is_file():
        if default is not _MISSING:
            return default
        raise DataError("file not found", file=str(path))
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"not valid JSON ({err.msg})", file=str(path), line=err.lineno) from None
    except UnicodeDecodeError as err:
        raise DataError(f"not UTF-8 text ({err.reason} at byte {err.start})", file=str(path)) from None


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write `data` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
