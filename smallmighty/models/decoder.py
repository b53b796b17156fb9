"""Llama-style decoders to train from scratch, built and saved as standard HF `LlamaForCausalLM` folders.

The architecture is Llama's (rotary positions, RMSNorm, SwiGLU feed-forward, grouped-query attention)
with the input embedding tied to the output projection, as small models do (SmolLM2): at 30M
parameters an untied head would be an eighth of the model. Shapes are data (LitGPT-style): a named
preset from `PRESETS`, optionally with some fields replaced, or a JSON file of `DecoderShape` fields.

Saved folders hold `model.safetensors`, `config.json`, `generation_config.json`, the tokenizer and
`smallmighty.json` (how the model was made), so `AutoModelForCausalLM.from_pretrained(out)`, llama.cpp's
converter and our engine (`slm generate --model out`) all read them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from smallmighty.data.tokenizer import save_tokenizer
from smallmighty.errors import SlmError
from smallmighty.io import atomic_path, read_json
from smallmighty.models.encoder import META_FILE


@dataclass(frozen=True)
class DecoderShape:
    """The size of a decoder; the vocabulary comes from its tokenizer."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    max_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def validate(self) -> "DecoderShape":
        for f in ("hidden", "layers", "heads", "kv_heads", "ffn", "max_len"):
            if getattr(self, f) < 1:
                raise SlmError(f"decoder shape: {f} must be at least 1, got {getattr(self, f)}")
        if self.hidden % self.heads:
            raise SlmError(f"decoder shape: hidden {self.hidden} is not a multiple of heads {self.heads}")
        if self.heads % self.kv_heads:
            raise SlmError(f"decoder shape: heads {self.heads} is not a multiple of kv_heads {self.kv_heads}")
        if (self.hidden // self.heads) % 2:
            raise SlmError(f"decoder shape: the head size {self.hidden // self.heads} must be even (rotary pairs)")
        return self

    def parameters(self, vocab_size: int) -> int:
        """Parameter count with a tied embedding of `vocab_size` rows."""
        head = self.hidden // self.heads
        attn = 2 * self.hidden * self.heads * head + 2 * self.hidden * self.kv_heads * head
        return vocab_size * self.hidden + self.layers * (attn + 3 * self.hidden * self.ffn + 2 * self.hidden) \
            + self.hidden


#: Named shapes; the sizes in the names count a tied 8,192-token vocabulary (`slm tokenizer train`'s default).
PRESETS: dict[str, DecoderShape] = {
    "tiny": DecoderShape(hidden=64, layers=2, heads=4, kv_heads=2, ffn=176, max_len=512),  # tests, smoke runs
    "12m": DecoderShape(hidden=384, layers=6, heads=6, kv_heads=2, ffn=1024),
    "30m": DecoderShape(hidden=512, layers=8, heads=8, kv_heads=4, ffn=1536),
    "60m": DecoderShape(hidden=640, layers=12, heads=10, kv_heads=5, ffn=1728),
    "smollm2-135m": DecoderShape(hidden=576, layers=30, heads=9, kv_heads=3, ffn=1536, max_len=8192,
                                 rope_theta=100000.0),
}


def decoder_shape(preset: str | None = None, shape_file: str | Path | None = None, **overrides: Any) -> DecoderShape:
    """A shape from a preset name or a JSON file of `DecoderShape` fields, with `overrides` (None ones
    ignored) replacing fields."""
    names = {f.name for f in fields(DecoderShape)}
    if shape_file is not None:
        data = read_json(shape_file)
        if not isinstance(data, dict):
            raise SlmError(f"{shape_file}: expected a JSON object of shape fields ({', '.join(sorted(names))})")
        unknown = sorted(set(data) - names)
        if unknown:
            raise SlmError(f"{shape_file}: unknown shape field(s) {', '.join(unknown)}; "
                           f"known: {', '.join(sorted(names))}")
        base = dict(asdict(PRESETS[preset]) if preset else {}, **data)
        missing = sorted(names - set(base) - {"max_len", "rope_theta", "norm_eps"})
        if missing:
            raise SlmError(f"{shape_file}: missing shape field(s) {', '.join(missing)}")
        shape = DecoderShape(**base)
    else:
        preset = preset or "30m"
        if preset not in PRESETS:
            raise SlmError(f"unknown decoder preset '{preset}'; choose one of {', '.join(PRESETS)}")
        shape = PRESETS[preset]
    return replace(shape, **{k: v for k, v in overrides.items() if v is not None}).validate()


def llama_config(shape: DecoderShape, tokenizer):
    """The transformers `LlamaConfig` for `shape` with `tokenizer`'s vocabulary and special ids."""
    from transformers import LlamaConfig

    eos = tokenizer.eos_token_id
    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=shape.hidden, intermediate_size=shape.ffn,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        head_dim=shape.hidden // shape.heads, max_position_embeddings=shape.max_len, rms_norm_eps=shape.norm_eps,
        rope_theta=shape.rope_theta, hidden_act="silu", tie_word_embeddings=True, attention_bias=False,
        mlp_bias=False, bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos,
        eos_token_id=eos, pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
    )


def build_decoder(shape: DecoderShape, tokenizer, *, seed: int = 0):
    """A freshly initialised fp32 `LlamaForCausalLM` (same weights for the same seed, on every rank)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM._from_config(llama_config(shape.validate(), tokenizer), dtype=torch.float32,
                                          attn_implementation="sdpa")
    return model


def save_decoder(model, tokenizer, out_dir: str | Path, *, meta: dict | None = None) -> Path:
    """Write `model` (its fp32 weights as safetensors) and `tokenizer` as one HF folder, atomically."""
    out_dir = Path(out_dir)
    with atomic_path(out_dir) as tmp:
        model.save_pretrained(str(tmp))
        save_tokenizer(tokenizer, tmp)
        (tmp / META_FILE).write_text(json.dumps(meta or {}, indent=2, default=str) + "\n", encoding="utf-8")
    return out_dir
