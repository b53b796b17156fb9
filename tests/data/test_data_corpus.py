"""Text corpora: every layout, packing with EOS between documents, the cache, and every input error."""

from __future__ import annotations

import json

import numpy as np
import pytest

from smallmighty.data import corpus as corpus_module
from smallmighty.data.corpus import load_corpus, pack, read_documents, tokenize_corpus
from smallmighty.errors import DataError


@pytest.fixture(scope="module")
def tok(bpe_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bpe_tokenizer_dir)


def ids_of(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_documents_are_followed_by_eos_and_packed_into_rows(tok, tmp_path):
    docs = ["The cat liked to play.", "One day the dog came.", "They became good friends in the sun."]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"body": d}) + "\n" for d in docs) + "\n", encoding="utf-8")
    stream = tokenize_corpus(path, tok, text_field="body", progress=False)
    expected = [i for d in docs for i in ids_of(tok, d) + [tok.eos_token_id]]
    assert stream.tolist() == expected
    rows = pack(stream, 4)
    assert rows.shape == (len(expected) // 4, 4)
    assert rows.flatten().tolist() == expected[: rows.numel()]  # the ragged end is dropped


def test_validation_is_the_tail_or_a_named_file(tok, tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("The cat liked to play in the sun. " * 40, encoding="utf-8")
    stream = tokenize_corpus(text, tok, progress=False).tolist()
    packed = load_corpus(text, tok, 8, val_fraction=0.25, progress=False)
    cut = len(stream) - int(len(stream) * 0.25)
    assert packed.train.flatten().tolist() == stream[: len(packed.train.flatten())]
    assert packed.validation.flatten().tolist() == stream[cut: cut + packed.validation.numel()]
    assert packed.train.numel() <= cut

    held = tmp_path / "held.txt"
    held.write_text("One day the dog came to play with the cat. " * 5, encoding="utf-8")
    separate = load_corpus(text, tok, 8, val_source=held, progress=False)
    assert separate.train.numel() == len(stream) // 8 * 8
    assert separate.validation.flatten().tolist() == tokenize_corpus(held, tok, progress=False).tolist()[
        : separate.validation.numel()]


def test_a_folder_is_its_files_in_order_and_a_saved_dataset_its_rows(tok, tmp_path):
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("second", encoding="utf-8")
    (folder / "a.txt").write_text("first", encoding="utf-8")
    (folder / "sub" / "c.jsonl").write_text('{"text": "third"}\n', encoding="utf-8")
    (folder / ".hidden.txt").write_text("never", encoding="utf-8")
    assert [d.text for d in read_documents(folder)] == ["first", "second", "third"]

    import datasets

    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"story": ["one", " ", "two"]})}).save_to_disk(saved)
    assert [(d.text, d.line) for d in read_documents(saved, text_field="story")] == [("one", 1), ("two", 3)]


def test_token_ids_are_cached_by_content_and_tokenizer(tok, tmp_path, monkeypatch):
    text = tmp_path / "a.txt"
    text.write_text("The cat liked to play.", encoding="utf-8")
    first = tokenize_corpus(text, tok, progress=False)
    monkeypatch.setattr(corpus_module, "_tokenize", lambda *a: pytest.fail("tokenised twice"))
    assert np.array_equal(tokenize_corpus(text, tok, progress=False), first)
    text.write_text("The dog liked to play.", encoding="utf-8")  # new content: a new entry
    with pytest.raises(pytest.fail.Exception, match="tokenised twice"):
        tokenize_corpus(text, tok, progress=False)


def test_long_texts_are_tokenised_in_pieces_with_the_same_ids(tok, monkeypatch, tmp_path):
    text = "The cat liked to play.\n  In the sun.\n\nOne day the dog came.\n" * 50
    path = tmp_path / "long.txt"
    path.write_text(text, encoding="utf-8")
    monkeypatch.setattr(corpus_module, "_PIECE_CHARS", 100)
    assert len(corpus_module._pieces(text)) > 10
    assert tokenize_corpus(path, tok, progress=False).tolist() == ids_of(tok, text) + [tok.eos_token_id]


@pytest.mark.parametrize("content, message", [
    (b"", r"empty corpus"),
    (b"  \n\n ", r"empty corpus"),
    (b"fine line\nsecond line \xff\xfe here\n", r"bad\.txt, line 2: not UTF-8 text"),
])
def test_bad_text_files_name_file_and_line(tok, tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_corpus(path, tok, 4, progress=False)


def test_jsonl_errors_name_file_line_and_field(tok, tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "fine"}\n{"body": "no text"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"rows\.jsonl, line 2, field 'text': missing text field \(keys: body\)"):
        load_corpus(path, tok, 4, progress=False)
    path.write_text('{"text": "fine"}\n{"text": 3}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"line 2, field 'text': text must be a string"):
        load_corpus(path, tok, 4, progress=False)
    path.write_text('{"text": "fine"}\nnot json\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"line 2: not valid JSON"):
        load_corpus(path, tok, 4, progress=False)


def test_a_corpus_smaller_than_one_sequence_is_an_error(tok, tmp_path):
    path = tmp_path / "small.txt"
    path.write_text("The cat liked to play.", encoding="utf-8")
    with pytest.raises(DataError, match=r"small\.txt: corpus too small: \d+ training tokens, fewer than one "
                                        r"sequence of 256"):
        load_corpus(path, tok, 256, progress=False)
    path.write_text("The cat liked to play. " * 20, encoding="utf-8")
    with pytest.raises(DataError, match=r"last 0\.05 of its tokens\): corpus too small: \d+ validation tokens"):
        load_corpus(path, tok, 32, val_fraction=0.05, progress=False)


def test_a_missing_path_is_an_error(tok, tmp_path):
    from smallmighty.errors import SlmError

    with pytest.raises(SlmError, match="no such file or folder"):
        load_corpus(tmp_path / "nope" / "x.txt", tok, 4, progress=False)
