"""One cache for everything smallmighty derives from a user's files, so their folders stay untouched.

Converted GGUF models, quantized weights, ONNX exports, compiled kernels and unpacked default models
all live under one root: `$SLM_CACHE_DIR`, else `$XDG_CACHE_HOME/smallmighty`, else
`~/.cache/smallmighty`. Nothing is ever written into a user's model folder or a hub snapshot.

Entries derived from files are keyed by `content_fingerprint`: a SHA-256 of the files' bytes, so a
copied or moved model reuses its entry and a model rewritten in place gets a new one. Hashing a
500 MB checkpoint takes about a third of a second, so each file's digest is remembered against its
path, size, modification time and inode (`fingerprints.json` in the root): an unchanged file costs
one `stat` on later starts.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from smallmighty.io import write_json

#: Bump when the meaning of a fingerprint changes, so old entries are not reused.
_SCHEME = "sha256-v1"
_MEMO = "fingerprints.json"


def cache_root() -> Path:
    """The root of smallmighty's cache (see the module docstring)."""
    root = os.environ.get("SLM_CACHE_DIR")
    if root:
        return Path(root).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "smallmighty"


def cache_dir(kind: str) -> Path:
    """The cache's folder for one kind of entry ("models", "quantized", "onnx", "kernels")."""
    return cache_root() / kind


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def content_fingerprint(files: Iterable[str | os.PathLike]) -> str:
    """A 16-hex-digit key for the bytes of `files` (and their names, in sorted order).

    Digests are memoized per file by (resolved path, size, mtime, inode) in the cache root; a cache
    that cannot be written only costs the hashing again next time.
    """
    paths = sorted((Path(f) for f in files), key=lambda p: p.name)
    memo_path = cache_root() / _MEMO
    try:
        memo = json.loads(memo_path.read_text(encoding="utf-8"))
        if not isinstance(memo, dict):
            memo = {}
    except (OSError, ValueError):
        memo = {}
    total = hashlib.sha256(_SCHEME.encode())
    changed = False
    for path in paths:
        stat = path.stat()
        stamp = f"{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ino}"
        key = str(path.resolve())
        entry = memo.get(key)
        if not (isinstance(entry, list) and len(entry) == 2 and entry[0] == stamp):
            entry = [stamp, _file_digest(path)]
            memo[key] = entry
            changed = True
        total.update(f"{path.name}\0{entry[1]}\0".encode())
    if changed:
        try:
            write_json(memo_path, memo)
        except OSError:
            pass
    return total.hexdigest()[:16]
