"""resolve_causal_lm: folders, GGUF conversion and its cache, hub ids, and the errors in between.

The GGUF test writes a tiny Llama as GGUF (the way llama.cpp lays it out) and checks the converted
folder reproduces the original model's logits and tokenization, so the conversion recipe is tested
in seconds without the 135M default.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_llama import CHATML, write_tiny_gguf, write_tiny_llama

from smallmighty.errors import SlmError
from smallmighty.models.causal_lm import (
    gguf_cache_path,
    load_hf_causal_lm,
    resolve_causal_lm,
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="module")
def tiny_gguf(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tiny_dir, tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf")


def test_hf_folder_resolves_to_itself(tiny_dir: Path) -> None:
    assert resolve_causal_lm(str(tiny_dir)) == tiny_dir


@pytest.mark.parametrize("remove, named", [
    ("config.json", "config.json"), ("tokenizer.json", "tokenizer.json"), ("model.safetensors", "*.safetensors"),
])
def test_incomplete_folder_names_the_missing_file(tiny_dir: Path, tmp_path: Path, remove: str, named: str) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_dir.iterdir():
        if f.name != remove:
            (broken / f.name).symlink_to(f)
    with pytest.raises(SlmError, match="missing .*" + re.escape(named)):
        resolve_causal_lm(broken)


def test_pickled_weights_are_refused_with_a_reason(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80")
    with pytest.raises(SlmError, match="only pickled weights"):
        resolve_causal_lm(tmp_path)


def test_missing_path_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "model.gguf"
    with pytest.raises(SlmError, match=f"{missing}: no such file"):
        resolve_causal_lm(missing)


def test_a_file_that_is_not_a_model(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("hi")
    with pytest.raises(SlmError, match="not a model"):
        resolve_causal_lm(notes)


def test_hub_id_offline_says_it_could_not_download(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(SlmError, match="'someorg/some-model' is not a local path and could not be downloaded"):
        resolve_causal_lm("someorg/some-model")


def test_gguf_converts_once_and_matches_the_original(tiny_dir: Path, tiny_gguf: Path, tmp_path: Path,
                                                      capfd: pytest.CaptureFixture[str]) -> None:
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    cache = tmp_path / "cache"
    converted = resolve_causal_lm(tiny_gguf, cache_dir=cache)
    assert converted == gguf_cache_path(tiny_gguf, cache) and converted.parent == cache
    assert "Converting" in capfd.readouterr().err
    assert [p.name for p in cache.iterdir()] == [converted.name]  # no temp leftovers

    config = json.loads((converted / "config.json").read_text())
    assert "quantization_config" not in config
    tok_config = json.loads((converted / "tokenizer_config.json").read_text())
    assert tok_config["chat_template"] == CHATML
    assert tok_config["eos_token"] == "<|im_end|>"
    assert json.loads((converted / "generation_config.json").read_text())["eos_token_id"] == 2

    text = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
    original_tok = Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))
    converted_tok = Tokenizer.from_file(str(converted / "tokenizer.json"))
    ids = original_tok.encode(text).ids
    assert converted_tok.encode(text).ids == ids

    def logits(directory: Path) -> torch.Tensor:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        with torch.no_grad():
            return model(torch.tensor([ids])).logits

    torch.testing.assert_close(logits(converted), logits(tiny_dir), atol=1e-4, rtol=1e-4)

    # Second call: a cache hit, no message, same folder.
    assert resolve_causal_lm(tiny_gguf, cache_dir=cache) == converted
    assert "Converting" not in capfd.readouterr().err


def test_cache_hit_imports_nothing_heavy(tiny_dir: Path, tiny_gguf: Path, tmp_path: Path) -> None:
    """A cached model must resolve without importing torch or transformers (cold start)."""
    cache = tmp_path / "cache"
    target = gguf_cache_path(tiny_gguf, cache)
    target.parent.mkdir(parents=True)
    target.symlink_to(tiny_dir, target_is_directory=True)  # stands in for an earlier conversion
    code = ("import sys; from smallmighty.models.causal_lm import resolve_causal_lm as r; "
            f"print(r({str(tiny_gguf)!r}, cache_dir={str(cache)!r})); "
            "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert out.stdout.splitlines() == [str(target), "[]"]


def test_cache_key_follows_the_content(tiny_gguf: Path, tmp_path: Path) -> None:
    copy = tmp_path / tiny_gguf.name
    copy.write_bytes(tiny_gguf.read_bytes())
    before = gguf_cache_path(copy, tmp_path)
    assert before.name.startswith("tiny-llama.F32-")
    assert gguf_cache_path(tiny_gguf, tmp_path) == before  # a copy elsewhere reuses the conversion
    os.utime(copy, ns=(copy.stat().st_atime_ns, copy.stat().st_mtime_ns + 10**9))
    assert gguf_cache_path(copy, tmp_path) == before  # touched, same bytes
    data = bytearray(copy.read_bytes())
    data[-1] ^= 1
    copy.write_bytes(bytes(data))
    assert gguf_cache_path(copy, tmp_path) != before  # rewritten in place


def test_failed_conversion_leaves_no_cache(tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from smallmighty.models import causal_lm

    def half_done(gguf: Path, out: Path) -> None:
        out.mkdir()
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt  # a user pressing Ctrl-C mid-conversion

    monkeypatch.setattr(causal_lm, "_convert_gguf", half_done)
    with pytest.raises(KeyboardInterrupt):
        resolve_causal_lm(tiny_gguf, cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


@pytest.mark.slow
def test_default_model_converts_and_predicts(tmp_path: Path) -> None:
    """The real default (SmolLM2-135M-Instruct Q4_1), converted afresh, then run by transformers."""
    import torch

    directory = resolve_causal_lm(None, cache_dir=tmp_path)
    model, tokenizer = load_hf_causal_lm(directory)
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    ids = tokenizer(prompt + "The capital of France is", add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        next_id = model(ids).logits[0, -1].argmax().item()
    assert tokenizer.decode([next_id]).strip() == "Paris"
