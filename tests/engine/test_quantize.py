"""int8 / int4 weight-only quantization: error bounds, kernels against dequantized matmul, files."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from smallmighty.engine import quantize as q
from smallmighty.errors import SlmError


def _weight(n: int = 48, k: int = 128) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(0)) * 0.05


def test_int8_round_trip_error_is_at_most_half_a_step_per_row():
    w = _weight()
    codes, scale = q.quantize_int8(w)
    assert codes.dtype == torch.int8 and scale.shape == (48,)
    error = (q.dequantize_int8(codes, scale) - w).abs()
    assert (error <= scale[:, None] / 2 + 1e-7).all()
    # Scales are bfloat16 values (what the kernel reads), and each row uses the full code range.
    assert torch.equal(scale, scale.bfloat16().float())
    assert (codes.abs().amax(dim=1) >= 126).all()


@pytest.mark.parametrize("group", [32, 64])
def test_int4_round_trip_error_is_at_most_half_a_step_per_group(group):
    w = _weight()
    packed, scale, low = q.quantize_int4(w, group)
    assert packed.shape == (48, 64) and packed.dtype == torch.uint8 and scale.shape == (48, 128 // group)
    assert scale.dtype == low.dtype == torch.float16  # llama.cpp's Q4_1 parameters
    back = q.dequantize_int4(packed, scale, low)
    # Half a step, plus the float16 rounding of the low point and of the scale (times 15 steps).
    slack = (scale.float() * (0.5 + 15 * 2**-11) + low.float().abs() * 2**-11).repeat_interleave(group, dim=1)
    assert ((back - w).abs() <= slack + 1e-7).all()
    codes = q.unpack_int4(packed).reshape(48, -1, group)
    assert (codes.amin(dim=2) <= 1).all() and (codes.amax(dim=2) >= 14).all()  # full range used


def test_int4_packing_puts_the_even_input_in_the_low_nibble():
    codes = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    assert packed.tolist() == [[0x21, 0x0F]]
    assert q.unpack_int4(packed).tolist() == codes.tolist()


def test_int4_needs_inputs_divisible_by_the_group():
    with pytest.raises(SlmError, match="multiple of 32"):  # what the kernels read at a time
        q.quantize_int4(_weight(), 48)
    with pytest.raises(SlmError, match="divisible"):
        q.quantize_int4(_weight(), 96)
    with pytest.raises(SlmError, match="divisible"):
        q.quantize_int4(_weight(8, 100))


def _layer(kind: str, w: torch.Tensor, bias: torch.Tensor | None = None) -> q.QuantizedLinear:
    state = q.quantize_state({"lin.weight": w} | ({} if bias is None else {"lin.bias": bias}),
                             {"lin": kind})
    layer = q.quantized_linear_from_state(state, "lin")
    layer.enable_rows_path()
    return layer


def _batched(layer: q.QuantizedLinear, rows: int) -> bool:
    """Whether `rows` rows take the batched path (`int8_rows_matmul`)."""
    return q.ONEDNN_INT8 and rows >= layer.rows_path_from


def _weight_used(layer: q.QuantizedLinear, rows: int) -> torch.Tensor:
    """What the layer multiplies by: its dequantized weight, except that an int4 layer's batched
    path uses its int8 requantized copy, and torch's int4 kernel (scale, zero = low + 8 * scale)
    pairs rounded to bfloat16."""
    w = layer.dequantize()
    if isinstance(layer, q.Int4Linear):
        if _batched(layer, rows):
            return q.dequantize_int8(*q.quantize_int8(w))
        scale = layer.scale.float()
        zero = (layer.low.float() + 8 * scale).bfloat16().float()
        codes = q.unpack_int4(layer.packed).float().unflatten(-1, (scale.shape[1], -1))
        return ((codes - 8) * scale.bfloat16().float()[..., None] + zero[..., None]).flatten(-2)
    return w


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("shape", [(1, 128), (3, 128), (2, 10, 128)])
def test_quantized_linear_matches_matmul_with_its_dequantized_weight(kind, shape):
    # 40 output features: not a multiple of 16, which torch's int4 kernel needs padded.
    w, bias = _weight(40, 128), torch.randn(40) * 0.1
    layer = _layer(kind, w, bias)
    assert isinstance(layer, q.Int8Linear if kind == "int8" else q.Int4Linear)
    # Outlier columns, as real activations have: they are what plain 8-bit activations get wrong.
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    x[..., :4] *= 30
    rows = x.numel() // 128
    got = layer(x)
    assert got.shape == (*shape[:-1], 40) and got.dtype == torch.float32  # float32: it has a bias
    if not _batched(layer, rows):
        # torch's kernels take bfloat16 activations: exact up to that rounding.
        expected = F.linear(x.bfloat16().float(), _weight_used(layer, rows), bias)
        tolerance = 2**-8
    else:
        # Two int8 limbs per activation keep ~15 bits: much closer than bfloat16 (8 bits).
        expected = F.linear(x, _weight_used(layer, rows), bias)
        tolerance = 2**-11
    torch.testing.assert_close(got, expected, atol=tolerance * expected.abs().max().item(), rtol=0)
    # And the quantized layer stays close to the float one it came from.
    full = F.linear(x, w, bias)
    assert (got - full).abs().max() < {"int8": 0.03, "int4": 0.15}[kind] * full.abs().max()


@pytest.mark.skipif(not q.ONEDNN_INT8, reason="the batched path needs oneDNN")
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_a_row_gives_the_same_result_in_any_batch(kind):
    # Each row has its own scale and integer sums are exact, so its neighbours cannot change it.
    layer = _layer(kind, _weight(48, 128))
    x = torch.randn(40, 128, generator=torch.Generator().manual_seed(2))
    together = layer(x)
    picked = torch.randperm(40, generator=torch.Generator().manual_seed(3))[:20]
    assert _batched(layer, 20) and torch.equal(layer(x[picked]), together[picked])
    loud = torch.cat([x[:20], x[20:] * 1000])
    assert torch.equal(layer(loud)[:20], together[:20])


def test_int8_linear_handles_inputs_not_a_multiple_of_16():
    # torch's int8 kernel reads 16 inputs at a time; 100 needs padding (it crashed unpadded).
    w = _weight(24, 100)
    layer = _layer("int8", w)
    for rows in (1, 3):
        x = torch.randn(rows, 100)
        expected = x.bfloat16().float() @ layer.dequantize().t()
        torch.testing.assert_close(layer(x).float(), expected,
                                   atol=0.02 * expected.abs().max().item(), rtol=0.01)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantized_linear_output_dtype_follows_its_kernel(kind):
    layer = _layer(kind, _weight(32, 64))
    x = torch.randn(3, 64)
    one = layer(x[:1])
    assert one.dtype == torch.bfloat16 and one.shape == (1, 32)  # torch's kernel: bfloat16 out
    torch.testing.assert_close(one, layer(x[:1].bfloat16()), rtol=0, atol=0)
    for rows in (3, 16):
        several = layer(torch.randn(rows, 64))
        assert several.shape == (rows, 32)
        assert several.dtype == (torch.float32 if _batched(layer, rows) else torch.bfloat16)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_without_onednn_every_batch_takes_torchs_kernel(kind, monkeypatch):
    monkeypatch.setattr(q, "ONEDNN_INT8", False)
    layer = _layer(kind, _weight(40, 128))
    x = torch.randn(20, 128)
    got = layer(x)
    assert got.dtype == torch.bfloat16
    expected = F.linear(x.bfloat16().float(), layer.dequantize())
    torch.testing.assert_close(got.float(), expected, atol=2**-7 * expected.abs().max().item(), rtol=0)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_batched_copy_is_made_only_on_demand(kind):
    """Single-stream use never pays the int8 copy's memory; the engine asks for it for batches."""
    state = q.quantize_state({"lin.weight": _weight(40, 128)}, {"lin": kind})
    layer = q.quantized_linear_from_state(state, "lin")
    assert not hasattr(layer, "_rows_weight")
    assert layer(torch.randn(20, 128)).dtype == torch.bfloat16  # torch's kernel for any rows
    q.enable_rows_paths([layer])
    assert hasattr(layer, "_rows_weight") == q.ONEDNN_INT8


