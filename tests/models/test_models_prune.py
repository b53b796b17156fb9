"""Cutting a student out of a BERT teacher: exact where nothing is lost, guided by activations."""

from __future__ import annotations

import copy

import pytest
import torch

from smallmighty.models.encoder import (
    StudentShape,
    build_student,
    load_encoder_classifier,
)
from smallmighty.models.prune import activation_importance, can_prune

TEXTS = ["the weather is sunny today", "pizza and pasta for dinner", "our team scored a late goal",
         "rain is expected tomorrow morning", "a bowl of soup with bread"]
LABELS = ["weather", "food", "sport"]


@pytest.fixture(scope="module")
def teacher(tiny_encoder_dir):
    model, tokenizer = load_encoder_classifier(str(tiny_encoder_dir), LABELS)
    return model.eval(), tokenizer


def _logits(model, tokenizer):
    enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model.eval()(**enc).logits


def test_keeping_every_unit_reproduces_the_teacher(teacher):
    model, tokenizer = teacher
    student, student_tok, info = build_student(model, tokenizer, StudentShape(layers=2, trim_vocab=False),
                                               max_length=32)
    assert info["init"] == "teacher blocks [0, 1]"
    torch.testing.assert_close(_logits(student, student_tok), _logits(model, tokenizer), rtol=1e-5, atol=1e-5)


def test_dropping_ffn_neurons_equals_zeroing_them_in_the_teacher(teacher):
    """Slicing is exact: a student without some FFN neurons computes what the teacher computes
    with those neurons' outputs switched off."""
    model, tokenizer = teacher
    student, student_tok, _ = build_student(model, tokenizer, StudentShape(layers=2, ffn=48), train_texts=TEXTS,
                                            max_length=32)
    ids = tokenizer(TEXTS, truncation=True, max_length=32)["input_ids"]
    importance = activation_importance(model, ids, tokenizer.pad_token_id)
    silenced = copy.deepcopy(model)
    for block, layer in enumerate(silenced.bert.encoder.layer):
        dropped = importance.neurons[block].argsort()[:128 - 48]
        with torch.no_grad():
            layer.output.dense.weight[:, dropped] = 0
    torch.testing.assert_close(_logits(student, student_tok), _logits(silenced, tokenizer), rtol=1e-4, atol=1e-5)


def test_silenced_units_score_zero_and_are_cut_first(teacher):
    model, tokenizer = teacher
    silenced = copy.deepcopy(model)
    layer = silenced.bert.encoder.layer[1]
    with torch.no_grad():
        layer.attention.self.value.weight[16:32] = 0  # head 1 (head size 16) outputs nothing
        layer.attention.self.value.bias[16:32] = 0
        layer.intermediate.dense.weight[7] = 0  # neuron 7 sees only GELU(0) = 0
        layer.intermediate.dense.bias[7] = 0
    ids = tokenizer(TEXTS)["input_ids"]
    importance = activation_importance(silenced, ids, tokenizer.pad_token_id)
    assert importance.heads[1][1] == 0 and (importance.heads[1][[0, 2, 3]] > 0).all()
    assert importance.neurons[1][7] == 0 and importance.neurons[1].count_nonzero() == 127
    assert (importance.channels > 0).all()


def test_narrow_student_is_sliced_from_the_most_active_channels(teacher):
    model, tokenizer = teacher
    student, student_tok, info = build_student(model, tokenizer, StudentShape(layers=1, hidden=32, ffn=64),
                                               train_texts=TEXTS, max_length=32)
    assert student.config.num_attention_heads == 2  # the teacher's head size (16) is kept
    assert info["init"] == "teacher blocks [1] pruned to the most active units"
    ids = tokenizer(TEXTS, truncation=True, max_length=32)["input_ids"]
    channels = activation_importance(model, ids, tokenizer.pad_token_id).channels.topk(32).indices.sort().values
    piece = "pizza"
    t_row = model.bert.embeddings.word_embeddings.weight[tokenizer.convert_tokens_to_ids(piece)]
    s_row = student.bert.embeddings.word_embeddings.weight[student_tok.convert_tokens_to_ids(piece)]
    assert torch.equal(s_row, t_row[channels])
    assert torch.equal(student.classifier.weight, model.classifier.weight[:, channels])


