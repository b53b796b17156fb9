"""Trimming a byte-level BPE vocabulary: the corpus tokenises to the same tokens, any text round-trips."""

from __future__ import annotations

import pytest
from tiny_llama import write_tiny_llama

from smallmighty.errors import SlmError
from smallmighty.models.bpe_trim import trim_bpe_tokenizer

CORPUS = "The capital of France is Paris. What is the capital? A small model answers."
OTHER = "Zebras quietly jog — naïve café, 東京 🤖 <|im_start|>user\nhi<|im_end|>"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(write_tiny_llama(tmp_path_factory.mktemp("tiny")))


def test_the_corpus_tokenises_to_the_teachers_tokens_renumbered(tokenizer):
    used = tokenizer(CORPUS, add_special_tokens=False)["input_ids"]
    trimmed = trim_bpe_tokenizer(tokenizer, used)
    assert len(trimmed.tokenizer) < len(tokenizer)
    ids = trimmed.tokenizer(CORPUS, add_special_tokens=False)["input_ids"]
    assert trimmed.to_teacher_ids(ids) == used
    assert trimmed.from_teacher_ids(used) == ids
    # Specials sit at the front of both vocabularies, so they keep their ids.
    assert trimmed.tokenizer.eos_token_id == tokenizer.eos_token_id == 2


def test_any_text_maps_back_to_the_same_text(tokenizer, tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    trimmed = trim_bpe_tokenizer(tokenizer, tokenizer(CORPUS, add_special_tokens=False)["input_ids"])
    ids = trimmed.tokenizer(OTHER, add_special_tokens=False)["input_ids"]
    assert len(ids) >= len(tokenizer(OTHER, add_special_tokens=False)["input_ids"])  # unseen words split finer
    assert trimmed.tokenizer.decode(ids) == OTHER
    assert tokenizer.decode(trimmed.to_teacher_ids(ids)) == OTHER
    # Saved, the folder reads back the same in transformers and in plain `tokenizers` (our engine).
    trimmed.tokenizer.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path)(OTHER, add_special_tokens=False)["input_ids"] == ids
    assert Tokenizer.from_file(str(tmp_path / "tokenizer.json")).encode(OTHER, add_special_tokens=False).ids == ids


def test_an_id_outside_the_trimmed_vocabulary_is_named(tokenizer):
    trimmed = trim_bpe_tokenizer(tokenizer, [])
    with pytest.raises(SlmError, match="not in the trimmed vocabulary"):
        trimmed.from_teacher_ids([len(tokenizer) - 1])


def test_wordpiece_tokenizers_are_refused(tiny_encoder_dir):
    from transformers import AutoTokenizer

    with pytest.raises(SlmError, match="byte-level BPE.*--no-trim-vocab"):
        trim_bpe_tokenizer(AutoTokenizer.from_pretrained(tiny_encoder_dir), [5])


@pytest.mark.slow
def test_smollm2_on_tiny_shakespeare(shared_datasets):
    from smallmighty.models.causal_lm import resolve_causal_lm
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_causal_lm(None))
    text = (shared_datasets / "tinyshakespeare" / "input.txt").read_text()
    train, val = text[: len(text) * 9 // 10], text[len(text) * 9 // 10:]
    used = tokenizer(train, add_special_tokens=False)["input_ids"]
    trimmed = trim_bpe_tokenizer(tokenizer, used)
    assert len(trimmed.tokenizer) < len(tokenizer) // 3
    assert trimmed.to_teacher_ids(trimmed.tokenizer(train, add_special_tokens=False)["input_ids"]) == used
    assert tokenizer.decode(trimmed.to_teacher_ids(trimmed.tokenizer(val, add_special_tokens=False)["input_ids"])) == val
