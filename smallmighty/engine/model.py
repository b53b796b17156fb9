"""A Llama-family decoder written for fast CPU inference, without importing transformers.

Covers Llama 1-3, SmolLM, Mistral (no sliding window beyond the context) and Qwen2 (q/k/v bias): they
share one architecture (RMSNorm, rotary positions, grouped-query attention, SwiGLU MLP) and differ
only in config fields. The layout is chosen for speed on a CPU, where decode time is mostly reading
weights plus the fixed cost of each operator call:

* q, k and v are one matrix and gate/up another, so each layer runs 4 matmuls instead of 7;
* the q and k rows are permuted within each head so that rotary embedding becomes one complex
  multiply done in place (dot products between q and k are unchanged by the shared permutation);
* keys and values live in one pre-allocated cache per layer and are written with a single copy.

Decoding steps (`LlamaModel.decode`) run as one native call per step when the C step in
`engine.native` builds, and as these torch operators otherwise.

Weights load from HF-format safetensors (`model.safetensors` or an index of shards) and are renamed
into that layout by `hf_to_state`; `model_from_state` builds the model from such a state dict,
float32 or quantized (see `smallmighty.engine.quantize`).
"""

from __future__ import annotations

import json
import math
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from smallmighty.cache import cache_dir, content_fingerprint
from smallmighty.engine import native as native_step
from smallmighty.engine.quantize import (
    INT4_GROUP_SIZE,
    load_state,
    quantize_state,
    quantized_linear_from_state,
    read_metadata,
    save_state,
)
from smallmighty.errors import DataError, SlmError

