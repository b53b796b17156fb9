"""Perplexity against transformers' loss on the same random model (real-model figures: tests/serve)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from smallmighty.engine.model import (
    LlamaConfig,
    hf_to_state,
    model_from_state,
    read_hf_weights,
)
from smallmighty.errors import SlmError
from smallmighty.evaluate.perplexity import perplexity


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(transformers model, our model) with the same random weights."""
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    path: Path = tmp_path_factory.mktemp("ppl")
    torch.manual_seed(0)
    hf = LlamaForCausalLM(HFConfig(vocab_size=50, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64, initializer_range=0.3)).eval()
    hf.save_pretrained(path)
    config = LlamaConfig.from_file(path / "config.json")
    return hf, model_from_state(config, hf_to_state(config, read_hf_weights(path)))


IDS = torch.randint(0, 50, (45,), generator=torch.Generator().manual_seed(2)).tolist()


def _hf_sliding_window(hf, ids: list[int], context: int, stride: int) -> float:
    """The sliding-window recipe from transformers' perplexity guide, written out independently."""
    nll, count, prev_end = 0.0, 0, 0
    tokens = torch.tensor([ids])
    for begin in range(0, len(ids), stride):
        end = min(begin + context, len(ids))
        labels = tokens[:, begin:end].clone()
        labels[:, : -(end - prev_end)] = -100
        with torch.inference_mode():
            loss = hf(tokens[:, begin:end], labels=labels).loss
        scored = (labels[:, 1:] != -100).sum().item()
        nll += loss.item() * scored
        count += scored
        prev_end = end
        if end == len(ids):
            break
    return math.exp(nll / count)


@pytest.mark.parametrize("context,stride", [(64, 64), (16, 16), (16, 5), (10, 10)])
def test_perplexity_matches_the_transformers_recipe(pair, context, stride):
    hf, ours = pair
    expected = _hf_sliding_window(hf, IDS, context, stride)
    got = perplexity(ours, IDS, context=context, stride=stride, progress=False)
    assert got == pytest.approx(expected, rel=1e-4)


def test_max_tokens_scores_only_a_prefix(pair):
    _, ours = pair
    assert perplexity(ours, IDS, context=16, max_tokens=20, progress=False) == pytest.approx(
        perplexity(ours, IDS[:20], context=16, progress=False))


def test_bad_arguments_are_clear_errors(pair):
    _, ours = pair
    with pytest.raises(SlmError, match="Engine"):
        perplexity(ours, "some text")
    with pytest.raises(SlmError, match="context"):
        perplexity(ours, IDS, context=1)
    with pytest.raises(SlmError, match="stride"):
        perplexity(ours, IDS, context=8, stride=9)
    with pytest.raises(SlmError, match="at least 2"):
        perplexity(ours, IDS[:1])
    with pytest.raises(SlmError, match="positions"):
        perplexity(ours, IDS, context=128)
