"""`slm tokenizer train`: a byte-level BPE that round-trips any text and loads with AutoTokenizer."""

from __future__ import annotations

import json

import pytest

from smallmighty.cli import main
from smallmighty.data.tokenizer import train_tokenizer
from smallmighty.errors import DataError, SlmError


def test_trained_tokenizer_round_trips_text_and_loads_anywhere(bpe_tokenizer_dir):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bpe_tokenizer_dir)
    assert 259 < len(tok) <= 400  # bytes + specials, then merges up to the size asked for (corpus allowing)
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token_id) == ("<|endoftext|>", 0, 0)
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [1, 2]
    config = json.loads((bpe_tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    for text in ["Once upon a time there was a little cat.", "  spaces\n\nnew lines\ttabs",
                 "never seen: Zürich, 東京, emoji \U0001f600"]:
        ids = tok(text)["input_ids"]
        assert tok.decode(ids) == text
        assert Tokenizer.from_file(str(bpe_tokenizer_dir / "tokenizer.json")).encode(text).ids == ids
    assert len(tok("Once upon a time there was a little cat.")["input_ids"]) < 15  # merges were learnt


def test_cli_trains_on_jsonl_with_a_text_field(tmp_path, capsys):
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"body": f"document number {i} about cats"}) + "\n" for i in range(50)))
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--data", str(data), "--text-field", "body", "--vocab-size", "300",
                 "--out", str(out), "--special-tokens", "</s>"]) == 0
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    assert tok.eos_token == "</s>" and tok.eos_token_id == 0 and 257 < len(tok) <= 300
    assert main(["tokenizer", "train", "--data", str(data), "--out", str(tmp_path / "t2")]) == 2
    assert "line 1, field 'text': missing text field" in capsys.readouterr().err


def test_bad_settings_and_empty_corpora_are_errors(tmp_path):
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(DataError, match="empty corpus"):
        train_tokenizer(tmp_path / "empty.txt", tmp_path / "t")
    with pytest.raises(SlmError, match="vocab_size must be at least 259"):
        train_tokenizer(tmp_path / "empty.txt", tmp_path / "t", vocab_size=100)
    assert not (tmp_path / "t").exists()
