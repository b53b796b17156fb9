"""The hand-written BERT forward matches transformers, and its ONNX export matches torch."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    MPNetConfig,
    MPNetForSequenceClassification,
)

from smallmighty.compress import onnx_export
from smallmighty.compress.onnx_export import (
    export_onnx,
    ort_session,
    quantize_onnx_int8,
)
from smallmighty.errors import SlmError
from smallmighty.models.bert_encoder import from_hf_state_dict, load_bert_classifier


def random_bert_classifier(hidden_act: str = "gelu", num_labels: int = 4) -> BertForSequenceClassification:
    """A tiny random BERT classifier. initializer_range 0.2 (not 0.02) makes logits of order 1, so a
    wrong forward shows up as a large difference rather than hiding under tiny logits."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=500, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=96, max_position_embeddings=40, hidden_act=hidden_act,
                        initializer_range=0.2, num_labels=num_labels)
    return BertForSequenceClassification(config).eval()


def ragged_batch(vocab: int, lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids padded (with 0) to the longest length, and the matching attention mask."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(1, vocab, (n,), generator=gen)
        mask[row, :n] = 1
    return ids, mask


@pytest.fixture(scope="module")
def saved_classifier(tmp_path_factory):
    """(folder, HF model) of a tiny classifier saved the standard way."""
    path = tmp_path_factory.mktemp("bert-cls")
    hf = random_bert_classifier()
    hf.save_pretrained(path)
    return path, hf


@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_new", "relu"])
def test_hand_written_forward_matches_transformers_on_padded_batch(hidden_act):
    hf = random_bert_classifier(hidden_act)
    ours = from_hf_state_dict(hf.config, hf.state_dict())
    ids, mask = ragged_batch(hf.config.vocab_size, [17, 9, 1, 30])
    with torch.inference_mode():
        expected = hf(input_ids=ids, attention_mask=mask).logits
        got = ours(ids, mask)
    assert expected.abs().max() > 0.1  # the comparison below is not between near-zero numbers
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def random_mpnet_classifier() -> MPNetForSequenceClassification:
    """A tiny random MPNet classifier (padding id 1, positions offset by 2, relative-position bias)."""
    torch.manual_seed(0)
    config = MPNetConfig(vocab_size=500, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=96, max_position_embeddings=42, initializer_range=0.2, num_labels=3)
    return MPNetForSequenceClassification(config).eval()


def mpnet_batch(lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """MPNet derives positions from the ids, so padding must be its padding id and no real token may be."""
    ids, mask = ragged_batch(498, lengths, seed)
    return torch.where(mask.bool(), ids + 1, torch.ones_like(ids)), mask


def test_hand_written_forward_matches_transformers_mpnet():
    hf = random_mpnet_classifier()
    ours = from_hf_state_dict(hf.config, hf.state_dict())
    ids, mask = mpnet_batch([17, 9, 1, 40])  # 40 tokens: relative distances out to the far buckets
    with torch.inference_mode():
        expected = hf(input_ids=ids, attention_mask=mask).logits
        got = ours(ids, mask)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_mpnet_export_is_exact_where_transformers_export_is_not(tmp_path):
    hf = random_mpnet_classifier()
    hf.save_pretrained(tmp_path)
    session = ort_session(export_onnx(tmp_path), threads=1)
    for lengths in ([3], [40, 12], [5, 5, 2, 33, 21, 8]):
        ids, mask = mpnet_batch(lengths, seed=len(lengths))
        got = session.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
        with torch.inference_mode():
            expected = hf(input_ids=ids, attention_mask=mask).logits.numpy()
        np.testing.assert_allclose(got, expected, atol=1e-4)


def test_padding_does_not_change_a_rows_logits(saved_classifier):
    path, _ = saved_classifier
    model = load_bert_classifier(path)
    ids, mask = ragged_batch(500, [6, 25])
    with torch.inference_mode():
        batched = model(ids, mask)
        alone = model(ids[:1, :6], mask[:1, :6])
    torch.testing.assert_close(batched[0:1], alone, atol=1e-5, rtol=1e-5)


def test_load_rejects_folders_without_a_classifier(tmp_path):
    with pytest.raises(SlmError, match="not found"):
        load_bert_classifier(tmp_path / "nope")
    with pytest.raises(SlmError, match="config.json is missing"):
        load_bert_classifier(tmp_path)
    hf = random_bert_classifier()
    hf.bert.save_pretrained(tmp_path)  # an encoder only: no classifier head
    with pytest.raises(SlmError, match="no classifier head"):
        load_bert_classifier(tmp_path)


def test_unsupported_activation_is_a_clear_error():
    hf = random_bert_classifier()
    config = hf.config.to_dict() | {"hidden_act": "mish"}
    with pytest.raises(SlmError, match="hidden_act 'mish'"):
        from_hf_state_dict(config, hf.state_dict())


def test_export_runs_in_onnx_runtime_like_torch_at_any_batch_and_length(saved_classifier):
    path, hf = saved_classifier
    out = export_onnx(path)
    assert out == path / "model.onnx" and out.is_file()
    session = ort_session(out, threads=1)
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    for lengths in ([3], [40, 12], [5, 5, 2, 33, 21, 8]):  # not the shapes the export traced
        ids, mask = ragged_batch(hf.config.vocab_size, lengths, seed=len(lengths))
        got = session.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
        with torch.inference_mode():
            expected = hf(input_ids=ids, attention_mask=mask).logits.numpy()
        np.testing.assert_allclose(got, expected, atol=1e-4)


def test_export_refuses_a_graph_that_disagrees_with_torch(saved_classifier, tmp_path, monkeypatch):
    real_export = torch.onnx.export

    def export_perturbed_copy(model, *args, **kwargs):
        wrong = copy.deepcopy(model)
        with torch.no_grad():
            wrong.classifier.bias += 0.5
        return real_export(wrong, *args, **kwargs)

    monkeypatch.setattr(onnx_export.torch.onnx, "export", export_perturbed_copy)
    out = tmp_path / "bad.onnx"
    with pytest.raises(SlmError, match=r"disagrees with torch: max \|logit diff\| = 0.5"):
        export_onnx(saved_classifier[0], out)
    assert not out.exists()


def test_int8_quantization_keeps_predictions_close(saved_classifier, tmp_path):
    path, hf = saved_classifier
    fp32 = export_onnx(path, tmp_path / "m.onnx")
    int8 = quantize_onnx_int8(fp32, tmp_path / "m.int8.onnx")
    assert int8.stat().st_size < fp32.stat().st_size
    ids, mask = ragged_batch(hf.config.vocab_size, [4, 9, 15, 22, 30, 36, 11, 7], seed=3)
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    a = ort_session(fp32).run(["logits"], feeds)[0]
    b = ort_session(int8).run(["logits"], feeds)[0]
    assert np.abs(a - b).max() < 0.25 * np.abs(a).max()
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.75


def test_quantize_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(SlmError, match="ONNX model not found"):
        quantize_onnx_int8(tmp_path / "missing.onnx", tmp_path / "out.onnx")
