"""The native (C) decode step against the same step in torch operators, on odd shapes and batches."""

from __future__ import annotations

import platform
import shutil

import pytest
import torch

from smallmighty.engine import native
from smallmighty.engine.model import LlamaConfig, linear_names, model_from_state
from smallmighty.engine.quantize import dequantize_int4, dequantize_int8, quantize_state

pytestmark = pytest.mark.skipif(shutil.which(native.compiler_command()[0]) is None,
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
            out[f"{name}.weight"] = dequantize_int4(value, state[f"{name}.scale"], state[f"{name}.low"])
        elif part not in ("scale", "low"):
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
])
def test_native_step_matches_torch_on_the_weights_it_stands_for(shape, precision, tolerance):
    assert native.library() is not None, "a C compiler is on PATH, so the native step must build"
    config = _config(**shape)
    state = _state_at(config, precision)
    reference = model_from_state(config, _dequantized(state), native=False)
    model = model_from_state(config, dict(state))
    assert model.native is not None and reference.native is None
    _assert_same_steps(model, reference, tolerance)


def _with_int4_activations(linear: torch.nn.Module, low: torch.Tensor) -> None:
    """Make a float32 `linear` compute as the native step's int4 kernel does: each block of 32
    inputs becomes integer codes up to 16192 against its largest magnitude, and the weights' `low`
    (per group) multiplies the block's exact float sum."""
    def codes(module, args):
        blocks = args[0].unflatten(-1, (-1, 32))
        top = blocks.abs().amax(-1, keepdim=True)
        coded = torch.round(blocks * torch.where(top > 0, 16192 / top, 0)) * (top / 16192)
        module.lost = (blocks - coded).sum(-1).unflatten(-1, (low.shape[1], -1)).sum(-1)
        return (coded.flatten(-2),)

    linear.register_forward_pre_hook(codes)
    linear.register_forward_hook(lambda module, args, y: y + module.lost @ low.float().t())


@pytest.mark.parametrize("name", ["layers.0.qkv", "layers.0.o", "layers.1.gate_up", "layers.1.down", "lm_head"])
def test_native_int4_step_is_exact_integer_arithmetic_on_15_bit_activations(name):
    # One layer at a time in int4 (the others float32): a random model amplifies the rounding of
    # activation codes layer after layer, so the arithmetic is checked per layer, exactly.
    model, reference = _int4_layer_and_reference(name)
    assert model.native is not None and reference.native is None
    _assert_same_steps(model, reference, 2e-4)


def _int4_layer_and_reference(name: str) -> tuple:
    """WIDE with layer `name` in int4 (the native step's model), and its float32 reference."""
    config = _config(**WIDE)
    names = linear_names(config)
    state = quantize_state(_state(config), {n: "int4" if n == name else "fp32" for n in names})
    reference = model_from_state(config, _dequantized(state), native=False)
    _with_int4_activations(reference.linears()[names.index(name)], state[f"{name}.low"])
    return model_from_state(config, state), reference


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
    for shape, precision in ((ODD, "fp32"), (ODD, "int8")):
        config = _config(**shape)
        state = _state_at(config, precision)
        reference = model_from_state(config, _dequantized(state), native=False)
        model = model_from_state(config, dict(state))
        assert model.use_native(lib)
        _assert_same_steps(model, reference, 1e-5)
    for name in ("layers.1.gate_up", "lm_head"):
        model, reference = _int4_layer_and_reference(name)
        assert model.use_native(lib)
        _assert_same_steps(model, reference, 2e-4)


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


