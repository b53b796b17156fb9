"""Llama-style decoders from presets or shape files, saved as standard HF folders."""

from __future__ import annotations

import json

import pytest
import torch

from smallmighty.errors import SlmError
from smallmighty.models.decoder import PRESETS, DecoderShape, build_decoder, decoder_shape, save_decoder


@pytest.fixture(scope="module")
def tok(bpe_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bpe_tokenizer_dir)


@pytest.mark.parametrize("name", ["tiny", "12m"])
def test_presets_build_llama_models_of_the_counted_size(name, tok):
    model = build_decoder(PRESETS[name], tok)
    config = model.config
    assert type(model).__name__ == "LlamaForCausalLM" and config.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert config.num_key_value_heads < config.num_attention_heads  # grouped-query attention
    assert sum(p.numel() for p in model.parameters()) == PRESETS[name].parameters(len(tok))


def test_preset_sizes_match_their_names():
    for name, millions in (("12m", 12), ("30m", 30), ("60m", 60)):  # at an 8k vocabulary
        assert abs(PRESETS[name].parameters(8192) / 1e6 - millions) / millions < 0.1, name
    assert PRESETS["smollm2-135m"].parameters(49152) == 134_515_008  # SmolLM2-135M's own count


def test_same_seed_same_weights_and_saved_folder_loads_in_transformers(tok, tmp_path):
    from transformers import AutoModelForCausalLM

    a, b = build_decoder(PRESETS["tiny"], tok, seed=3), build_decoder(PRESETS["tiny"], tok, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    out = save_decoder(a, tok, tmp_path / "model", meta={"recipe": "test"})
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
            "smallmighty.json"} <= {p.name for p in out.iterdir()}
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, a.eval()(ids).logits, atol=1e-6)
    assert json.loads((out / "smallmighty.json").read_text()) == {"recipe": "test"}


def test_shapes_from_files_and_overrides(tmp_path):
    assert decoder_shape("tiny", layers=5).layers == 5
    assert decoder_shape("tiny", layers=None) == PRESETS["tiny"]
    path = tmp_path / "shape.json"
    path.write_text(json.dumps({"hidden": 96, "layers": 3, "heads": 6, "kv_heads": 2, "ffn": 256}))
    assert decoder_shape(shape_file=path) == DecoderShape(hidden=96, layers=3, heads=6, kv_heads=2, ffn=256)
    path.write_text(json.dumps({"hidden": 96, "layers": 3, "heads": 6, "kv_heads": 2, "ffn": 256, "width": 1}))
    with pytest.raises(SlmError, match="unknown shape field.*width"):
        decoder_shape(shape_file=path)
    with pytest.raises(SlmError, match="unknown decoder preset 'huge'"):
        decoder_shape("huge")
    with pytest.raises(SlmError, match="heads 6 is not a multiple of kv_heads 4"):
        decoder_shape("tiny", hidden=96, heads=6, kv_heads=4)