def test_padding_does_not_count_towards_importance(teacher):
    model, tokenizer = teacher
    short, long_ = tokenizer(["sunny", "a bowl of soup with bread and butter"])["input_ids"]
    alone = activation_importance(model, [short], tokenizer.pad_token_id, batch_size=1)
    # In one padded batch the means run over the real tokens of both texts only: the token-weighted
    # average of each text measured alone.
    padded = activation_importance(model, [short, long_], tokenizer.pad_token_id, batch_size=2)
    long_alone = activation_importance(model, [long_], tokenizer.pad_token_id, batch_size=1)
    n_short, n_long = len(short), len(long_)
    expected = (alone.channels * n_short + long_alone.channels * n_long) / (n_short + n_long)
    torch.testing.assert_close(padded.channels, expected, rtol=1e-4, atol=1e-5)


def test_can_prune_needs_a_bert_teacher_and_its_head_size(teacher):
    config = teacher[0].config  # hidden 64, 4 heads of 16, FFN 128, 2 layers
    assert can_prune(config, hidden=32, heads=2, ffn=64, layers=1)
    assert not can_prune(config, hidden=32, heads=4, ffn=64, layers=1)  # head size 8
    assert not can_prune(config, hidden=32, heads=2, ffn=256, layers=1)  # wider FFN than the teacher's
    assert not can_prune(config, hidden=32, heads=2, ffn=64, layers=3)


@pytest.fixture(scope="module")
def mpnet_teacher(teacher):
    """A tiny random MPNet classifier over the same tokenizer (padding id 0, so positions start at 1)."""
    from transformers import MPNetConfig, MPNetForSequenceClassification

    _, tokenizer = teacher
    torch.manual_seed(0)
    config = MPNetConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=128, max_position_embeddings=130, pad_token_id=tokenizer.pad_token_id,
                         num_labels=3, initializer_range=0.2)
    return MPNetForSequenceClassification(config).eval(), tokenizer


def test_mpnet_student_is_an_mpnet_cut_with_one_head_set_for_all_blocks(mpnet_teacher):
    model, tokenizer = mpnet_teacher
    whole, whole_tok, _ = build_student(model, tokenizer, StudentShape(layers=2, trim_vocab=False), max_length=32)
    assert type(whole).__name__ == "MPNetForSequenceClassification"
    assert whole.config.max_position_embeddings == 32 + 1
    torch.testing.assert_close(_logits(whole, whole_tok), _logits(model, tokenizer), rtol=1e-5, atol=1e-5)

    student, _, info = build_student(model, tokenizer, StudentShape(layers=2, hidden=32, ffn=64),
                                     train_texts=TEXTS, max_length=32)
    assert info["init"] == "teacher blocks [0, 1] pruned to the most active units"
    ids = tokenizer(TEXTS, truncation=True, max_length=32)["input_ids"]
    importance = activation_importance(model, ids, tokenizer.pad_token_id)
    heads = (importance.heads[0] + importance.heads[1]).topk(2).indices.sort().values
    bias = model.mpnet.encoder.relative_attention_bias.weight
    assert torch.equal(student.mpnet.encoder.relative_attention_bias.weight, bias[:, heads])
    dims = (heads.unsqueeze(1) * 16 + torch.arange(16)).flatten()
    channels = importance.channels.topk(32).indices.sort().values
    for block in (0, 1):
        q_t = model.mpnet.encoder.layer[block].attention.attn.q.weight
        assert torch.equal(student.mpnet.encoder.layer[block].attention.attn.q.weight, q_t[dims][:, channels])
