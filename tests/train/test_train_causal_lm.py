"""Next-token loss, batches of packed and ragged rows, and validation perplexity."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from smallmighty.errors import SlmError
from smallmighty.models.decoder import PRESETS, build_decoder
from smallmighty.train.causal_lm import (
    IGNORE_INDEX,
    CausalLMCollator,
    CausalLMObjective,
    causal_lm_loss,
    perplexity_evaluator,
    resolve_precision,
)


@pytest.fixture(scope="module")
def model(bpe_tokenizer_dir):
    from transformers import AutoTokenizer

    return build_decoder(PRESETS["tiny"], AutoTokenizer.from_pretrained(bpe_tokenizer_dir)).eval()


def test_loss_is_mean_next_token_cross_entropy_over_labelled_positions():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 7)
    labels = torch.tensor([[1, 2, 3, 4], [5, IGNORE_INDEX, 6, IGNORE_INDEX]])
    terms = [-F.log_softmax(logits[b, t], -1)[labels[b, t + 1]] for b, t in [(0, 0), (0, 1), (0, 2), (1, 1)]]
    assert torch.allclose(causal_lm_loss(logits, labels), torch.stack(terms).mean())


def test_loss_matches_transformers_labels_loss(model):
    ids = torch.randint(3, 300, (2, 12))
    labels = ids.clone()
    labels[0, :5] = IGNORE_INDEX  # a prompt that is not a target, as in chat fine-tuning
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
    assert torch.allclose(causal_lm_loss(out.logits, labels), out.loss, atol=1e-6)


def test_collator_stacks_packed_rows_and_pads_ragged_ones():
    collate = CausalLMCollator(pad_token_id=0)
    packed = collate([{"input_ids": torch.tensor([1, 2, 3])}, {"input_ids": torch.tensor([4, 5, 6])}])
    assert set(packed) == {"input_ids", "labels"}  # no mask: attention takes its causal fast path
    assert torch.equal(packed["labels"], packed["input_ids"])
    ragged = collate([{"input_ids": [1, 2, 3], "labels": [IGNORE_INDEX, 2, 3]}, {"input_ids": [4]}])
    assert ragged["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert ragged["labels"].tolist() == [[IGNORE_INDEX, 2, 3], [4, IGNORE_INDEX, IGNORE_INDEX]]
    assert ragged["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_padding_does_not_change_a_rows_loss(model):
    objective = CausalLMObjective(model)
    collate = CausalLMCollator(pad_token_id=0)
    row = {"input_ids": [5, 9, 13, 40, 41, 42]}
    with torch.no_grad():
        alone, _ = objective(collate([row]))
        padded, _ = objective(collate([row | {"labels": row["input_ids"]}, {"input_ids": [7, 8, 9, 10, 11, 12, 13, 14],
                                                                             "labels": [IGNORE_INDEX] * 8}]))
    assert torch.allclose(alone, padded, atol=1e-5)


def test_perplexity_evaluator_weighs_every_target_token(model):
    rows = torch.randint(3, 300, (5, 10))
    collate = CausalLMCollator(pad_token_id=0)
    objective = CausalLMObjective(model)
    with torch.no_grad():
        scores = perplexity_evaluator(rows, collate, batch_size=2)(objective)
        whole = causal_lm_loss(model(input_ids=rows).logits, rows).item()
    assert scores["val_loss"] == pytest.approx(whole, rel=1e-5)
    assert scores["val_ppl"] == pytest.approx(math.exp(whole), rel=1e-5)


def test_bf16_autocast_stays_close_to_fp32(model):
    rows = torch.randint(3, 300, (2, 16))
    batch = CausalLMCollator(0)([{"input_ids": r} for r in rows])
    with torch.no_grad():
        fp32, _ = CausalLMObjective(model, precision="fp32")(batch)
        bf16, _ = CausalLMObjective(model, precision="bf16")(batch)
    assert abs(fp32.item() - bf16.item()) < 0.05
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32


def test_precision_names():
    assert resolve_precision("fp32") == "fp32"
    assert resolve_precision("auto") in ("bf16", "fp32")
    with pytest.raises(SlmError, match="precision must be one of"):
        resolve_precision("fp8")