def test_weight_rows_is_an_embedding_lookup():
    w = _weight(64, 128)
    for kind in ("int8", "int4"):
        state = q.quantize_state({"emb.weight": w}, {"emb": kind})
        layer = q.quantized_linear_from_state(state, "emb")
        ids = torch.tensor([[3, 0], [63, 3]])
        rows = layer.weight_rows(ids)
        assert rows.shape == (2, 2, 128)
        torch.testing.assert_close(rows, layer.dequantize()[ids])


def test_quantize_state_follows_the_plan_and_keeps_other_tensors():
    state = {"a.weight": _weight(), "a.bias": torch.zeros(48), "b.weight": _weight(16, 64),
             "norm": torch.ones(128)}
    out = q.quantize_state(state, {"a": "int8", "b": "int4"})
    assert set(out) == {"a.qweight", "a.scale", "a.bias", "b.packed", "b.scale", "b.low", "norm"}
    assert q.quantize_state(state, {"a": "fp32"}).keys() == state.keys()
    with pytest.raises(SlmError, match="precision"):
        q.quantize_state(state, {"a": "int2"})


def test_save_and_load_round_trip_tensors_and_metadata(tmp_path):
    state = q.quantize_state({"a.weight": _weight(), "b.weight": _weight(32, 64)},
                             {"a": "int4", "b": "int4"})
    path = tmp_path / "sub" / "model.int4.safetensors"
    q.save_state(path, state, {"precision": "int4", "source": "x"})
    assert q.read_metadata(path) == {"precision": "int4", "source": "x"}
    loaded, meta = q.load_state(path)
    assert meta["precision"] == "int4" and loaded.keys() == state.keys()
    for name in state:
        assert torch.equal(loaded[name], state[name])
    assert list(tmp_path.joinpath("sub").iterdir()) == [path]  # no temporary file left behind


