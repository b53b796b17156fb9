"""Write a Llama-family causal LM folder as one GGUF file, the format llama.cpp and Ollama load.

Everything is written with the `gguf` package (the writer llama.cpp's own converter uses), with the
names and layout llama.cpp reads:

* tensors under llama.cpp's names (`token_embd`, `blk.N.attn_q`, ...), found with gguf's own
  name map, so HF checkpoints with the usual names need no table of ours;
* q and k rows reordered per head from HF's two halves to llama.cpp's interleaved rotary pairs
  (arch `llama`; Qwen2 keeps HF's order, as llama.cpp runs its rotary in halves);
* the byte-level BPE tokenizer as tokens, types and merges, the special-token ids, whether BOS is
  added, and the chat template; the pre-tokenizer is named from tokenizer.json's own splitting rule,
  so llama.cpp splits text exactly as `tokenizers` does (an unknown rule is an error, not a guess);
* rope base, linear scaling, and Llama 3 scaling as the `rope_freqs` tensor llama.cpp divides by.

Types: f32 and f16 keep every weight (norms stay f32); q8_0 and q4_0 quantize the 2-D weights
with gguf's reference quantizers, in blocks of 32 along each row. q4_0 keeps the token embedding
and output matrix at q8_0: llama.cpp's own quantizer gives those a higher precision too (q6_K,
which gguf-py cannot write), because the output projection's errors reach every logit.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from smallmighty.errors import SlmError
from smallmighty.io import atomic_path, read_json

GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0")
#: model_type -> (llama.cpp architecture, whether q/k rows are reordered into interleaved pairs)
ARCHITECTURES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}

# tokenizer.json pre-tokenizer rules and the llama.cpp pre-tokenizer that splits text the same way.
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's name for the splitting rule of a byte-level BPE tokenizer.json.

    - GPT-2's regex alone (ByteLevel with use_regex) -> "gpt-2"
    - digits split one by one, then GPT-2's regex (SmolLM, StarCoder) -> "smollm"
    - Llama 3's or Qwen2's regex, then ByteLevel without regex -> "llama-bpe" / "qwen2"
    """
    steps = (pre or {}).get("pretokenizers", [pre] if pre else [])
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        if regex == _LLAMA3_REGEX:
            return "llama-bpe"
        if regex == _QWEN2_REGEX:
            return "qwen2"
    raise SlmError(f"tokenizer.json splits text with {json.dumps(pre)[:200]}, which has no llama.cpp "
                   "pre-tokenizer we can name safely (supported: GPT-2, SmolLM, Llama 3, Qwen2 rules)")


def _interleave_rotary(weight: np.ndarray, heads: int) -> np.ndarray:
    """Reorder each head's rows from HF's [first halves, second halves] to llama.cpp's (x0, y0, x1, y1...)."""
    shape = weight.shape
    return weight.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(read_json(index).get("weight_map", {}).values()))
        return [model_dir / n for n in names]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise SlmError(f"{model_dir}: no model.safetensors (or model.safetensors.index.json) to export")


def _tensors(model_dir: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, float32 array) for every tensor, one at a time, so memory holds one tensor's copy."""
    import torch
    from safetensors import safe_open

    for path in _weight_files(model_dir):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                yield name, handle.get_tensor(name).to(torch.float32).numpy()


def _rope(config: dict) -> tuple[float, dict]:
    """(rope base, scaling dict with 'rope_type'), from transformers 4's or 5's config fields."""
    rope = dict(config.get("rope_parameters") or {})
    rope.update(config.get("rope_scaling") or {})
    theta = float(rope.pop("rope_theta", config.get("rope_theta", 10000.0)))
    rope["rope_type"] = rope.get("rope_type", rope.get("type", "default"))
    return theta, rope


def llama3_rope_factors(head_dim: int, theta: float, rope: dict) -> np.ndarray:
    """Per-frequency divisors of Llama 3's rope scaling: 1 for short wavelengths, `factor` for long
    ones, a smooth blend between (what llama.cpp reads from the `rope_freqs` tensor)."""
    factor, low, high = float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    old_len = float(rope["original_max_position_embeddings"])
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    smooth = np.clip((old_len / wavelen - low) / (high - low), 0.0, 1.0)
    return (1.0 / ((1 - smooth) / factor + smooth)).astype(np.float32)


