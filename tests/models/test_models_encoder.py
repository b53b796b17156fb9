"""Student construction: shapes, vocabulary trimming, initialisation, standard save/load."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from smallmighty.errors import SlmError
from smallmighty.models.encoder import (
    StudentShape,
    build_student,
    count_parameters,
    load_encoder_classifier,
    save_classifier,
    trimmed_vocabulary,
)

TEXTS = ["the weather is sunny today", "pizza and pasta for dinner", "our team scored a late goal"]
LABELS = ["weather", "food", "sport"]


@pytest.fixture(scope="module")
def teacher(tiny_encoder_dir):
    return load_encoder_classifier(str(tiny_encoder_dir), LABELS)


def test_loading_base_encoder_adds_head_for_labels(teacher):
    model, _ = teacher
    assert model.config.num_labels == 3
    assert [model.config.id2label[i] for i in range(3)] == LABELS


def test_trimmed_vocabulary_keeps_used_pieces_and_ascii(teacher):
    _, tokenizer = teacher
    keep = set(trimmed_vocabulary(tokenizer, TEXTS, 32))
    used = {i for ids in tokenizer(TEXTS)["input_ids"] for i in ids}
    assert used <= keep
    assert set(tokenizer.all_special_ids) <= keep
    assert tokenizer.convert_tokens_to_ids("##z") in keep and tokenizer.convert_tokens_to_ids("q") in keep
    assert len(keep) < 400  # ~190 ASCII pieces + specials + the texts' pieces, not 30k


def test_trimmed_student_tokenizes_training_texts_like_the_teacher(teacher):
    model, tokenizer = teacher
    student, student_tok, info = build_student(model, tokenizer, StudentShape(layers=1, hidden=32, heads=2, ffn=64),
                                               train_texts=TEXTS, max_length=32)
    for text in TEXTS:
        assert student_tok.tokenize(text) == tokenizer.tokenize(text)
    # An unseen word still splits into kept pieces rather than collapsing to [UNK].
    assert student_tok.unk_token not in student_tok.tokenize("zebra quiz")
    assert info["vocab_size"] == len(student_tok) == student.config.vocab_size
    assert student.config.max_position_embeddings == 32


def test_narrow_student_embeddings_come_from_pca_of_teacher(teacher):
    model, tokenizer = teacher
    student, student_tok, info = build_student(model, tokenizer, StudentShape(layers=1, hidden=16, heads=2, ffn=32),
                                               train_texts=TEXTS, max_length=32)
    assert info["init"] == "PCA of teacher embeddings"
    # PCA preserves the geometry best in the leading directions: pairwise distances of the
    # projected rows correlate with the teacher's.
    ids = [tokenizer.convert_tokens_to_ids(t) for t in ["pizza", "pasta", "goal", "team", "sunny"]]
    sids = [student_tok.convert_tokens_to_ids(t) for t in ["pizza", "pasta", "goal", "team", "sunny"]]
    t = model.bert.embeddings.word_embeddings.weight[ids].detach()
    s = student.bert.embeddings.word_embeddings.weight[sids].detach()
    dt, ds = torch.cdist(t, t).flatten(), torch.cdist(s, s).flatten()
    assert torch.corrcoef(torch.stack([dt, ds]))[0, 1] > 0.5


def test_same_width_student_copies_every_kth_teacher_layer(teacher):
    model, tokenizer = teacher
    student, _, info = build_student(model, tokenizer, StudentShape(layers=1, trim_vocab=False), max_length=32)
    assert info["init"] == "teacher blocks [1]"
    s_layer, t_layer = student.bert.encoder.layer[0], model.bert.encoder.layer[1]
    for (name, a), (_, b) in zip(s_layer.state_dict().items(), t_layer.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(student.bert.embeddings.word_embeddings.weight, model.bert.embeddings.word_embeddings.weight)


def test_shape_errors(teacher):
    model, tokenizer = teacher
    with pytest.raises(SlmError, match="divisible"):
        build_student(model, tokenizer, StudentShape(layers=1, hidden=30, heads=4), train_texts=TEXTS)
    with pytest.raises(SlmError, match="only 2"):
        build_student(model, tokenizer, StudentShape(layers=5, trim_vocab=False))
    with pytest.raises(SlmError, match="training texts"):
        build_student(model, tokenizer, StudentShape(layers=1, hidden=32, heads=2))


def test_save_load_round_trip_in_standard_format(teacher, tmp_path):
    model, tokenizer = teacher
    student, student_tok, _ = build_student(model, tokenizer, StudentShape(layers=1, hidden=32, heads=2, ffn=64),
                                            train_texts=TEXTS, max_length=32)
    student.eval()
    out = save_classifier(student, student_tok, tmp_path / "student", max_length=32, meta={"params": 1})
    assert (out / "model.safetensors").exists() and not list(out.glob("*.bin"))
    loaded = AutoModelForSequenceClassification.from_pretrained(out).eval()
    loaded_tok = AutoTokenizer.from_pretrained(out)
    assert loaded_tok.model_max_length == 32
    batch = loaded_tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(loaded(**batch).logits, student(**batch).logits, atol=1e-6)
    assert count_parameters(loaded) == count_parameters(student)
    assert loaded.config.id2label == {0: "weather", 1: "food", 2: "sport"}


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(SlmError, match="does not exist"):
        load_encoder_classifier(str(tmp_path / "nope"), LABELS)
