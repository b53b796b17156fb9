"""GGUF export: metadata and tensors read back through gguf's reader; llama.cpp runs it like our engine."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from tiny_llama import TINY, write_tiny_llama

from smallmighty.compress import commands
from smallmighty.compress.gguf_export import (
    GGUF_TYPES,
    export_gguf,
    llama3_rope_factors,
    pre_tokenizer_name,
)
from smallmighty.errors import SlmError

gguf = pytest.importorskip("gguf")
needs_llama_cpp = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None,
    reason="llama-cpp-python is not installed (the benchmark extra: pip install llama-cpp-python==0.3.36, "
           "a ~11 minute build; bench/export.py installs it)")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def fields(reader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def hf_interleaved(weight: np.ndarray, heads: int) -> np.ndarray:
    """HF q/k rows in llama.cpp's order: row (h, i, half) of HF goes to (h, 2i + half)."""
    d = weight.shape[0] // heads
    out = np.empty_like(weight)
    for h in range(heads):
        for i in range(d // 2):
            out[h * d + 2 * i] = weight[h * d + i]
            out[h * d + 2 * i + 1] = weight[h * d + d // 2 + i]
    return out


def test_cli_lists_the_same_types_without_importing_the_exporter():
    assert commands.GGUF_TYPES == GGUF_TYPES


def test_metadata_and_tokenizer_round_trip(tiny, tmp_path):
    path = export_gguf(tiny, tmp_path / "tiny.gguf", gguf_type="f32")
    meta = fields(gguf.GGUFReader(path))
    config = json.loads((tiny / "config.json").read_text())
    tokenizer = json.loads((tiny / "tokenizer.json").read_text())
    assert meta["general.architecture"] == "llama"
    assert meta["llama.block_count"] == TINY["layers"]
    assert meta["llama.embedding_length"] == TINY["hidden"]
    assert meta["llama.feed_forward_length"] == TINY["ffn"]
    assert meta["llama.attention.head_count"] == TINY["heads"]
    assert meta["llama.attention.head_count_kv"] == TINY["kv_heads"]
    assert meta["llama.context_length"] == TINY["max_len"]
    assert meta["llama.rope.dimension_count"] == TINY["hidden"] // TINY["heads"]
    assert meta["llama.rope.freq_base"] == pytest.approx(config["rope_theta"])
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(config["rms_norm_eps"])
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    vocab = {i: t for t, i in tokenizer["model"]["vocab"].items()}
    assert meta["tokenizer.ggml.tokens"] == [vocab[i] for i in range(config["vocab_size"])]
    assert len(meta["tokenizer.ggml.merges"]) == len(tokenizer["model"]["merges"]) > 0
    types = meta["tokenizer.ggml.token_type"]
    assert [types[i] for i in (0, 1, 2)] == [gguf.TokenType.CONTROL] * 3 and types[100] == gguf.TokenType.NORMAL
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert meta["tokenizer.ggml.add_bos_token"] is False  # the tokenizer adds none; llama.cpp must not either
    assert meta["tokenizer.chat_template"] == json.loads((tiny / "tokenizer_config.json").read_text())["chat_template"]


@pytest.mark.parametrize("gguf_type", GGUF_TYPES)
def test_tensors_round_trip_with_their_shapes_and_values(tiny, tmp_path, gguf_type):
    path = export_gguf(tiny, tmp_path / f"tiny.{gguf_type}.gguf", gguf_type=gguf_type)
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    hf = load_file(str(tiny / "model.safetensors"))
    heads, kv = TINY["heads"], TINY["kv_heads"]
    expected = {"token_embd.weight": hf["model.embed_tokens.weight"], "output_norm.weight": hf["model.norm.weight"]}
    for i in range(TINY["layers"]):
        p = f"model.layers.{i}."
        expected |= {
            f"blk.{i}.attn_q.weight": hf_interleaved(hf[p + "self_attn.q_proj.weight"], heads),
            f"blk.{i}.attn_k.weight": hf_interleaved(hf[p + "self_attn.k_proj.weight"], kv),
            f"blk.{i}.attn_v.weight": hf[p + "self_attn.v_proj.weight"],
            f"blk.{i}.attn_output.weight": hf[p + "self_attn.o_proj.weight"],
            f"blk.{i}.ffn_gate.weight": hf[p + "mlp.gate_proj.weight"],
            f"blk.{i}.ffn_up.weight": hf[p + "mlp.up_proj.weight"],
            f"blk.{i}.ffn_down.weight": hf[p + "mlp.down_proj.weight"],
            f"blk.{i}.attn_norm.weight": hf[p + "input_layernorm.weight"],
            f"blk.{i}.ffn_norm.weight": hf[p + "post_attention_layernorm.weight"],
        }
    assert set(tensors) == set(expected)  # tied embeddings: no output.weight
    # Worst error of each type relative to a weight's largest magnitude.
    tolerance = {"f32": 0.0, "f16": 1e-3, "q8_0": 1e-2, "q4_0": 0.15}[gguf_type]
    for name, want in expected.items():
        tensor = tensors[name]
        assert tuple(int(n) for n in reversed(tensor.shape)) == want.shape, name  # ggml lists dims innermost first
        got = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(want.shape)
        if want.ndim == 1:
            assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
        np.testing.assert_allclose(got, want, rtol=0, atol=tolerance * float(np.abs(want).max()) + 1e-7,
                                   err_msg=name)
    if gguf_type == "q4_0":  # the embedding (also the output projection) keeps 8 bits
        assert tensors["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
        assert tensors["blk.0.ffn_up.weight"].tensor_type == gguf.GGMLQuantizationType.Q4_0


def test_pre_tokenizer_names_follow_the_splitting_rule():
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    assert pre_tokenizer_name(byte_level) == "gpt-2"
    digits = {"type": "Digits", "individual_digits": True}
    assert pre_tokenizer_name({"type": "Sequence", "pretokenizers": [digits, byte_level]}) == "smollm"
    from smallmighty.compress import gguf_export

    for regex, name in ((gguf_export._LLAMA3_REGEX, "llama-bpe"), (gguf_export._QWEN2_REGEX, "qwen2")):
        split = {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}
        rule = {"type": "Sequence", "pretokenizers": [split, byte_level | {"use_regex": False}]}
        assert pre_tokenizer_name(rule) == name
    with pytest.raises(SlmError, match="no llama.cpp pre-tokenizer"):
        pre_tokenizer_name({"type": "Whitespace"})


def test_llama3_rope_factors_leave_short_wavelengths_and_divide_long_ones():
    rope = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    factors = llama3_rope_factors(128, 500000.0, rope)
    assert factors.shape == (64,) and factors[0] == 1.0 and factors[-1] == pytest.approx(8.0)
    assert np.all(np.diff(factors) >= 0)


def test_wrong_models_are_one_clear_error(tiny, classifier_dir, tmp_path):
    with pytest.raises(SlmError, match="is a sequence classifier; --format gguf exports causal"):
        export_gguf(classifier_dir, tmp_path / "x.gguf")
    other = tmp_path / "other"
    other.mkdir()
    for name in ("tokenizer.json", "model.safetensors"):
        (other / name).write_bytes((tiny / name).read_bytes())
    config = json.loads((tiny / "config.json").read_text()) | {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(SlmError, match="model type 'gpt2' cannot be exported"):
        export_gguf(other, tmp_path / "x.gguf")
    with pytest.raises(SlmError, match="GGUF type must be one of"):
        export_gguf(tiny, tmp_path / "x.gguf", gguf_type="q2_k")
    assert not (tmp_path / "x.gguf").exists()


# ---- llama.cpp (optional) -------------------------------------------------------------------


def variant(tiny: Path, directory: Path, kind: str) -> Path:
    """The tiny model with Llama 3 rope scaling, or as a Qwen2 (q/k/v biases, rotary in halves)."""
    directory.mkdir()
    for file in tiny.iterdir():
        (directory / file.name).write_bytes(file.read_bytes())
    config = json.loads((tiny / "config.json").read_text())
    if kind == "llama3-rope":
        config["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    else:
        config |= {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "attention_bias": True}
        weights = load_file(str(directory / "model.safetensors"))
        rng = np.random.default_rng(1)
        for i in range(TINY["layers"]):
            for proj in ("q", "k", "v"):
                rows = weights[f"model.layers.{i}.self_attn.{proj}_proj.weight"].shape[0]
                weights[f"model.layers.{i}.self_attn.{proj}_proj.bias"] = (rng.standard_normal(rows) * 0.5).astype(np.float32)
        save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def llama_cpp_greedy(path: Path, prompt: list[int], n: int) -> list[int]:
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=TINY["max_len"], n_threads=1, verbose=False)
    out = []
    for token in llm.generate(prompt, temp=0.0, top_k=1):
        out.append(token)
        if len(out) == n:
            return out
    return out


@needs_llama_cpp
@pytest.mark.parametrize("kind", ["llama", "llama3-rope", "qwen2"])
def test_llama_cpp_tokenizes_and_decodes_like_our_engine(tiny, tmp_path, kind):
    from llama_cpp import Llama

    from smallmighty.engine.generate import Engine
    from smallmighty.engine.sampling import GenerationSettings

    model = tiny if kind == "llama" else variant(tiny, tmp_path / kind, kind)
    path = export_gguf(model, tmp_path / "model.gguf", gguf_type="f32")
    engine = Engine.from_pretrained(model, precision="fp32")
    engine.eos_token_ids = set()  # llama.cpp's generator does not stop either
    llm = Llama(str(path), n_ctx=TINY["max_len"], n_threads=1, verbose=False, vocab_only=True)
    for text in ("Hello there! What is the capital of France?", "  two  spaces, digits 12345 and ünïcode\n",
                 "<|im_start|>user\nHi<|im_end|>\n"):
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == engine.encode(text), text
    prompt = engine.encode(engine.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}]))
    ours = engine.generate([prompt], GenerationSettings(max_new_tokens=40, temperature=0.0))[0]
    assert llama_cpp_greedy(path, prompt, 40) == ours


@needs_llama_cpp
def test_llama_cpp_runs_the_quantized_exports_close_to_f32(tiny, tmp_path):
    from llama_cpp import Llama

    prompt = [5, 40, 41, 42, 43, 44, 45, 46]
    logits = {}
    for gguf_type in GGUF_TYPES:
        llm = Llama(str(export_gguf(tiny, tmp_path / f"{gguf_type}.gguf", gguf_type=gguf_type)),
                    n_ctx=64, n_threads=1, verbose=False, logits_all=True)
        llm.eval(prompt)
        logits[gguf_type] = np.array(llm.scores[: len(prompt)])
    scale = np.abs(logits["f32"]).max()
    for gguf_type, bound in (("f16", 0.01), ("q8_0", 0.05), ("q4_0", 0.4)):
        assert np.abs(logits[gguf_type] - logits["f32"]).max() < bound * scale, gguf_type


@pytest.fixture(scope="module")
def pretrained_student(tmp_path_factory) -> Path:
    """A decoder as `slm pretrain` makes one: our byte-level BPE tokenizer and the 'tiny' preset
    (its feed-forward width, 176, does not split into 32-wide quantization blocks)."""
    from transformers import AutoTokenizer

    from smallmighty.data.tokenizer import train_tokenizer
    from smallmighty.models.decoder import build_decoder, decoder_shape, save_decoder

    root = tmp_path_factory.mktemp("pretrained")
    corpus = root / "corpus.txt"
    corpus.write_text("The cat sat on the mat. The dog sat on the log. Numbers like 12345 stay.\n" * 50)
    tokenizer = AutoTokenizer.from_pretrained(train_tokenizer(corpus, root / "tokenizer", vocab_size=300))
    return save_decoder(build_decoder(decoder_shape("tiny"), tokenizer), tokenizer, root / "model")


@pytest.mark.parametrize("gguf_type", ["f32", "q8_0"])
def test_a_pretrained_student_exports(pretrained_student, tmp_path, gguf_type):
    reader = gguf.GGUFReader(export_gguf(pretrained_student, tmp_path / "s.gguf", gguf_type=gguf_type))
    types = {t.name: t.tensor_type for t in reader.tensors}
    if gguf_type == "q8_0":  # rows of 176 inputs fall back to f16; the rest is q8_0
        assert types["blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.F16
        assert types["blk.0.ffn_up.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert fields(reader)["tokenizer.ggml.pre"] == "gpt-2"


@needs_llama_cpp
def test_llama_cpp_runs_a_pretrained_student_like_our_engine(pretrained_student, tmp_path):
    from smallmighty.engine.generate import Engine
    from smallmighty.engine.sampling import GenerationSettings

    path = export_gguf(pretrained_student, tmp_path / "s.gguf", gguf_type="f32")
    engine = Engine.from_pretrained(pretrained_student, precision="fp32")
    engine.eos_token_ids = set()
    prompt = engine.encode("The cat sat on")
    ours = engine.generate([prompt], GenerationSettings(max_new_tokens=24, temperature=0.0))[0]
    assert llama_cpp_greedy(path, prompt, 24) == ours