def _tensor_type(name: str, array: np.ndarray, gguf_type: str):
    """The GGML type one tensor is stored as under `gguf_type`."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

    if array.ndim < 2 or gguf_type == "f32":
        return Q.F32
    wanted = {"f16": Q.F16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[gguf_type]
    if wanted == Q.Q4_0 and name in ("token_embd.weight", "output.weight"):
        wanted = Q.Q8_0
    block = GGML_QUANT_SIZES[wanted][0]
    return wanted if array.shape[-1] % block == 0 else Q.F16  # rows that do not split into blocks


def _add_tokenizer(writer: Any, model_dir: Path, vocab_size: int) -> None:
    from gguf import SpecialVocab, TokenType

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise SlmError(f"{model_dir}: tokenizer.json is missing; GGUF files carry their tokenizer")
    tok = read_json(path)
    model = tok.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or (tok.get("decoder") or {}).get("type") != "ByteLevel":
        raise SlmError(f"{path}: only byte-level BPE tokenizers (GPT-2 style: SmolLM, Llama 3, Qwen2) "
                       "can be exported to GGUF so far")
    pre = pre_tokenizer_name(tok.get("pre_tokenizer"))
    tokens: dict[int, tuple[str, int]] = {i: (t, TokenType.NORMAL) for t, i in model["vocab"].items()}
    for added in tok.get("added_tokens") or []:
        kind = TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED
        tokens[added["id"]] = (added["content"], kind)
    if max(tokens) >= vocab_size:
        raise SlmError(f"{path}: token id {max(tokens)} is outside the model's {vocab_size} embeddings")
    # llama.cpp wants one entry per embedding row; rows no token uses get placeholders, as its converter writes.
    names = [tokens.get(i, (f"[PAD{i}]", TokenType.UNUSED)) for i in range(vocab_size)]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list([n for n, _ in names])
    writer.add_token_types([int(k) for _, k in names])
    logging.getLogger("gguf.vocab").setLevel(logging.ERROR)
    special = SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise SlmError(f"{path}: the BPE tokenizer has no merges")
    # Whether BOS is prepended comes from tokenizer.json's post-processor (SpecialVocab reads it);
    # llama.cpp's default for BPE vocabularies is to prepend, which would change every prompt.
    special.add_special_token.setdefault("bos", False)
    special.add_to_gguf(writer, quiet=True)


def _add_hyperparameters(writer: Any, config: dict, theta: float, rope: dict) -> None:
    """The model's shape, norm and rope settings under llama.cpp's keys."""
    import gguf

    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    context = config.get("max_position_embeddings", 2048)
    if config.get("use_sliding_window", True) and isinstance(config.get("sliding_window"), int):
        context = min(context, config["sliding_window"])  # llama.cpp's llama arch attends to all
    writer.add_context_length(context)
    writer.add_embedding_length(hidden)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    if head_dim != hidden // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(theta)
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(config["vocab_size"])


def export_gguf(model: str | os.PathLike | None, out: str | os.PathLike, *, gguf_type: str = "f16") -> Path:
    """Write the causal LM `model` (anything `resolve_causal_lm` takes; None = the default SmolLM2)
    to the GGUF file `out`, atomically. Returns the path."""
    import gguf

    from smallmighty.models.causal_lm import resolve_causal_lm

    if gguf_type not in GGUF_TYPES:
        raise SlmError(f"GGUF type must be one of {', '.join(GGUF_TYPES)}, got {gguf_type!r}")
    model_dir = resolve_causal_lm(model)
    config = read_json(model_dir / "config.json")
    if any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or []):
        raise SlmError(f"{model_dir} is a sequence classifier; --format gguf exports causal language models "
                       "(export classifiers with --format onnx or litert)")
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise SlmError(f"{model_dir}: model type {model_type!r} cannot be exported to GGUF "
                       f"(supported: {', '.join(ARCHITECTURES)})")
    if config.get("mlp_bias") or config.get("hidden_act", "silu") != "silu":
        raise SlmError(f"{model_dir}: only SwiGLU MLPs without bias can be exported to GGUF")
    arch, interleave = ARCHITECTURES[model_type]
    n_layers, hidden = config["num_hidden_layers"], config["hidden_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    vocab_size = config["vocab_size"]
    theta, rope = _rope(config)
    if rope["rope_type"] not in ("default", "linear", "llama3", "dynamic"):
        raise SlmError(f"{model_dir}: rope scaling {rope['rope_type']!r} cannot be exported to GGUF "
                       "(default, linear, llama3 can)")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA if arch == "llama" else gguf.MODEL_ARCH.QWEN2, n_layers)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[gguf_type]
    out = Path(out)
    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch, use_temp_file=True)  # tensors spill to disk past 256 MB
        writer.add_name(model_dir.name)
        _add_hyperparameters(writer, config, theta, rope)
        writer.add_file_type(file_type)
        if gguf_type in ("q8_0", "q4_0"):
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_tokenizer(writer, model_dir, vocab_size)
        if rope["rope_type"] == "llama3":
            writer.add_tensor("rope_freqs.weight", llama3_rope_factors(head_dim, theta, rope))
        tied = bool(config.get("tie_word_embeddings", False))
        for hf_name, array in _tensors(model_dir):
            if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
                continue
            name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise SlmError(f"{model_dir}: tensor {hf_name!r} has no place in a llama.cpp {arch} model")
            if interleave and name.endswith(("attn_q.weight", "attn_q.bias")):
                array = _interleave_rotary(array, heads)
            elif interleave and name.endswith(("attn_k.weight", "attn_k.bias")):
                array = _interleave_rotary(array, kv_heads)
            qtype = _tensor_type(name, array, gguf_type)
            data = gguf.quants.quantize(np.ascontiguousarray(array), qtype)
            writer.add_tensor(name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out
