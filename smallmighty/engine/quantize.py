"""Weight-only quantization of Linear layers: int8 per output channel, int4 in groups along the input.

Why weight-only: CPU decoding is bound by streaming weights from memory, so storing them in 8 or 4
bits speeds every token up, while activations stay in floating point to keep accuracy.

* int8: symmetric, one scale per output row: w ~= q * scale, q in [-127, 127].
* int4: asymmetric per group of `group_size` inputs: w ~= q * scale + low, q in [0, 15], with a
  float16 scale and low per group: llama.cpp's Q4_1, so int4 weights made from a Q4_1 GGUF (such
  as the default model) are those of the file exactly.

int8 scales are bfloat16 values (stored as float32), as torch's kernel reads them, so
`dequantize_*` gives exactly the weights the decode step multiplies by.

Models are quantized as state dicts (`quantize_state`), which is also the on-disk form
(`save_state` / `load_state`, safetensors): a Linear `X` stored as `X.weight` becomes `X.qweight` +
`X.scale` (int8) or `X.packed` + `X.scale` + `X.low` (int4, two 4-bit values per byte, the even
input index in the low nibble). `quantized_linear_from_state` rebuilds the matching module.

Kernels: these modules serve the engine's prompt passes (its decoding steps run in the native C
step, `smallmighty.engine.native`, which reads the same tensors through `native_weights`;
without it they serve decoding too). They call torch's fused int8/int4 matmuls with bfloat16
activations (and int4 (scale, zero) pairs rounded to bfloat16, as torch's kernel takes them). With
many rows those kernels are compute-bound, so once a batch of several sequences asks for it
(`enable_rows_paths`) the modules switch to oneDNN's int8 x int8 matmul over a second, int8 copy
of the weights, with activations split into two int8 limbs (`int8_rows_matmul`). Both paths match
the dequantized weights to within bfloat16 rounding.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from smallmighty.errors import SlmError
from smallmighty.io import atomic_path

PRECISIONS = ("fp32", "int8", "int4")

#: Inputs per int4 group. On SmolLM2-135M (whose weights come from a Q4_1 file with blocks of 32)
#: groups of 64/128 cost +54% wikitext-2 perplexity against +5% for 32, and were not faster.
INT4_GROUP_SIZE = 32
#: int4 groups must be a multiple of this: the native step works in blocks of 32 inputs, and
#: torch's int4 kernel takes groups of 32 to 256.
INT4_GROUP_MULTIPLE = 32

def _bf16_exact(x: torch.Tensor) -> torch.Tensor:
    """x rounded to the nearest bfloat16, kept as float32: torch's int8 kernel reads scales in
    bfloat16, so choosing them there makes the stored codes mean exactly what the kernels compute."""
    return x.to(torch.bfloat16).float()


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: returns (q [N, K] int8, scale [N] float32, a bfloat16 value)."""
    w = weight.float()
    scale = _bf16_exact(w.abs().amax(dim=1).clamp(min=1e-30) / 127.0)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Float32 weights back from `quantize_int8`'s output (any leading rows selection works)."""
    return q.float() * scale.unsqueeze(-1)


