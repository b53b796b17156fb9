"""A Python environment holding only the packages an exported model needs, without torch.

An export is only as good as the way it runs where smallmighty is not. To test and time
`classify.py` as a user who ran `pip install onnxruntime tokenizers numpy` would, we need a Python
in which torch (and smallmighty) cannot be imported at all, not just one that happens not to import
them. `minimal_python` makes one in about a second, without network: a venv without pip whose
site-packages links to this environment's installed copies of the named packages and everything they
require (resolved from their metadata as pip would), and nothing else.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as metadata
import os
import re
import subprocess
import sys
from pathlib import Path

from smallmighty.errors import SlmError

#: What the standalone ONNX example needs (see standalone_classify.py).
ONNX_RUNTIME_PACKAGES = ("onnxruntime", "tokenizers", "numpy")
_DONE = ".slm-complete"


def _key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def dependency_closure(packages: tuple[str, ...] | list[str]) -> list[metadata.Distribution]:
    """The installed distributions of `packages` and of everything they require (environment markers
    evaluated, extras left out), each once."""
    from packaging.requirements import Requirement

    found: dict[str, metadata.Distribution] = {}
    todo = list(packages)
    while todo:
        name = todo.pop()
        if _key(name) in found:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            if name in packages:
                raise SlmError(f"{name} is not installed in this environment") from None
            continue  # an optional requirement this platform's pip would not have installed either
        found[_key(name)] = dist
        for line in dist.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return list(found.values())


def _top_level_paths(dist: metadata.Distribution) -> set[Path]:
    """What a distribution put into site-packages: its top-level packages, modules and metadata folder."""
    tops = set()
    for file in dist.files or []:
        first = file.parts[0]
        if first not in ("..", "__pycache__") and not first.endswith(".pth"):
            tops.add(Path(dist.locate_file(first)))
    return tops


def minimal_python(packages: tuple[str, ...] = ONNX_RUNTIME_PACKAGES, env_dir: str | os.PathLike | None = None) -> Path:
    """The interpreter of an environment with only `packages` (and their requirements) importable.

    Made once per set of installed versions under the cache's `envs` folder (or in `env_dir`).
    """
    dists = dependency_closure(packages)
    if env_dir is None:
        from smallmighty.cache import cache_dir

        stamp = ",".join(sorted(f"{_key(d.metadata['Name'])}=={d.version}" for d in dists))
        env_dir = cache_dir("envs") / f"only-{'-'.join(packages)}-{hashlib.sha256(stamp.encode()).hexdigest()[:10]}"
    env = Path(env_dir)
    python = env / "bin" / "python"
    if (env / _DONE).is_file():
        return python
    done = subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--clear", str(env)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SlmError(f"cannot create a virtual environment at {env}: {done.stderr.strip()[-300:]}")
    site = env / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    for dist in dists:
        for source in _top_level_paths(dist):
            target = site / source.name
            if source.exists() and not target.exists():
                target.symlink_to(source)
    (env / _DONE).write_text("\n".join(sorted(d.metadata["Name"] for d in dists)) + "\n", encoding="utf-8")
    return python
