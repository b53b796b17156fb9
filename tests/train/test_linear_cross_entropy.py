"""The fused output layer + cross-entropy equals the usual two steps, values and gradients."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from smallmighty.models.decoder import PRESETS, build_decoder
from smallmighty.train.causal_lm import IGNORE_INDEX, CausalLMCollator, CausalLMObjective, plain_output_layer
from smallmighty.train.linear_cross_entropy import linear_cross_entropy, rows_per_block


def _inputs(width: int = 24, vocab: int = 97):
    torch.manual_seed(0)
    rows = 2 * rows_per_block(vocab) + 22
    hidden = torch.randn(rows, width, requires_grad=True)
    weight = torch.randn(vocab, width, requires_grad=True)
    labels = torch.randint(0, vocab, (rows,))
    labels[::5] = IGNORE_INDEX
    return hidden, weight, labels


def _grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


def test_fp32_equals_linear_then_cross_entropy_in_value_and_gradients():
    hidden, weight, labels = _inputs()  # rows not a multiple of the block, every fifth one ignored
    expected = F.cross_entropy(hidden @ weight.t(), labels, ignore_index=IGNORE_INDEX)
    fused = linear_cross_entropy(hidden, weight, labels, ignore_index=IGNORE_INDEX)
    assert torch.allclose(fused, expected, atol=1e-6)
    for got, want in zip(_grads(2.5 * fused, hidden, weight), _grads(2.5 * expected, hidden, weight)):
        assert torch.allclose(got, want, atol=1e-6)


def test_bf16_matches_the_autocast_path():
    hidden, weight, labels = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = hidden @ weight.t()
    expected = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)
    fused = linear_cross_entropy(hidden, weight, labels, ignore_index=IGNORE_INDEX, dtype=torch.bfloat16)
    assert abs(fused.item() - expected.item()) < 1e-4
    got, want = _grads(fused, hidden, weight), _grads(expected, hidden, weight)
    assert all(g.dtype == torch.float32 for g in got)  # gradients come back in the inputs' dtype
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=0.02, atol=1e-4)


def test_without_gradients_the_loss_is_the_same_and_no_targets_give_zero():
    hidden, weight, labels = _inputs()
    with torch.no_grad():
        assert torch.allclose(linear_cross_entropy(hidden, weight, labels),
                              linear_cross_entropy(hidden.detach().requires_grad_(), weight, labels))
    none = torch.full_like(labels, IGNORE_INDEX)
    loss = linear_cross_entropy(hidden, weight, none)
    assert loss.item() == 0.0
    assert all(torch.count_nonzero(g) == 0 for g in _grads(loss, hidden, weight))


@pytest.fixture(scope="module")
def llama(bpe_tokenizer_dir):
    from transformers import AutoTokenizer

    return build_decoder(PRESETS["tiny"], AutoTokenizer.from_pretrained(bpe_tokenizer_dir))


def test_objective_loss_and_gradients_equal_transformers_labels_loss(llama):
    assert plain_output_layer(llama) is not None
    rows = [{"input_ids": torch.randint(3, 300, (14,)).tolist()}, {"input_ids": [5, 6, 7, 8],
                                                                   "labels": [IGNORE_INDEX, IGNORE_INDEX, 7, 8]}]
    batch = CausalLMCollator(0)(rows)
    params = [p for p in llama.parameters()]
    fused, _ = CausalLMObjective(llama, precision="fp32")(batch)
    expected = llama(**batch).loss
    assert torch.allclose(fused, expected, atol=1e-6)
    for got, want in zip(_grads(fused, *params), _grads(expected, *params)):  # the tied embedding included
        assert torch.allclose(got, want, atol=1e-6)


def test_only_plain_output_layers_take_the_fused_path(llama):
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=32))
    assert plain_output_layer(gpt2) is None  # not in the list of architectures known to have a plain head
    lora = get_peft_model(copy.deepcopy(llama), LoraConfig(r=2, target_modules=["q_proj"]))
    decoder, head = plain_output_layer(lora)
    assert isinstance(head, nn.Linear) and decoder is lora.get_base_model().model
    headed = get_peft_model(copy.deepcopy(llama), LoraConfig(r=2, target_modules=["lm_head"]))
    assert plain_output_layer(headed) is None  # an adapted output layer is not a plain Linear