def quantize_int4(weight: torch.Tensor, group_size: int = INT4_GROUP_SIZE
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric group-wise int4: returns (packed [N, K/2] uint8, scale [N, K/g], low [N, K/g]),
    scale and low in float16."""
    n, k = weight.shape
    if group_size <= 0 or group_size % INT4_GROUP_MULTIPLE:
        raise SlmError(f"int4 group size must be a multiple of {INT4_GROUP_MULTIPLE}, got {group_size}")
    if k % group_size:
        raise SlmError(f"int4 needs layer inputs divisible by its group size {group_size}, got {k}")
    w = weight.float().reshape(n, k // group_size, group_size)
    low = w.amin(dim=2).half()
    scale = ((w.amax(dim=2) - low.float()) / 15.0).half()
    if not (torch.isfinite(scale).all() and torch.isfinite(low).all()):
        raise SlmError("int4 needs weights within float16's range (|w| < 65504)")
    step = scale.float()[..., None]
    q = torch.where(step > 0, (w - low.float()[..., None]) / step, 0.0)
    q = torch.round(q).clamp_(0, 15).to(torch.uint8).reshape(n, k)
    packed = q[:, 0::2] | (q[:, 1::2] << 4)
    return packed, scale, low


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The 4-bit codes [..., K] (uint8 in [0, 15]) from their two-per-byte packing [..., K/2]."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """Float32 weights back from `quantize_int4`'s output (any leading rows selection works)."""
    q = unpack_int4(packed).float()
    group = q.shape[-1] // scale.shape[-1]
    q = q.unflatten(-1, (scale.shape[-1], group))
    return (q * scale.float().unsqueeze(-1) + low.float().unsqueeze(-1)).flatten(-2)


#: Rows and inputs in one record of the native step's int4 layout (`int4_native_records`).
NATIVE_ROWS, NATIVE_BLOCK = 16, 32


def int4_native_records(packed: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """The int4 weights laid out for the native decode step: uint8 [ceil(N / 16), K / 32, 320].

    Why this layout: the step multiplies 4-bit codes by 8-bit activation codes with the CPU's
    integer dot-product instruction, which sums 4 byte products into each of 16 int32 lanes. Here
    lane l serves output row l of a group of 16 rows, so the 4 activations of each step are the
    same for every lane (one broadcast), each lane ends a block of 32 inputs with its row's
    integer dot product, and one float multiply-add per block applies 16 rows' scales at once.

    Record (rows 16r..16r+15, inputs 32g..32g+31): 4 pieces of 64 bytes, piece j holding, for lane
    l at bytes 4l..4l+3, the codes of inputs 8j..8j+3 in the low nibbles and 8j+4..8j+7 in the high
    ones; then the 16 rows' float16 scales (32 bytes) and lows (32 bytes). Rows past N are zero.
    Groups larger than 32 repeat their scale and low over their blocks.
    """
    n, k = packed.shape[0], packed.shape[1] * 2
    groups, blocks = k // scale.shape[1], k // NATIVE_BLOCK
    codes = unpack_int4(packed)
    rows = -(-n // NATIVE_ROWS) * NATIVE_ROWS
    codes = F.pad(codes, (0, 0, 0, rows - n))
    # [record row r, lane l, block g, piece j, nibble h, i] -> [r, g, j, l, i] bytes of two nibbles.
    codes = codes.view(rows // NATIVE_ROWS, NATIVE_ROWS, blocks, 4, 2, 4)
    pieces = (codes[..., 0, :] | (codes[..., 1, :] << 4)).permute(0, 2, 3, 1, 4)
    pieces = pieces.reshape(rows // NATIVE_ROWS, blocks, 4 * NATIVE_ROWS * 4)

    def per_block(values: torch.Tensor) -> torch.Tensor:  # [N, K / group] -> bytes [R, blocks, 32]
        values = values.half().repeat_interleave(groups // NATIVE_BLOCK, dim=1)
        values = F.pad(values, (0, 0, 0, rows - n)).view(rows // NATIVE_ROWS, NATIVE_ROWS, blocks)
        return values.transpose(1, 2).contiguous().view(torch.uint8)

    return torch.cat([pieces, per_block(scale), per_block(low)], dim=2).contiguous()


#: oneDNN's int8 matmul, the batched path of the quantized layers; without it torch's kernels do all.
ONEDNN_INT8 = torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")

#: Weight of the second int8 limb of an activation row (see `int8_rows_matmul`).
_LOW_LIMB = 254.0
#: oneDNN's fast int8 kernels take unsigned activations: codes are stored offset by 128.
_OFFSET = 128
_OFFSET_T = torch.tensor(float(_OFFSET))


def pack_int8_weight(qweight: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] codes reordered into oneDNN's blocked layout, once: oneDNN would otherwise
    reorder them at every call, which triples the memory traffic of a call."""
    return torch.ops.onednn.qlinear_prepack(qweight, [16, qweight.shape[1]])


def int8_rows_matmul(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                     zeros: torch.Tensor) -> torch.Tensor:
    """float32 x [M, K] times int8 weights (`pack_int8_weight`, `scale` [N]) -> float32 [M, N].

    Why: for several rows torch's weight-only kernel is compute-bound (it widens every weight to
    float for each block of 4 rows, so 8 rows cost 3-4x one), while oneDNN multiplies int8 by
    int8 with the CPU's integer dot-product instructions and stays near memory speed: 16 rows cost
    about 1.3x two. Each row is written as two int8 limbs, x ~= (hi + lo / 254) * max|x_row| / 127,
    so it keeps ~15 bits against its largest entry: one limb (plain 8-bit activations) cost +3.6%
    wikitext-2 perplexity on SmolLM2-135M, two cost nothing measurable (bfloat16, what the
    one-row kernel takes, keeps 8 bits per entry). Integer sums are exact, so a row's result
    does not depend on the other rows of the batch.
    """
    rows = x.shape[0]
    top = x.abs().amax(dim=1, keepdim=True).clamp_(min=1e-30)
    t = torch.addcdiv(_OFFSET_T, x, top, value=127)  # 127 * x / top + 128, in [1, 255]
    # Both limbs are rounded straight into one buffer: a batch of prompts has hundreds of rows,
    # where every extra pass over the activations shows.
    limbs = x.new_empty(2 * rows, x.shape[1])
    hi = torch.round(t, out=limbs[:rows])
    lo = torch.add(_OFFSET_T, t.sub_(hi), alpha=_LOW_LIMB, out=limbs[rows:])
    lo.round_()
    y = torch.ops.onednn.qlinear_pointwise(limbs.to(torch.uint8), 1 / 127, _OFFSET, packed, scale,
                                           zeros, None, 1.0, 0, torch.float32, "none", [], "")
    return y[:rows].add_(y[rows:], alpha=1 / _LOW_LIMB).mul_(top)


class QuantizedLinear(nn.Module):
    """Shared parts: optional bias, and the choice of kernel by the number of rows.

    By default the layer runs torch's low-bit kernel. Once `enable_rows_path` has run (the engine
    calls it for its first batch of several sequences), from `rows_path_from` rows on the layer
    uses `int8_rows_matmul` over an int8 copy of the weights in oneDNN's layout: torch's kernels
    are compute-bound there, 8 rows costing 3-4x one. The copy is made only
    on demand because it takes 1 byte per weight of memory (+150 MB for SmolLM2-135M) and about
    5 ms per MB to pack (0.6 s on one core), which single-stream use (`slm generate`, `slm chat`)
    would pay for nothing.
    """

    #: Fewest rows that take `int8_rows_matmul`, from whole-model decode steps on a 2-core
    #: AVX-512 CPU (subclasses set their own).
    rows_path_from = 2

    def __init__(self, out_features: int, in_features: int, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)
        self._rows_path = False

    def _rows_codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """int8 codes [out, in] and float32 scales [out] for the batched path."""
        raise NotImplementedError

    def enable_rows_path(self) -> None:
        """Pack the int8 copy `int8_rows_matmul` needs (once; a no-op without oneDNN)."""
        if not ONEDNN_INT8 or self._rows_path:
            return
        qweight, scale = self._rows_codes()
        self.register_buffer("_rows_weight", pack_int8_weight(qweight), persistent=False)
        self.register_buffer("_rows_scale", scale.float().contiguous(), persistent=False)
        self.register_buffer("_rows_zeros", torch.zeros(self.out_features, dtype=torch.int64),
                             persistent=False)
        self._rows_path = True

    def dequantize(self) -> torch.Tensor:
        """The float32 [out, in] weight these codes stand for."""
        return self.weight_rows(slice(None))

    def weight_rows(self, rows: torch.Tensor | slice) -> torch.Tensor:
        """Float32 rows of the [out, in] weight: an embedding lookup when embeddings are tied."""
        raise NotImplementedError

    def native_weights(self) -> tuple[str, tuple[torch.Tensor, ...]] | None:
        """The kind and tensors the native decode step reads (`smallmighty.engine.native`)."""
        raise NotImplementedError

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        """torch's low-bit kernel: [rows, in] (any float type) -> bfloat16 [rows, out], no bias."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] (any float type) -> [..., out]: bfloat16 from torch's kernels, which take
        bfloat16 activations (their fast CPU path; float32 ones take a scalar loop 15-30x
        slower), float32 from `int8_rows_matmul` and whenever there is a bias (added in float32)."""
        rows = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        if self._rows_path and rows.shape[0] >= self.rows_path_from:
            y = int8_rows_matmul(rows.float(), self._rows_weight, self._rows_scale, self._rows_zeros)
        else:
            y = self._kernel(rows)
        if self.bias is not None:
            y = torch.add(self.bias, y)
        return y if x.dim() == 2 else y.view(*x.shape[:-1], self.out_features)


class Int8Linear(QuantizedLinear):
    """Linear layer holding int8 weights with one scale per output row."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor,
                 bias: torch.Tensor | None = None) -> None:
        super().__init__(qweight.shape[0], qweight.shape[1], bias)
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("scale", scale.float().contiguous())
        self.register_buffer("_kernel_scale", self.scale.to(torch.bfloat16), persistent=False)
        # torch's kernel reads inputs 16 at a time (and crashes otherwise): pad odd sizes with zeros.
        self._pad = -self.in_features % 16
        padded = F.pad(self.qweight, (0, self._pad)) if self._pad else self.qweight
        self.register_buffer("_kernel_weight", padded, persistent=False)

    def _rows_codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.qweight, self.scale

    def weight_rows(self, rows: torch.Tensor | slice) -> torch.Tensor:
        return dequantize_int8(self.qweight[rows], self.scale[rows])

    def native_weights(self) -> tuple[str, tuple[torch.Tensor, ...]]:
        return "int8", (self.qweight, self.scale)

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernel_weight.data_ptr() % 64:
            # torch's kernel crashes (SIGSEGV) on a weight not 64-byte aligned, as the ones mapped
            # from a safetensors file often are. Copied once, on first use, so that engines whose
            # native step re-homes the weights (aligned) never hold a second copy.
            self._kernel_weight = self._kernel_weight.clone()
        x = x.to(torch.bfloat16)
        if self._pad:
            x = F.pad(x, (0, self._pad))
        return torch._weight_int8pack_mm(x, self._kernel_weight, self._kernel_scale)


class Int4Linear(QuantizedLinear):
    """Linear layer holding 4-bit weights with a float16 scale and low per group of inputs.

    Its batched path multiplies by these weights requantized to int8 per row (error at most half
    an int8 step, far below int4's own); that copy costs 1 byte per weight of memory. torch's int4
    kernel stays ahead of it up to 12-15 rows (SmolLM2-135M, batch 8: 36.5 against 39.9 ms per
    step), so the int8 copy serves prompts and larger batches. The native decode step reads its
    own copy of the codes (`int4_native_records`), made at load.
    """

    rows_path_from = 16

    def __init__(self, packed: torch.Tensor, scale: torch.Tensor, low: torch.Tensor,
                 bias: torch.Tensor | None = None) -> None:
        super().__init__(packed.shape[0], packed.shape[1] * 2, bias)
        self.group_size = self.in_features // scale.shape[1]
        self.register_buffer("packed", packed.contiguous())
        self.register_buffer("scale", scale.half().contiguous())
        self.register_buffer("low", low.half().contiguous())
        # torch's kernel wants its own tiled layout, [groups, N, (scale, zero)] bfloat16 parameters
        # with w = (q - 8) * scale + zero, and N a multiple of 16: pad with zero rows and drop their
        # outputs.
        pad = -self.out_features % 16
        self._padded = pad > 0
        codes = F.pad(unpack_int4(self.packed).to(torch.int32), (0, 0, 0, pad))
        self.register_buffer("_kernel_weight", torch._convert_weight_to_int4pack_for_cpu(codes, 1),
                             persistent=False)
        scale32 = self.scale.float()
        params = torch.stack([scale32.t(), (self.low.float() + 8 * scale32).t()], dim=-1)
        params = F.pad(params, (0, 0, 0, pad)).to(torch.bfloat16).contiguous()
        self.register_buffer("_kernel_params", params, persistent=False)
        self.register_buffer("_native", int4_native_records(self.packed, self.scale, self.low),
                             persistent=False)

    def _rows_codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        return quantize_int8(self.dequantize())

    def weight_rows(self, rows: torch.Tensor | slice) -> torch.Tensor:
        return dequantize_int4(self.packed[rows], self.scale[rows], self.low[rows])

    def native_weights(self) -> tuple[str, tuple[torch.Tensor, ...]]:
        """The records of `int4_native_records`."""
        return "int4", (self._native,)

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self._kernel_weight,
                                              self.group_size, self._kernel_params)
        return y[:, : self.out_features] if self._padded else y


def enable_rows_paths(layers: Iterable[nn.Module]) -> None:
    """Give every quantized layer among `layers` its batched path (see `QuantizedLinear`)."""
    for module in layers:
        if isinstance(module, QuantizedLinear):
            module.enable_rows_path()


def quantize_state(state: dict[str, torch.Tensor], plan: dict[str, str]) -> dict[str, torch.Tensor]:
    """Quantize the Linear weights `<name>.weight` named in `plan` to the precision it gives them.

    `plan` maps layer names to "int8", "int4" or "fp32" (left as is). Everything else (norms,
    biases, embeddings that are not Linear weights) is kept as is.
    """
    out = dict(state)
    for name, precision in tqdm(plan.items(), desc="quantizing", unit="layer", leave=False,
                                disable=len(plan) < 50):
        if precision not in PRECISIONS:
            raise SlmError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if precision == "fp32":
            continue
        weight = out.pop(f"{name}.weight")
        if precision == "int8":
            out[f"{name}.qweight"], out[f"{name}.scale"] = quantize_int8(weight)
        else:
            out[f"{name}.packed"], out[f"{name}.scale"], out[f"{name}.low"] = quantize_int4(weight)
    return out


def quantized_linear_from_state(state: dict[str, torch.Tensor], name: str,
                                shape: tuple[int, int] | None = None) -> QuantizedLinear:
    """The quantized Linear module stored under `name` in a state dict: Int8Linear or Int4Linear.

    Pops the entries it uses, so the module holds the only reference to its tensors. Its tensors'
    shapes are checked against each other and, when given, against the layer's (out, in) `shape`:
    the native decode step trusts them.
    """
    bias = state.pop(f"{name}.bias", None)
    if f"{name}.qweight" in state:
        qweight, scale = state.pop(f"{name}.qweight"), state.pop(f"{name}.scale")
        out, inp = _check_codes(name, "qweight", qweight, torch.int8, shape, 1)
        _check_part(name, "scale", scale, (out,))
        layer: QuantizedLinear = Int8Linear(qweight, scale, bias)
    elif f"{name}.packed" in state:
        packed, scale, low = (state.pop(f"{name}.{part}") for part in ("packed", "scale", "low"))
        out, inp = _check_codes(name, "packed", packed, torch.uint8, shape, 2)
        groups = scale.shape[-1] if scale.dim() == 2 else 0
        if not groups or inp % groups or (inp // groups) % INT4_GROUP_MULTIPLE:
            raise SlmError(f"weights for layer '{name}': scale has shape {list(scale.shape)}; int4 "
                           f"needs [{out}, groups] with groups of a multiple of "
                           f"{INT4_GROUP_MULTIPLE} of its {inp} inputs")
        _check_part(name, "scale", scale, (out, groups))
        _check_part(name, "low", low, (out, groups))
        layer = Int4Linear(packed, scale, low, bias)
    else:
        raise SlmError(f"weights for layer '{name}' are missing")
    if bias is not None:
        _check_part(name, "bias", bias, (out,))
    return layer


def _check_codes(name: str, part: str, codes: torch.Tensor, dtype: torch.dtype,
                 shape: tuple[int, int] | None, per_byte: int) -> tuple[int, int]:
    """(out, in) of a quantized layer from its codes (`per_byte` codes per stored element)."""
    if codes.dim() != 2 or codes.dtype != dtype:
        raise SlmError(f"weights for layer '{name}': {part} must be a 2-D {dtype} tensor, "
                       f"got {list(codes.shape)} {codes.dtype}")
    out, inp = codes.shape[0], codes.shape[1] * per_byte
    if shape is not None and (out, inp) != tuple(shape):
        _check_part(name, part, codes, (shape[0], shape[1] // per_byte))
    return out, inp


def _check_part(name: str, part: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != shape:
        raise SlmError(f"weights for layer '{name}': {part} has shape {list(tensor.shape)}, "
                       f"expected {list(shape)}")


def save_state(path: str | Path, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a state dict to safetensors atomically, with string `metadata` in the header."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=metadata)


def load_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file written by `save_state`: (tensors, metadata)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        return {key: f.get_tensor(key) for key in f.keys()}, metadata



def read_metadata(path: str | Path) -> dict[str, str]:
    """Only the header metadata of a safetensors file (cheap: no tensor is read)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}