def test_compiler_may_carry_arguments_and_concurrent_first_calls_build_once(tmp_path, monkeypatch, capsys):
    # `CC="ccache gcc"` is common; "cc -w" is the same shape with what every machine has.
    monkeypatch.setenv("CC", "cc -w")
    assert native.compiler_command() == ["cc", "-w"]
    monkeypatch.setenv("SLM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "_LIBRARY", None)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        libraries = list(pool.map(lambda _: native.library(), range(4)))
    assert libraries[0] is not None and all(lib is libraries[0] for lib in libraries)
    assert capsys.readouterr().err.count("Compiling the native decode step") == 1
    assert len(list((tmp_path / "kernels").glob("decode-*.so"))) == 1


@pytest.mark.skipif(shutil.which("gcc-11") is None, reason="gcc-11 is not installed")
def test_builds_with_gcc_11(tmp_path):
    # Ubuntu 22.04's default compiler (no __builtin_shufflevector before GCC 12).
    lib = native.load(native.build(tmp_path, compiler="gcc-11"))
    model, reference = _int4_layer_and_reference("layers.1.gate_up")
    assert model.use_native(lib)
    _assert_same_steps(model, reference, 2e-4)


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


# ---- malformed calls and checkpoints: clear errors, never a crash ------------------------------

def _good_call(model) -> dict:
    """Arguments of a valid decode step: 2 sequences in rows 2 and 0 of a 3-row, 8-slot cache."""
    cache = model.new_cache(3, 8)
    for layer in cache:
        layer.zero_()
    slots, first = torch.tensor([5, 3]), torch.tensor([1, 0])
    return dict(ids=torch.tensor([1, 2]), cache=cache, slots=slots, first=first,
                rope=model.rope(8)[slots - first], rows=torch.tensor([2, 0]))


#: case -> (what changes in the good call, a piece of the error message)
MALFORMED_CALLS = {
    "slot past the cache": (lambda a: a | {"slots": torch.tensor([8, 3])}, "slot 8"),
    "negative slot": (lambda a: a | {"slots": torch.tensor([5, -1]), "first": torch.tensor([0, -1])},
                      "first -1"),
    "first after slot": (lambda a: a | {"first": torch.tensor([1, 4])}, "first 4 and slot 3"),
    "batch larger than the cache": (lambda a: a | {"ids": torch.tensor([1, 2, 3, 4]),
                                                  "slots": torch.tensor([5] * 4),
                                                  "first": torch.zeros(4, dtype=torch.long),
                                                  "rope": a["rope"][:1].expand(4, -1), "rows": None},
                                    "4 distinct values in [0, 3)"),
    "too few caches": (lambda a: a | {"cache": a["cache"][:-1]}, "one cache per layer"),
    "rows out of range": (lambda a: a | {"rows": torch.tensor([3, 0])}, "[3, 0]"),
    "repeated rows": (lambda a: a | {"rows": torch.tensor([1, 1])}, "distinct"),
    "slots of another batch size": (lambda a: a | {"slots": torch.tensor([5, 3, 2])}, "slots must be"),
    "float slots": (lambda a: a | {"slots": torch.tensor([5.0, 3.0])}, "slots must be"),
    "cache of another model": (lambda a: a | {"cache": [torch.zeros(3, 2, 8, 8)] * 2},
                               "every cache must be"),
    "strided cache": (lambda a: a | {"cache": [kv[:, :, ::2] for kv in a["cache"]]},
                      "every cache must be"),
    "rope of another size": (lambda a: a | {"rope": a["rope"][:, :4]}, "rope must be"),
    "token past the vocabulary": (lambda a: a | {"ids": torch.tensor([1, 101])}, "token ids"),
}


#: case -> a piece of the error message
MALFORMED_CHECKPOINTS = {
    "untied lm_head with more rows than vocab_size":
        "'lm_head.weight' has shape [108, 64], but config.json implies [101, 64]",
    "mlp projection of the wrong width": "'model.layers.0.mlp.up_proj.weight' has shape [97, 64]",
    "float32 lm_head with extra rows": "'lm_head.weight' has shape [106, 64]",
    "int4 groups of 16": "multiple of 32",
    "int8 scales of another length": "'lm_head': scale has shape [104]",
}


def _malformed_checkpoints(root) -> dict:
    """case (of MALFORMED_CHECKPOINTS) -> a function loading that bad checkpoint."""
    from safetensors.torch import save_file

    from smallmighty.engine.model import LlamaConfig, hf_to_state, read_hf_weights

    config = _config(**WIDE)
    c = config

    def hf_folder(name: str, **extra_rows: int):
        folder = root / name
        folder.mkdir()
        weights = {"model.embed_tokens.weight": torch.zeros(c.vocab_size, c.hidden_size),
                   "lm_head.weight": torch.zeros(c.vocab_size + extra_rows.get("lm_head", 0), c.hidden_size),
                   "model.norm.weight": torch.ones(c.hidden_size)}
        q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        for i in range(c.num_hidden_layers):
            p = f"model.layers.{i}."
            weights |= {p + "self_attn.q_proj.weight": torch.zeros(q, c.hidden_size),
                        p + "self_attn.k_proj.weight": torch.zeros(kv, c.hidden_size),
                        p + "self_attn.v_proj.weight": torch.zeros(kv, c.hidden_size),
                        p + "self_attn.o_proj.weight": torch.zeros(c.hidden_size, q),
                        p + "mlp.gate_proj.weight": torch.zeros(c.intermediate_size, c.hidden_size),
                        p + "mlp.up_proj.weight": torch.zeros(c.intermediate_size
                                                              + extra_rows.get("up", 0), c.hidden_size),
                        p + "mlp.down_proj.weight": torch.zeros(c.hidden_size, c.intermediate_size),
                        p + "input_layernorm.weight": torch.ones(c.hidden_size),
                        p + "post_attention_layernorm.weight": torch.ones(c.hidden_size)}
        save_file(weights, str(folder / "model.safetensors"))
        untied = LlamaConfig(**{**c.__dict__, "tie_word_embeddings": False})
        return lambda: model_from_state(untied, hf_to_state(untied, read_hf_weights(folder)))

    def int4_groups(group: int):
        state = _state_at(config, "int4")
        packed = state["layers.0.o.packed"]
        groups = 2 * packed.shape[1] // group
        state["layers.0.o.scale"] = state["layers.0.o.low"] = torch.ones(packed.shape[0], groups).half()
        return lambda: model_from_state(config, state)

    def int8_scale():
        state = _state_at(config, "int8")
        state["lm_head.scale"] = torch.ones(c.vocab_size + 3)
        return lambda: model_from_state(config, state)

    def dense_rows():
        state = _state(config)
        state["lm_head.weight"] = torch.zeros(c.vocab_size + 5, c.hidden_size)
        return lambda: model_from_state(config, state)

    return {"untied lm_head with more rows than vocab_size": hf_folder("lm_head", lm_head=7),
            "mlp projection of the wrong width": hf_folder("up", up=1),
            "float32 lm_head with extra rows": dense_rows(),
            "int4 groups of 16": int4_groups(16),
            "int8 scales of another length": int8_scale()}


def _run_malformed_cases(root: str) -> None:
    """Run every malformed case, printing one JSON line each: {case, error, message}.

    Runs in a child process (see the test): a check that was missing would crash it (SIGSEGV, a
    glibc abort), which the test reports instead of dying with it.
    """
    import json
    from pathlib import Path

    from smallmighty.errors import SlmError

    config = _config(**WIDE)
    model = model_from_state(config, _state(config))
    assert model.native is not None
    cases = {name: (lambda change=change: model.decode(**change(_good_call(model))))
             for name, (change, _) in MALFORMED_CALLS.items()}
    cases |= _malformed_checkpoints(Path(root))
    with torch.inference_mode():
        model.decode(**_good_call(model))  # the unchanged call runs
        for name, run in cases.items():
            try:
                run()
                outcome = {"error": None, "message": ""}
            except SlmError as err:
                outcome = {"error": type(err).__name__, "message": str(err)}
            print(json.dumps({"case": name, **outcome}), flush=True)


@pytest.fixture(scope="module")
def malformed_outcomes(tmp_path_factory) -> dict:
    import json
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).parent
    code = (f"import sys; sys.path.insert(0, {str(here)!r}); import test_native; "
            f"test_native._run_malformed_cases({str(tmp_path_factory.mktemp('bad'))!r})")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    outcomes = {}
    for line in done.stdout.splitlines():
        row = json.loads(line)
        outcomes[row.pop("case")] = row
    outcomes["exit"] = {"code": done.returncode, "stderr": done.stderr[-2000:]}
    return outcomes


ERROR_MATCHES = {name: match for name, (_, match) in MALFORMED_CALLS.items()} | MALFORMED_CHECKPOINTS


@pytest.mark.parametrize("case", ERROR_MATCHES)
def test_malformed_calls_and_checkpoints_are_clear_errors_not_crashes(malformed_outcomes, case):
    assert case in malformed_outcomes, f"the child process died before this case: {malformed_outcomes['exit']}"
    outcome = malformed_outcomes[case]
    assert outcome["error"] == "SlmError", outcome
    assert ERROR_MATCHES[case] in outcome["message"] and "\n" not in outcome["message"], outcome
