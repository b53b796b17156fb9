"""The native (C) decode step against the same step in torch operators, on odd shapes and batches."""

from __future__ import annotations

import os
import platform
import shutil

import pytest
import torch

from smallmighty.engine import native
from smallmighty.engine.model import LlamaConfig, linear_names, model_from_state
from smallmighty.engine.quantize import dequantize_int4, dequantize_int8, quantize_state

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CC") or "cc") is None,
                                reason="no C compiler: the engine runs torch operators instead")

#: Widths that are not multiples of the kernels' vector sizes (tails), 5 query heads of size 8
#: sharing one key/value head, biases everywhere, and a wide config the int4 groups fit.
ODD = dict(hidden_size=40, intermediate_size=72, num_attention_heads=5, num_key_value_heads=1,
           attention_bias=True, mlp_bias=True)
WIDE = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)
#: A feed-forward width past the int8 kernel's 4096-input integer chunk, with a tail of 8 inputs.
LONG = dict(WIDE, intermediate_size=4136)


def _config(**fields) -> LlamaConfig:
    return LlamaConfig.from_dict({"model_type": "llama", "vocab_size": 101, "num_hidden_layers": 2,
                                  "max_position_embeddings": 64, "tie_word_embeddings": True,
                                  **fields})


def _state(config: LlamaConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in the engine layout (what `hf_to_state` produces)."""
    g = torch.Generator().manual_seed(seed)
    c = config
    d, q, kv = c.hidden_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim

    def w(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.2

    state = {"lm_head.weight": w(c.vocab_size, d), "norm": 1 + w(d) * 0.1}
    for i in range(c.num_hidden_layers):
        p = f"layers.{i}."
        state |= {p + "qkv.weight": w(q + 2 * kv, d), p + "o.weight": w(d, q),
                  p + "gate_up.weight": w(2 * c.intermediate_size, d),
                  p + "down.weight": w(d, c.intermediate_size),
                  p + "attn_norm": 1 + w(d) * 0.1, p + "mlp_norm": 1 + w(d) * 0.1}
        if c.attention_bias:
            state[p + "qkv.bias"] = w(q + 2 * kv)
        if c.mlp_bias:
            state[p + "gate_up.bias"] = w(2 * c.intermediate_size)
            state[p + "down.bias"] = w(d)
    return state


def _state_at(config: LlamaConfig, precision: str) -> dict[str, torch.Tensor]:
    """Random weights at `precision` (fp32, int8 or int4 for every linear layer)."""
    state = _state(config)
    if precision == "fp32":
        return state
    return quantize_state(state, {name: precision for name in linear_names(config)})


def _dequantized(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The float32 weights a quantized state stands for: the reference its kernels must match."""
    out = {}
    for key, value in state.items():
        name, _, part = key.rpartition(".")
        if part == "qweight":
            out[f"{name}.weight"] = dequantize_int8(value, state[f"{name}.scale"])
        elif part == "packed":
            out[f"{name}.weight"] = dequantize_int4(value, state[f"{name}.scale"], state[f"{name}.zero"])
        elif part not in ("scale", "zero"):
            out[key] = value
    return out


def _decode_steps(model, batch: int, first: list[int], steps: int = 4) -> list[torch.Tensor]:
    """Logits of `steps` decode steps after a cache filled with random keys and values."""
    g = torch.Generator().manual_seed(7)
    slots = 12
    cache = model.new_cache(batch, slots)
    for layer in cache:
        layer.copy_(torch.randn(layer.shape, generator=g))
    rope = model.rope(slots)
    firsts = torch.tensor(first)
    out = []
    with torch.inference_mode():
        for step in range(steps):
            slot = 6 + step
            ids = torch.randint(0, model.config.vocab_size, (batch,), generator=g)
            slots = torch.full((batch,), slot)
            out.append(model.decode(ids, cache, slots, firsts, rope[slot - firsts]).clone())
    return out


@pytest.mark.parametrize("shape,precision,tolerance", [
    (ODD, "fp32", 1e-5), (WIDE, "fp32", 1e-5),
    # int8 activations become 16-bit integer codes against each row's largest value.
    (ODD, "int8", 1e-3), (WIDE, "int8", 1e-3), (LONG, "int8", 1e-3),
    (WIDE, "int4", 1e-5),
])
def test_native_step_matches_torch_on_the_weights_it_stands_for(shape, precision, tolerance):
    assert native.library() is not None, "a C compiler is on PATH, so the native step must build"
    config = _config(**shape)
    state = _state_at(config, precision)
    reference = model_from_state(config, _dequantized(state), native=False)
    model = model_from_state(config, dict(state))
    assert model.native is not None and reference.native is None
    _assert_same_steps(model, reference, tolerance)


def _assert_same_steps(model, reference, tolerance: float) -> None:
    first = [0, 3, 1]  # rows 2 and 3 start after some left padding
    for got, want in zip(_decode_steps(model, 3, first), _decode_steps(reference, 3, first)):
        scale = want.abs().max()
        torch.testing.assert_close(got / scale, want / scale, atol=tolerance, rtol=0)


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86 levels only")
@pytest.mark.parametrize("arch", ["x86-64-v3", "x86-64"])
def test_older_x86_levels_compute_the_same_step(tmp_path, arch):
    # AVX2 + FMA (hand-written widenings, int8 through float), and SSE2 (the plain vector code):
    # the kernels other CPUs get, checked here on the same weights.
    lib = native.load(native.build(tmp_path, arch=arch))
    for shape, precision in ((ODD, "fp32"), (ODD, "int8"), (WIDE, "int4")):
        config = _config(**shape)
        state = _state_at(config, precision)
        reference = model_from_state(config, _dequantized(state), native=False)
        model = model_from_state(config, dict(state))
        assert model.use_native(lib)
        _assert_same_steps(model, reference, 1e-5)


@pytest.mark.parametrize("precision", ["fp32", "int8", "int4"])
def test_rows_of_a_batch_do_not_depend_on_each_other(precision):
    # 11 rows: one pass of 8 and one of 3, taking other kernels than a single row does.
    config = _config(**WIDE)
    model = model_from_state(config, _state_at(config, precision))
    assert model.native is not None
    g = torch.Generator().manual_seed(3)
    slots, slot = 10, 6
    cache = model.new_cache(11, slots)
    for layer in cache:
        layer.copy_(torch.randn(layer.shape, generator=g))
    ids = torch.randint(0, config.vocab_size, (11,), generator=g)
    first = torch.arange(11) % 4
    rope = model.rope(slots)
    with torch.inference_mode():
        slots = torch.full((11,), slot)
        batched = model.decode(ids, [c.clone() for c in cache], slots, first, rope[slot - first])
        for row in (0, 5, 9, 10):
            alone = model.decode(ids[row:row + 1], [c[row:row + 1].clone() for c in cache],
                                 slots[row:row + 1], first[row:row + 1], rope[slot - first[row:row + 1]])
            torch.testing.assert_close(batched[row:row + 1], alone, atol=1e-5, rtol=1e-5)


def test_kernel_is_compiled_once_per_cache_and_missing_compilers_fall_back(tmp_path, monkeypatch, capsys):
    path = native.build(tmp_path)
    assert "Compiling the native decode step" in capsys.readouterr().err
    stamp = path.stat().st_mtime_ns
    assert native.build(tmp_path) == path and path.stat().st_mtime_ns == stamp
    assert capsys.readouterr().err == ""
    with pytest.raises(OSError, match="no-such-cc"):
        native.build(tmp_path / "other", compiler="no-such-cc")

    monkeypatch.setattr(native, "_LIBRARY", None)
    monkeypatch.setenv("CC", "no-such-cc")
    assert native.library() is None
    assert "using torch operators" in capsys.readouterr().err
    monkeypatch.setattr(native, "_LIBRARY", None)
    monkeypatch.delenv("CC")
    monkeypatch.setenv("SLM_NATIVE", "0")
    assert native.library() is None
    config = _config(**WIDE)
    assert model_from_state(config, _state(config)).native is None


@pytest.mark.parametrize("precision", ["fp32", "int8", "int4"])
def test_weights_move_to_one_region_and_every_alias_follows(precision):
    # A module's second name for its weight (int8's kernel view, the tied float32 embedding)
    # left pointing at the old memory would keep that memory alive: RSS counted twice.
    config = _config(**WIDE)
    model = model_from_state(config, _state_at(config, precision))
    weights = [m.native_weights()[1][0] for m in model.linears()]
    region = weights[0].untyped_storage().data_ptr()
    assert all(w.untyped_storage().data_ptr() == region for w in weights)
    for module in model.linears():
        if precision == "int8":
            assert module._kernel_weight.data_ptr() == module.qweight.data_ptr()
    if precision == "fp32":
        assert model.embed.data_ptr() == model.lm_head.weight.data_ptr()
