"""The training attention: transformers' eager attention exactly in fp32, close to it in bf16."""

from __future__ import annotations

import copy

import pytest
import torch

from smallmighty.models.decoder import PRESETS, build_decoder
from smallmighty.train.attention import TRAINING_ATTENTION, register_training_attention


@pytest.fixture(scope="module")
def pair(bpe_tokenizer_dir):
    from transformers import AutoTokenizer

    eager = build_decoder(PRESETS["tiny"], AutoTokenizer.from_pretrained(bpe_tokenizer_dir))
    assert eager.config.num_key_value_heads < eager.config.num_attention_heads  # grouped-query heads
    eager.set_attn_implementation("eager")
    ours = copy.deepcopy(eager)
    ours.set_attn_implementation(register_training_attention())
    return eager, ours


def _logits_and_grads(model, ids, mask, bf16: bool):
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(input_ids=ids, attention_mask=mask).logits
    logits.float().square().mean().backward()
    return logits.float(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("bf16", [False, True])
def test_training_attention_matches_eager(pair, bf16):
    eager, ours = pair
    torch.manual_seed(0)
    ids = torch.randint(3, 300, (2, 24))
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0  # a padded row: the mask is applied
    want, want_grads = _logits_and_grads(eager, ids, mask, bf16)
    got, got_grads = _logits_and_grads(ours, ids, mask, bf16)
    tolerance = 3e-2 if bf16 else 1e-5
    assert torch.allclose(got, want, atol=tolerance)
    for g, w in zip(got_grads, want_grads):
        assert torch.allclose(g, w, atol=tolerance * max(1.0, w.abs().max().item()))
    assert ours.config._attn_implementation == TRAINING_ATTENTION