#: model_type values this module runs; each maps to whether q/k/v projections carry a bias.
SUPPORTED_MODEL_TYPES = {"llama": False, "mistral": False, "qwen2": True}
#: Rotary scalings this module runs, each with the config keys it reads.
ROPE_SCALING_KEYS = {
    "default": (), "linear": ("factor",),
    # Dynamic NTK only changes frequencies past the trained length, which we never exceed.
    "dynamic": (),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


@dataclass(frozen=True)
class LlamaConfig:
    """The config.json fields the decoder needs, checked once at load time."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    sliding_window: int | None

    @classmethod
    def from_file(cls, path: str | Path) -> "LlamaConfig":
        """Read and validate an HF `config.json`."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SlmError(f"{path}: missing; a model folder needs config.json") from None
        except json.JSONDecodeError as err:
            raise DataError(f"not valid JSON ({err.msg})", file=str(path), line=err.lineno) from None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config.json") -> "LlamaConfig":
        """Build from a config dict as transformers 4 or 5 writes it (`rope_scaling` or `rope_parameters`)."""
        model_type = data.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise DataError(f"model type {model_type!r} is not supported; this engine runs "
                            f"{sorted(SUPPORTED_MODEL_TYPES)}", file=source, field="model_type")
        if data.get("hidden_act", "silu") != "silu":
            raise DataError(f"activation {data['hidden_act']!r} is not supported (only silu)",
                            file=source, field="hidden_act")

        def need_int(name: str, default: int | None = None) -> int:
            value = data.get(name, default)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise DataError(f"must be a positive integer, got {value!r}", file=source, field=name)
            return value

        hidden, heads = need_int("hidden_size"), need_int("num_attention_heads")
        kv_heads = need_int("num_key_value_heads", heads)
        if heads % kv_heads:
            raise DataError(f"{heads} attention heads do not split into {kv_heads} groups",
                            file=source, field="num_key_value_heads")
        head_dim = data.get("head_dim") or hidden // heads
        if head_dim % 2:
            raise DataError(f"rotary embedding needs an even head size, got {head_dim}",
                            file=source, field="head_dim")
        rope = {}
        for name in ("rope_parameters", "rope_scaling"):
            value = data.get(name) or {}
            if not isinstance(value, dict):
                raise DataError(f"must be an object, got {value!r}", file=source, field=name)
            rope.update(value)
        theta = rope.pop("rope_theta", data.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ROPE_SCALING_KEYS:
            raise DataError(f"rope type {rope_type!r} is not supported ({', '.join(ROPE_SCALING_KEYS)} are)",
                            file=source, field="rope_scaling")
        for key in ROPE_SCALING_KEYS[rope_type]:
            value = rope.get(key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise DataError(f"{rope_type} rope scaling needs a positive number '{key}', got {value!r}",
                                file=source, field="rope_scaling")
        sliding = data.get("sliding_window") if data.get("use_sliding_window", True) else None
        return cls(
            vocab_size=need_int("vocab_size"), hidden_size=hidden,
            intermediate_size=need_int("intermediate_size"),
            num_hidden_layers=need_int("num_hidden_layers"), num_attention_heads=heads,
            num_key_value_heads=kv_heads, head_dim=head_dim,
            rms_norm_eps=float(data.get("rms_norm_eps", 1e-6)), rope_theta=float(theta),
            rope_scaling=None if rope_type == "default" else {**rope, "rope_type": rope_type},
            max_position_embeddings=need_int("max_position_embeddings", 2048),
            tie_word_embeddings=bool(data.get("tie_word_embeddings", False)),
            attention_bias=bool(data.get("attention_bias", SUPPORTED_MODEL_TYPES[model_type])),
            mlp_bias=bool(data.get("mlp_bias", False)),
            sliding_window=sliding if isinstance(sliding, int) else None,
        )

    @property
    def context_limit(self) -> int:
        """Longest sequence the model handles exactly: its trained positions, or its attention window."""
        if self.sliding_window is not None:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings


def rope_inverse_frequencies(config: LlamaConfig) -> torch.Tensor:
    """Per-pair rotation speeds, computed in float32 exactly as transformers does so outputs match."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    kind = scaling["rope_type"]
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "dynamic":  # see ROPE_SCALING_KEYS
        return inv_freq
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        return torch.where(medium, smoothed, scaled)
    raise SlmError(f"rope scaling {kind!r} is not supported ({', '.join(ROPE_SCALING_KEYS)} are)")


def rope_table(config: LlamaConfig, length: int) -> torch.Tensor:
    """Complex rotations e^(i * pos * freq) for positions [0, length): shape [length, head_dim // 2]."""
    inv_freq = rope_inverse_frequencies(config)
    angles = torch.arange(length, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return torch.polar(torch.ones_like(angles), angles)


def additive_mask(allowed: torch.Tensor) -> torch.Tensor:
    """0 where attention is allowed, -inf where not: the float mask the attention adds to scores."""
    return torch.zeros(allowed.shape).masked_fill_(~allowed, -math.inf)


def causal_mask(start: int, length: int) -> torch.Tensor:
    """[1, 1, length, start + length] mask: query i (at slot start + i) sees slots <= start + i."""
    slots = torch.arange(start + length)
    return additive_mask(slots[None, :] <= start + torch.arange(length)[:, None])[None, None]


def _pair_rotary_rows(weight: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """Reorder each head's rows from HF's [x0..x(d/2-1), y0..] halves to interleaved (x0, y0, x1, y1...)."""
    shape = weight.shape
    w = weight.reshape(heads, 2, head_dim // 2, *shape[1:])
    return w.transpose(1, 2).reshape(shape)


_ONEDNN = torch.backends.mkldnn.is_available()


class DenseLinear(nn.Module):
    """A float32 Linear layer, its weight stored for whichever code decodes with it.

    With the native decode step (`engine.native`) the weight stays plain [out, in]: the C step
    reads it at memory speed and prompts go through `F.linear` (MKL). Without it, the weight is
    stored blocked for oneDNN's matmul, which streams it at ~22 GB/s with both cores of a quiet
    2-core AVX-512 CPU for 1 row or 8, where MKL's matrix-vector path stays on one core
    (~16 GB/s) and nn.Linear's [out, in] layout reaches ~12 GB/s.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                 blocked: bool = False) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        weight = weight.float().contiguous()
        self.blocked = blocked and _ONEDNN
        if self.blocked:
            # The second argument is the batch size oneDNN tunes the blocking for.
            self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(weight, 8))
        else:
            self.register_buffer("weight", weight)
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)

    def native_weights(self) -> tuple[str, tuple[torch.Tensor, ...]] | None:
        """The kind and tensors the native decode step reads (None when blocked for oneDNN)."""
        return None if self.blocked else ("f32", (self.weight,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out]."""
        if self.blocked:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


class DecoderLayer:
    """One transformer block: attention with a KV cache, then a SwiGLU MLP, each with a residual.

    A plain class rather than an nn.Module: nothing here trains, and attribute lookups on a Module's
    registered children cost about 1 us each, ten times per layer per token.
    """

    def __init__(self, config: LlamaConfig, qkv: nn.Module, o: nn.Module, gate_up: nn.Module,
                 down: nn.Module, attn_norm: torch.Tensor, mlp_norm: torch.Tensor) -> None:
        self.qkv, self.o, self.gate_up, self.down = qkv, o, gate_up, down
        self.attn_norm, self.mlp_norm = attn_norm, mlp_norm
        self.eps = config.rms_norm_eps
        self.heads, self.kv_heads, self.head_dim = (config.num_attention_heads,
                                                    config.num_key_value_heads, config.head_dim)
        self.inter = config.intermediate_size
        self.norm_shape = (config.hidden_size,)
        self.rope_pairs = (self.heads + self.kv_heads, self.head_dim // 2, 2)

    def forward(self, h: torch.Tensor, batch: int, kv_cache: torch.Tensor, start: int,
                rope: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Update the residual stream `h` [batch * T, hidden] (rows batch-major) in place, return it.

        `kv_cache` is this layer's [batch, 2 * kv_heads, S, head_dim] buffer; positions
        [start, start + T) are written. `rope` is [batch or 1, T, 1, head_dim // 2] complex; `mask` is
        an additive float mask [batch, 1, T, start + T] (0 = may attend, -inf = may not) or None for
        plain causal attention. Queries arrive pre-scaled by 1/sqrt(head_dim) (see `hf_to_state`).
        """
        b, t = batch, h.shape[0] // batch
        q, kv = self._attention_inputs(h, b, rope)
        kv_cache[:, :, start:start + t] = kv
        # One query (decoding) sees the whole cache; several (a prompt from slot 0) are causal.
        return self._attend_and_mlp(h, q, kv_cache[:, :, : start + t], mask,
                                    causal=mask is None and t > 1)

    def decode(self, h: torch.Tensor, kv_cache: torch.Tensor, rows: torch.Tensor,
               slots: torch.Tensor, rope: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One new token per sequence, each at its own cache row and slot (see `LlamaModel.decode`).

        `h` [B, hidden]; row b's key and value go to `kv_cache[rows[b], :, slots[b]]`; `mask`
        [B, 1, 1, L] covers slots [0, L) of those rows.
        """
        q, kv = self._attention_inputs(h, h.shape[0], rope)
        kv_cache[rows, :, slots] = kv[:, :, 0]
        return self._attend_and_mlp(h, q, kv_cache[rows, :, : mask.shape[-1]], mask, causal=False)

    def prefill(self, h: torch.Tensor, kv_cache: torch.Tensor, spans: list[tuple[int, int, int, int]],
                rope: torch.Tensor) -> torch.Tensor:
        """Prompt chunks of several sequences packed in the rows of `h` [N, hidden] (see
        `LlamaModel.prefill`): each span (row, start, lo, hi) writes rows [lo, hi) of the pass at
        slots [start, start + hi - lo) of cache row `row` and attends to that row's slots up to
        each query's own, in an attention call of its own. Rows outside every span are padding."""
        q, kv = self._attention_inputs(h, 1, rope)
        attn = h.new_zeros(h.shape[0], self.heads * self.head_dim)
        for row, start, lo, hi in spans:
            t = hi - lo
            kv_cache[row, :, start:start + t] = kv[0, :, lo:hi]
            mask = causal_mask(start, t) if start > 0 and t > 1 else None
            attn[lo:hi] = self._attention(q[:, :, lo:hi], kv_cache[row:row + 1, :, : start + t], mask,
                                          causal=start == 0 and t > 1)
        return self._output_and_mlp(h, attn)

    def _attention_inputs(self, h: torch.Tensor, b: int, rope: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries [b, heads, T, d] and new keys + values [b, 2 * kv_heads, T, d], rotated."""
        t = h.shape[0] // b
        hq, hk, d = self.heads, self.kv_heads, self.head_dim
        # Linear layers take float32 and convert as their kernel needs; quantized ones may return
        # bfloat16, in which case the MLP stays in it between them, while the residual stream,
        # attention and rotary embedding stay float32.
        qkv = self.qkv(F.rms_norm(h, self.norm_shape, self.attn_norm, self.eps)).float()
        torch.view_as_complex(qkv[:, : (hq + hk) * d].view(b, t, *self.rope_pairs)).mul_(rope)
        q = qkv[:, : hq * d].view(b, t, hq, d).transpose(1, 2)
        return q, qkv[:, hq * d:].view(b, t, 2 * hk, d).transpose(1, 2)

    def _attend_and_mlp(self, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor,
                        mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
        """Attention of `q` over cached keys and values `kv` [b, 2 * kv_heads, L, d], then the MLP."""
        return self._output_and_mlp(h, self._attention(q, kv, mask, causal))

    def _attention(self, q: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor | None,
                   causal: bool) -> torch.Tensor:
        """Attention of `q` [b, heads, T, d] over `kv` [b, 2 * kv_heads, L, d]: [b * T, heads * d]."""
        hk = self.kv_heads
        b, hq, t, d = q.shape
        attn = F.scaled_dot_product_attention(q, kv[:, :hk], kv[:, hk:], attn_mask=mask,
                                              is_causal=causal, scale=1.0, enable_gqa=hq != hk)
        return attn.transpose(1, 2).reshape(b * t, hq * d)

    def _output_and_mlp(self, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Add the attention output `attn` [rows, heads * d] and then the MLP to `h`, in place."""
        h += self.o(attn)
        gate_up = self.gate_up(F.rms_norm(h, self.norm_shape, self.mlp_norm, self.eps))
        h += self.down(F.silu(gate_up[:, : self.inter]).mul_(gate_up[:, self.inter:]))
        return h


@dataclass(frozen=True)
class PromptChunk:
    """Prompt tokens of one sequence for `LlamaModel.prefill`: `ids` go to slots
    [start, start + len(ids)) of cache row `row`, whose slots [0, start) already hold the
    sequence's earlier tokens."""

    ids: list[int]
    row: int
    start: int


class LlamaModel:
    """The whole decoder: token embedding, layers, final norm and the vocabulary projection.

    Inference only (call it under `torch.inference_mode()`); a plain class like `DecoderLayer`.
    """

    def __init__(self, config: LlamaConfig, embed: torch.Tensor | None, layers: list[DecoderLayer],
                 norm: torch.Tensor, lm_head: nn.Module) -> None:
        self.config = config
        # With tied, quantized embeddings the lookup reads the lm_head's codes (`embed` is None).
        self.embed = embed
        self.layers = layers
        self.norm = norm
        self.lm_head = lm_head
        self._rope = torch.empty(0, config.head_dim // 2, dtype=torch.complex64)
        #: The native decode step over these weights, when built (see `use_native`).
        self.native: Any = None

    def use_native(self, lib: Any) -> bool:
        """Decode through the C step of `lib` (`native.library()`) when it reads every layer."""
        self.native = native_step.NativeDecoder(self, lib) if native_step.supports(self) else None
        return self.native is not None

    def linears(self) -> list[nn.Module]:
        """Every weight matrix the decoder multiplies by (fp32 or quantized), lm_head last."""
        return [m for layer in self.layers for m in (layer.qkv, layer.o, layer.gate_up, layer.down)] + [self.lm_head]

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of the embedding table for `ids`, as fresh float32 (the residual stream is updated in place)."""
        if self.embed is not None:
            return self.embed[ids]
        return self.lm_head.weight_rows(ids)

    def rope(self, length: int) -> torch.Tensor:
        """The rotation table covering positions [0, length), grown on demand and kept."""
        if self._rope.shape[0] < length:
            self._rope = rope_table(self.config, max(length, 2 * self._rope.shape[0]))
        return self._rope

    def new_cache(self, batch: int, length: int) -> list[torch.Tensor]:
        """Per-layer key/value buffers for `batch` sequences of up to `length` positions."""
        c = self.config
        return [torch.empty(batch, 2 * c.num_key_value_heads, length, c.head_dim)
                for _ in range(c.num_hidden_layers)]

    def __call__(self, ids: torch.Tensor, cache: list[torch.Tensor], start: int, rope: torch.Tensor,
                 mask: torch.Tensor | None = None, last_only: bool = True) -> torch.Tensor:
        """Logits for tokens `ids` [B, T] at cache slots [start, start + T).

        Returns [B, V] logits of the last position when `last_only`, else [B, T, V].
        """
        b, t = ids.shape
        if mask is None and t > 1 and start > 0:
            mask = causal_mask(start, t)
        h = self.embed_tokens(ids.flatten())
        for layer, kv in zip(self.layers, cache):
            h = layer.forward(h, b, kv, start, rope, mask)
        h = h.view(b, t, -1)
        return self._logits(h[:, -1] if last_only else h)

    def prefill(self, chunks: list[PromptChunk], cache: list[torch.Tensor]) -> torch.Tensor:
        """Logits [len(chunks), V] at the last token of each chunk: prompt chunks of many
        sequences, each in its own cache row, run as one pass.

        Why: a server that admits several requests at once reads every weight once for all their
        prompts and calls each operator once, instead of once per request. A chunk's result must
        still not depend on what else is in the pass (a request's greedy output is the same alone
        or in a busy batch), so: each chunk gets an attention call of its own shapes; every other
        operator works row by row; and the pass is padded to `rows_floor` rows, below which a
        quantized layer would switch to a kernel that rounds differently. The quantized linear
        kernels then give each row the same result whatever the other rows are (exact integer
        sums; float32 GEMMs only agree up to rounding); `tests/engine/test_model.py` checks both. Chunks of one sequence must come
        in prompt order: a later chunk attends to the keys an earlier one writes in the same pass.
        """
        spans, ids, positions = [], [], []
        for chunk in chunks:
            if not chunk.ids:
                raise SlmError("prefill: every chunk needs at least one token")
            spans.append((chunk.row, chunk.start, len(ids), len(ids) + len(chunk.ids)))
            ids += chunk.ids
            positions += range(chunk.start, chunk.start + len(chunk.ids))
        pad = max(0, self.rows_floor() - len(ids))
        rope = self.rope(max(positions) + 1)[torch.tensor(positions + [0] * pad)][None, :, None]
        h = self.embed_tokens(torch.tensor(ids + [0] * pad))
        for layer, kv in zip(self.layers, cache):
            h = layer.prefill(h, kv, spans, rope)
        last = [hi - 1 for _, _, _, hi in spans]
        return self._logits(h[last + [0] * max(0, self.rows_floor() - len(last))])[: len(chunks)]

    def rows_floor(self) -> int:
        """Fewest rows `prefill` sends through the linear layers: quantized layers change kernel
        below their `rows_path_from` rows (see `engine.quantize`)."""
        return max(getattr(m, "rows_path_from", 1) for m in self.linears())

    def _check_decode(self, ids: torch.Tensor, cache: list[torch.Tensor], slots: torch.Tensor,
                      first: torch.Tensor, rope: torch.Tensor, rows: torch.Tensor | None) -> None:
        """Raise SlmError unless `decode`'s arguments fit each other and the caches.

        Why: the native step trusts every index it is given, and a wrong one would crash the
        process (or silently read another sequence's cache) instead of raising. Values are read
        as Python lists: for the handful of rows of a decode step that is cheaper than tensor ops.
        """
        c = self.config
        if (not isinstance(ids, torch.Tensor) or ids.dim() != 1 or not len(ids)
                or ids.dtype.is_floating_point or ids.dtype.is_complex):
            raise SlmError("decode: ids must be a 1-D integer tensor (one new token per sequence)")
        batch = ids.shape[0]
        named = {"slots": slots, "first": first} | ({} if rows is None else {"rows": rows})
        for name, value in named.items():
            if not (isinstance(value, torch.Tensor) and value.shape == (batch,)
                    and value.dtype in (torch.int64, torch.int32)):
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise SlmError(f"decode: {name} must be an int64 tensor of shape ({batch},) like ids, got {got}")
        if not isinstance(rope, torch.Tensor) or rope.shape != (batch, c.head_dim // 2) \
                or rope.dtype != torch.complex64:
            raise SlmError(f"decode: rope must be complex64 of shape ({batch}, {c.head_dim // 2}), "
                           f"got {tuple(getattr(rope, 'shape', ()))}")
        if not isinstance(cache, (list, tuple)) or len(cache) != c.num_hidden_layers:
            raise SlmError(f"decode: needs one cache per layer ({c.num_hidden_layers}), "
                           f"got {len(cache) if isinstance(cache, (list, tuple)) else type(cache).__name__}")
        shape = tuple(cache[0].shape)
        if (len(shape) != 4 or shape[1:2] + shape[3:] != (2 * c.num_key_value_heads, c.head_dim)
                or any(tuple(kv.shape) != shape or kv.dtype != torch.float32 or not kv.is_contiguous()
                       for kv in cache)):
            raise SlmError(f"decode: every cache must be a contiguous float32 [rows, "
                           f"{2 * c.num_key_value_heads}, slots, {c.head_dim}] tensor from new_cache, "
                           f"got {[tuple(kv.shape) for kv in cache[:2]]}...")
        capacity, length = shape[0], shape[2]
        row_list = list(range(batch)) if rows is None else rows.tolist()
        if len(set(row_list)) != batch or not all(0 <= r < capacity for r in row_list):
            raise SlmError(f"decode: cache rows must be {batch} distinct values in [0, {capacity}), "
                           f"got {row_list}")
        for b, (start, slot) in enumerate(zip(first.tolist(), slots.tolist())):
            if not 0 <= start <= slot < length:
                raise SlmError(f"decode: sequence {b} has first {start} and slot {slot}; "
                               f"needs 0 <= first <= slot < {length} (the cache's slots)")
        if not 0 <= int(ids.min()) <= int(ids.max()) < c.vocab_size:
            raise SlmError(f"decode: token ids must lie in [0, {c.vocab_size})")

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        h = F.rms_norm(h, (h.shape[-1],), self.norm, self.config.rms_norm_eps)
        return self.lm_head(h).float()

    def decode(self, ids: torch.Tensor, cache: list[torch.Tensor], slots: torch.Tensor,
               first: torch.Tensor, rope: torch.Tensor, rows: torch.Tensor | None = None
               ) -> torch.Tensor:
        """Logits [B, V] for one new token per sequence, each sequence at its own position.

        Sequence b writes the key and value of `ids[b]` at slot `slots[b]` of cache row `rows[b]`
        (default: row b) and attends to slots [first[b], slots[b]] of that row (left padding lies
        before `first`); `rope` [B, head_dim // 2] holds each sequence's rotation for its own
        position. The caches (`new_cache`) may hold more rows than B: a scheduler runs any subset
        of them, at any lengths, without copying. `slots`, `first` and `rows` are int64 [B].
        Runs the native step when there is one, else the same computation as torch operators.
        """
        self._check_decode(ids, cache, slots, first, rope, rows)
        if self.native is not None:
            return self.native(self.embed_tokens(ids), cache, slots, first, rope, rows)
        if rows is None:
            rows = torch.arange(ids.shape[0])
        window = torch.arange(int(slots.max()) + 1)[None, :]
        visible = (window >= first[:, None]) & (window <= slots[:, None])
        mask = additive_mask(visible)[:, None, None]
        h = self.embed_tokens(ids)
        for layer, kv in zip(self.layers, cache):
            h = layer.decode(h, kv, rows, slots, rope[:, None, None], mask)
        return self._logits(h)


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of an HF checkpoint folder: `model.safetensors` or its sharded index's."""
    single = model_dir / "model.safetensors"
    index = model_dir / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if not index.is_file():
        raise SlmError(f"{model_dir}: no model.safetensors or model.safetensors.index.json "
                       "(only safetensors weights are loaded)")
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise DataError("not a safetensors index (needs a 'weight_map' object)",
                        file=str(index), field="weight_map") from None
    files = [model_dir / name for name in names]
    for file in files:
        if not file.is_file():
            raise SlmError(f"{file}: shard listed in the index is missing")
    return files


def read_hf_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF checkpoint folder (see `weight_files`)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights: dict[str, torch.Tensor] = {}
    for file in weight_files(model_dir):
        try:
            weights.update(load_file(str(file)))
        except SafetensorError as err:
            raise SlmError(f"{file}: not a readable safetensors file ({err})") from None
    return weights


def linear_shapes(config: LlamaConfig) -> dict[str, tuple[int, int]]:
    """(out, in) of every Linear layer in the engine layout, by name (lm_head last)."""
    c = config
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    per_layer = {"qkv": (q + 2 * kv, c.hidden_size), "o": (c.hidden_size, q),
                 "gate_up": (2 * c.intermediate_size, c.hidden_size),
                 "down": (c.hidden_size, c.intermediate_size)}
    shapes = {f"layers.{i}.{n}": shape for i in range(c.num_hidden_layers) for n, shape in per_layer.items()}
    return shapes | {"lm_head": (c.vocab_size, c.hidden_size)}


def linear_names(config: LlamaConfig) -> list[str]:
    """Names of every Linear layer in the engine layout (the ones quantization applies to)."""
    return list(linear_shapes(config))


def check_shape(name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """`tensor` when it has `shape`, else an error naming the tensor and both shapes.

    Why: the native decode step trusts every size it is given; a checkpoint that disagrees with
    its config (an lm_head with more rows than `vocab_size`) would write past its buffers."""
    if tuple(tensor.shape) != tuple(shape):
        raise SlmError(f"weight '{name}' has shape {list(tensor.shape)}, but config.json implies "
                       f"{list(shape)}")
    return tensor


def hf_to_state(config: LlamaConfig, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename and fuse HF parameters (`model.layers.0.self_attn.q_proj.weight`...) into the engine layout.

    Output names: `layers.{i}.{qkv,o,gate_up,down}.{weight,bias}`, `layers.{i}.{attn,mlp}_norm`,
    `norm`, `lm_head.weight`, and `embed` only when embeddings are not tied. Consumes `weights`.
    Every tensor's shape is checked against the config.
    """
    c = config
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim

    def take(name: str, out: int, inp: int | None = None) -> torch.Tensor:
        """The weight `name`: [out, inp] (a bias or norm when `inp` is None, or when `name` is a bias)."""
        shape = (out,) if inp is None or name.endswith(".bias") else (out, inp)
        for key in (name, name.removeprefix("model.")):
            if key in weights:
                return check_shape(name, weights.pop(key), shape).float()
        raise SlmError(f"checkpoint lacks weight '{name}'")

    def has(name: str) -> bool:
        return name in weights or name.removeprefix("model.") in weights

    def rotary(name: str, heads: int) -> torch.Tensor:
        return _pair_rotary_rows(take(name, heads * c.head_dim, c.hidden_size), heads, c.head_dim)

    # Attention scores need q.k / sqrt(head_dim): scale q's rows once here instead of every step
    # (exact for power-of-two head sizes).
    q_scale = c.head_dim ** -0.5

    state: dict[str, torch.Tensor] = {}
    for i in range(c.num_hidden_layers):
        p, s = f"model.layers.{i}.", f"layers.{i}."
        for kind in ("weight", "bias") if c.attention_bias else ("weight",):
            state[s + f"qkv.{kind}"] = torch.cat([
                rotary(p + f"self_attn.q_proj.{kind}", c.num_attention_heads) * q_scale,
                rotary(p + f"self_attn.k_proj.{kind}", c.num_key_value_heads),
                take(p + f"self_attn.v_proj.{kind}", kv, c.hidden_size)])
        for kind in ("weight", "bias") if c.mlp_bias else ("weight",):
            state[s + f"gate_up.{kind}"] = torch.cat([
                take(p + f"mlp.gate_proj.{kind}", c.intermediate_size, c.hidden_size),
                take(p + f"mlp.up_proj.{kind}", c.intermediate_size, c.hidden_size)])
            state[s + f"down.{kind}"] = take(p + f"mlp.down_proj.{kind}", c.hidden_size,
                                             c.intermediate_size)
        state[s + "o.weight"] = take(p + "self_attn.o_proj.weight", c.hidden_size, q)
        if has(p + "self_attn.o_proj.bias"):
            state[s + "o.bias"] = take(p + "self_attn.o_proj.bias", c.hidden_size)
        state[s + "attn_norm"] = take(p + "input_layernorm.weight", c.hidden_size)
        state[s + "mlp_norm"] = take(p + "post_attention_layernorm.weight", c.hidden_size)
    embed = take("model.embed_tokens.weight", c.vocab_size, c.hidden_size)
    if c.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
        state["lm_head.weight"] = embed
    else:
        state["lm_head.weight"] = take("lm_head.weight", c.vocab_size, c.hidden_size)
        state["embed"] = embed
    state["norm"] = take("model.norm.weight", c.hidden_size)
    leftover = [k for k in weights if "rotary_emb" not in k]
    if leftover:
        raise SlmError(f"checkpoint has weights this Llama model does not use: {leftover[:5]}")
    return state


def model_from_state(config: LlamaConfig, state: dict[str, torch.Tensor], *,
                     native: bool = True) -> LlamaModel:
    """Assemble a `LlamaModel` from an engine-layout state dict, float32 or quantized.

    Consumes `state` (entries are popped as they are used) so float32 weights are not held twice.
    With `native` (and a C compiler, see `engine.native`) decoding runs the C step.
    """
    lib = native_step.library() if native else None
    shapes = linear_shapes(config)

    def linear_from_state(name: str) -> nn.Module:
        out, inp = shapes[name]
        if f"{name}.weight" in state:
            weight = check_shape(f"{name}.weight", state.pop(f"{name}.weight"), (out, inp))
            bias = state.pop(f"{name}.bias", None)
            if bias is not None:
                check_shape(f"{name}.bias", bias, (out,))
            return DenseLinear(weight, bias, blocked=lib is None)
        return quantized_linear_from_state(state, name, (out, inp))

    def get(name: str, *shape: int) -> torch.Tensor:
        if name not in state:
            raise SlmError(f"weights for '{name}' are missing")
        return check_shape(name, state.pop(name), shape).float()

    def layer(i: int) -> DecoderLayer:
        return DecoderLayer(config, *(linear_from_state(f"layers.{i}.{n}")
                                      for n in ("qkv", "o", "gate_up", "down")),
                            attn_norm=get(f"layers.{i}.attn_norm", config.hidden_size),
                            mlp_norm=get(f"layers.{i}.mlp_norm", config.hidden_size))

    embed = get("embed", config.vocab_size, config.hidden_size) if "embed" in state else None
    if embed is None and "lm_head.weight" in state:
        # Tied float32 (a plain lm_head shares it).
        embed = check_shape("lm_head.weight", state["lm_head.weight"],
                            (config.vocab_size, config.hidden_size)).float()
    # Building a layer can mean reordering its weights (torch's int4 tiles; oneDNN's blocked
    # float32 layout when there is no native step), one core per weight: a thread per core.
    with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
        lm_head = pool.submit(linear_from_state, "lm_head")
        layers = list(pool.map(layer, range(config.num_hidden_layers)))
        model = LlamaModel(config, embed, layers, get("norm", config.hidden_size), lm_head.result())
    if lib is not None:
        model.use_native(lib)
    return model


#: Bump when the engine's weight layout changes, so stale quantized caches are rebuilt.
CACHE_FORMAT = "smallmighty-llama-5"


def quantization_plan(config: LlamaConfig, precision: str) -> dict[str, str]:
    """Precision per Linear layer. With int4 the vocabulary projection (also the tied embedding)
    stays int8: it is the most sensitive layer, and on SmolLM2-135M int4 there cost +5%
    wikitext-2 perplexity, against +0.1% for the whole model at int8. Layers whose input does not
    split into int4 groups stay int8 too."""
    plan = {name: precision for name in linear_names(config)}
    if precision == "int4":
        inputs = {"qkv": config.hidden_size, "gate_up": config.hidden_size,
                  "o": config.num_attention_heads * config.head_dim,
                  "down": config.intermediate_size}
        for name in plan:
            kind = name.rsplit(".", 1)[-1]
            if kind == "lm_head" or inputs[kind] % INT4_GROUP_SIZE:
                plan[name] = "int8"
    return plan


def quantized_cache_path(model_dir: Path, precision: str) -> Path:
    """Where the quantized weights of the model in `model_dir` are cached: keyed on the content of
    its config and weights, in smallmighty's cache (never in the model's own folder)."""
    key = content_fingerprint([model_dir / "config.json", *weight_files(model_dir)])
    return cache_dir("quantized") / key / f"model.{precision}.safetensors"


def load_model(model_dir: Path, config: LlamaConfig, precision: str, native: bool = True) -> LlamaModel:
    """The model at `precision`: the one path from an HF folder to a runnable `LlamaModel`.

    float32 reads the checkpoint; int8/int4 quantize it on first use and read the cached result
    afterwards (a cache that cannot be written only costs the quantization next time).
    `native=False` decodes with torch operators even where the native step builds.
    """
    if precision == "fp32":
        return model_from_state(config, hf_to_state(config, read_hf_weights(model_dir)), native=native)
    from safetensors import SafetensorError

    path = quantized_cache_path(model_dir, precision)
    expected = {"format": CACHE_FORMAT, "precision": precision}
    try:
        # A cache entry that is stale or unreadable (a disk error, a killed writer on a file
        # system without atomic renames) is made again.
        if path.is_file() and read_metadata(path) == expected:
            state, _ = load_state(path)
            return model_from_state(config, state, native=native)
    except SafetensorError:
        pass
    state = quantize_state(hf_to_state(config, read_hf_weights(model_dir)),
                           quantization_plan(config, precision))
    try:
        save_state(path, state, expected)
    except OSError as err:
        print(f"warning: could not cache the {precision} weights at {path} ({err.strerror})", file=sys.stderr)
    return model_from_state(config, state, native=native)