def test_int4_native_records_hold_every_code_and_parameter():
    # 40 rows (padded to 3 records of 16) and groups of 64 (parameters repeated per block of 32).
    packed, scale, low = q.quantize_int4(_weight(40, 128), 64)
    records = q.int4_native_records(packed, scale, low)
    assert records.shape == (3, 4, 320) and records.dtype == torch.uint8
    pieces = records[..., :256].reshape(3, 4, 4, 16, 4)  # [record row, block, piece, lane, byte]
    codes = torch.stack([pieces & 15, pieces >> 4], dim=4)  # nibble h: inputs 8 * piece + 4h + byte
    codes = codes.permute(0, 3, 1, 2, 4, 5).reshape(48, 128)

    def parameters(start: int) -> torch.Tensor:  # [record row, block, lane] float16 -> [48, 4]
        values = records[..., start:start + 32].contiguous().view(torch.float16)
        return values.permute(0, 2, 1).reshape(48, 4, 1).float()

    back = (codes.float().view(48, 4, 32) * parameters(256) + parameters(288)).view(48, 128)
    assert torch.equal(back[:40], q.dequantize_int4(packed, scale, low))
    assert not back[40:].any()


def test_int8_kernel_runs_on_weights_mapped_at_odd_addresses(tmp_path) -> None:
    # safetensors packs tensors back to back, so an int8 weight after an odd-sized one starts at an
    # odd address in the mapped file; torch's int8 kernel crashed (SIGSEGV) on such a weight.
    torch.manual_seed(0)
    weight = torch.randint(-127, 128, (48, 32), dtype=torch.int8)
    scale = torch.rand(48) + 0.5
    state = {"a.odd": torch.ones(3, dtype=torch.int8), "b.qweight": weight, "c.scale": scale}
    q.save_state(tmp_path / "w.safetensors", state, {"precision": "int8"})
    loaded, _ = q.load_state(tmp_path / "w.safetensors")
    assert loaded["b.qweight"].data_ptr() % 64  # the case this test is about
    layer = q.Int8Linear(loaded["b.qweight"], loaded["c.scale"])
    x = torch.randn(2, 32)
    expected = x.bfloat16().float() @ (weight.float() * scale[:, None]).T  # the kernel takes bfloat16
    assert (layer._kernel(x).float() - expected).abs().max() <= 1e-2 * expected.abs().max()
    assert layer._kernel_weight.data_ptr() % 64 == 0
