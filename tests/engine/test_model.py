"""Our Llama-family decoder against transformers' on the same random weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from smallmighty.engine.model import (
    LlamaConfig,
    PromptChunk,
    hf_to_state,
    model_from_state,
    quantization_plan,
    read_hf_weights,
    rope_table,
)
from smallmighty.engine.quantize import enable_rows_paths, quantize_state
from smallmighty.errors import DataError, SlmError

BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def _hf_model(tmp_path: Path, arch: str = "llama", **overrides):
    import transformers

    config_cls, model_cls = {"llama": ("LlamaConfig", "LlamaForCausalLM"),
                             "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
                             "mistral": ("MistralConfig", "MistralForCausalLM")}[arch]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**{**BASE, **overrides})
    model = getattr(transformers, model_cls)(config).eval()
    model.save_pretrained(tmp_path)
    return model


def _ours(model_dir: Path):
    config = LlamaConfig.from_file(model_dir / "config.json")
    return model_from_state(config, hf_to_state(config, read_hf_weights(model_dir)))


@pytest.mark.parametrize("arch,overrides", [
    ("llama", {"tie_word_embeddings": True}),
    ("llama", {"tie_word_embeddings": False, "num_key_value_heads": 4}),
    ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}}),
    ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    ("llama", {"num_key_value_heads": 1, "attention_bias": True, "mlp_bias": True}),
    ("qwen2", {"tie_word_embeddings": True}),
    ("mistral", {"sliding_window": None}),
])
def test_logits_match_transformers_prefill_and_cached_decode(tmp_path, arch, overrides):
    hf = _hf_model(tmp_path, arch, **overrides)
    ours = _ours(tmp_path)
    ids = torch.randint(0, BASE["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = hf(ids).logits
        cache = ours.new_cache(2, 12)
        rope = ours.rope(12)[None, :, None]
        got = ours(ids[:, :9], cache, 0, rope[:, :9], last_only=False)
        torch.testing.assert_close(got, expected[:, :9], atol=1e-5, rtol=1e-4)
        # The rest token by token and as one chunk through the cache: both must agree with HF.
        for pos in (9, 10):
            step = ours(ids[:, pos:pos + 1], cache, pos, rope[:, pos:pos + 1])
            torch.testing.assert_close(step, expected[:, pos], atol=1e-5, rtol=1e-4)
        chunk = ours(ids[:, 9:], cache, 9, rope[:, 9:], last_only=False)
        torch.testing.assert_close(chunk, expected[:, 9:], atol=1e-5, rtol=1e-4)


def test_config_reads_transformers5_rope_parameters_and_defaults(tmp_path):
    _hf_model(tmp_path, rope_theta=5000.0)
    data = json.loads((tmp_path / "config.json").read_text())
    config = LlamaConfig.from_dict(data)
    assert config.rope_theta == 5000.0 and config.rope_scaling is None
    assert config.head_dim == 16 and config.num_key_value_heads == 2
    # rope_table rows are unit rotations; position 0 is no rotation at all.
    table = rope_table(config, 5)
    torch.testing.assert_close(table.abs(), torch.ones(5, 8))
    torch.testing.assert_close(table[0], torch.ones(8, dtype=torch.complex64))


@pytest.mark.parametrize("field,value,match", [
    ("model_type", "gpt_neox", "model_type"),
    ("hidden_act", "gelu", "hidden_act"),
    ("num_key_value_heads", 3, "num_key_value_heads"),
    ("hidden_size", -4, "hidden_size"),
])
def test_bad_config_names_the_field(field, value, match):
    data = {"model_type": "llama", **BASE, field: value}
    with pytest.raises(DataError, match=match):
        LlamaConfig.from_dict(data, source="config.json")


@pytest.mark.parametrize("scaling,match", [
    ({"rope_type": "yarn", "factor": 4.0}, "'yarn' is not supported"),
    ({"rope_type": "linear"}, "needs a positive number 'factor', got None"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}, "'high_freq_factor'"),
    ({"type": "linear", "factor": "2"}, "'factor', got '2'"),
    ("linear", "must be an object"),
])
def test_unsupported_or_incomplete_rope_scaling_is_a_clear_error(scaling, match):
    with pytest.raises(DataError, match=match) as caught:
        LlamaConfig.from_dict({"model_type": "llama", **BASE, "rope_scaling": scaling}, source="config.json")
    assert "config.json, field 'rope_scaling'" in str(caught.value)


def test_missing_or_extra_weights_are_reported(tmp_path):
    _hf_model(tmp_path)
    config = LlamaConfig.from_file(tmp_path / "config.json")
    weights = read_hf_weights(tmp_path)
    weights.pop("model.layers.1.mlp.up_proj.weight")
    with pytest.raises(SlmError, match="up_proj"):
        hf_to_state(config, weights)
    weights = read_hf_weights(tmp_path)
    weights["model.layers.0.self_attn.q_norm.weight"] = torch.ones(16)
    with pytest.raises(SlmError, match="q_norm"):
        hf_to_state(config, weights)


def test_sharded_checkpoints_load_the_same_weights(tmp_path):
    hf = _hf_model(tmp_path / "one")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    config = LlamaConfig.from_file(tmp_path / "one" / "config.json")
    single = hf_to_state(config, read_hf_weights(tmp_path / "one"))
    sharded = hf_to_state(config, read_hf_weights(tmp_path / "sharded"))
    assert single.keys() == sharded.keys()
    for name in single:
        torch.testing.assert_close(single[name], sharded[name])


def test_folder_without_safetensors_is_an_error(tmp_path):
    with pytest.raises(SlmError, match="safetensors"):
        read_hf_weights(tmp_path)


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
def test_rows_at_their_own_slots_decode_like_each_sequence_alone(tmp_path, native):
    # What a continuous-batching server does: sequences of different lengths in chosen rows of one
    # larger cache (the other rows hold someone else's data), stepped together, then a subset.
    from smallmighty.engine import native as native_step

    if native and native_step.library() is None:
        pytest.skip("no native step on this machine")
    _hf_model(tmp_path)
    config = LlamaConfig.from_file(tmp_path / "config.json")
    model = model_from_state(config, hf_to_state(config, read_hf_weights(tmp_path)), native=native)
    assert (model.native is not None) == native
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, BASE["vocab_size"], (n,), generator=g) for n in (3, 9, 6)]
    steps = [torch.randint(0, BASE["vocab_size"], (3,), generator=g) for _ in range(3)]
    rope, slots = model.rope(16), 16

    def prefill(prompt, cache):
        model(prompt[None], cache, 0, rope[None, : len(prompt), None])

    with torch.inference_mode():
        # Each sequence alone, in a cache of its own: its prompt, then three tokens.
        alone = []
        for i, prompt in enumerate(prompts):
            cache = model.new_cache(1, slots)
            prefill(prompt, cache)
            logits = []
            for t, token in enumerate(s[i] for s in steps):
                at = torch.tensor([len(prompt) + t])
                logits.append(model.decode(token[None], cache, at, torch.zeros(1, dtype=torch.long),
                                           rope[at]))
            alone.append(logits)

        # Together: rows 4, 0, 2 of a 5-row cache full of noise, prompts filled in place.
        cache = model.new_cache(5, slots)
        for layer in cache:
            layer.copy_(torch.randn(layer.shape, generator=g))
        rows = torch.tensor([4, 0, 2])
        for row, prompt in zip(rows.tolist(), prompts):
            prefill(prompt, [layer[row:row + 1] for layer in cache])
        lengths = torch.tensor([len(p) for p in prompts])
        zeros = torch.zeros(3, dtype=torch.long)
        for t in range(2):
            at = lengths + t
            got = model.decode(steps[t], cache, at, zeros, rope[at], rows)
            for i in range(3):
                torch.testing.assert_close(got[i:i + 1], alone[i][t], atol=1e-5, rtol=1e-5)
        # The last step for sequences 2 and 0 only (in that order), their rows named explicitly.
        pick = torch.tensor([2, 0])
        at = lengths[pick] + 2
        got = model.decode(steps[2][pick], cache, at, zeros[:2], rope[at], rows[pick])
        for j, i in enumerate(pick.tolist()):
            torch.testing.assert_close(got[j:j + 1], alone[i][2], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "int8", "int4"])
def test_prefill_pass_gives_each_chunk_exactly_what_it_gets_alone(tmp_path, precision):
    """`LlamaModel.prefill` packs chunks of several sequences (rows, offsets, lengths all different)
    in one pass: each gets the logits and cache entries it gets in a pass of its own, to float
    rounding (bit for bit with quantized weights on an AMD Zen 4, 4e-6 apart on an Intel Xeon with AMX:
    the float parts of a pass, attention and norms, round by shape there), and both agree with the
    plain prompt pass."""
    _hf_model(tmp_path)
    config = LlamaConfig.from_file(tmp_path / "config.json")
    state = hf_to_state(config, read_hf_weights(tmp_path))
    if precision != "fp32":
        state = quantize_state(state, quantization_plan(config, precision))
    model = model_from_state(config, state)
    enable_rows_paths(model.linears())  # what a server does: the layers' batched kernels are on
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, BASE["vocab_size"], (n,), generator=g).tolist() for n in (20, 7, 1, 33)]
    cuts = [5, 7, 1, 16]  # each prompt's first chunk; the rest is a second chunk
    rows = [3, 0, 1, 2]

    def chunks(i: int, row: int) -> list[PromptChunk]:
        p, cut = prompts[i], cuts[i]
        return [PromptChunk(p[:cut], row, 0)] + ([PromptChunk(p[cut:], row, cut)] if cut < len(p) else [])

    with torch.inference_mode():
        alone, alone_kv = [], []
        for i in range(len(prompts)):
            cache = model.new_cache(1, 40)
            logits = [model.prefill([c], cache) for c in chunks(i, 0)]
            alone.append(torch.cat(logits))
            alone_kv.append([kv[0, :, : len(prompts[i])].clone() for kv in cache])

        cache = model.new_cache(4, 40)
        first = [chunks(i, rows[i]) for i in range(len(prompts))]
        # Pass 1: every first chunk, and prompt 0's second chunk right after its first.
        packed = model.prefill([first[1][0], first[0][0], first[0][1], first[2][0], first[3][0]], cache)
        rest = model.prefill([first[3][1], first[1][0]], cache)  # prompt 1 again: written over, same values
        def same(got: torch.Tensor, expected: torch.Tensor) -> None:
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

        same(packed[[1, 2]], alone[0])
        same(packed[0], alone[1][0])
        same(rest[1], alone[1][0])
        same(packed[3], alone[2][0])
        same(torch.stack([packed[4], rest[0]]), alone[3])
        for i, row in enumerate(rows):
            for kv, expected in zip(cache, alone_kv[i]):
                same(kv[row, :, : len(prompts[i])], expected)

        for i, prompt in enumerate(prompts):  # the plain prompt pass: same numbers up to rounding
            plain = model(torch.tensor([prompt]), model.new_cache(1, 40), 0,
                          model.rope(40)[None, : len(prompt), None])
            torch.testing.assert_close(plain[0], alone[i][-1], atol=2e-2 if precision != "fp32" else 1e-4,
                                       rtol=1e-3)
