"""Tests for labelled-text loading: the real datasets, every layout, and every data error."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from smallmighty.data.classification import LabelledTexts, load_labelled_data, load_labelled_splits
from smallmighty.defaults import default_classification_data
from smallmighty.errors import DataError, SlmError

REPO = Path(__file__).resolve().parents[2]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def rows(labels: str, prefix: str = "text") -> list[dict]:
    """One record per character of `labels`, e.g. rows("aab") -> two 'a' examples and one 'b'."""
    return [{"text": f"{prefix} {i}", "label": label} for i, label in enumerate(labels)]


def named(data: LabelledTexts) -> list[str]:
    return [data.label_names[i] for i in data.labels]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ---------------------------------------------------------------- real datasets


def test_banking77_uses_labels_json_order(shared_datasets: Path) -> None:
    train, test = load_labelled_splits(shared_datasets / "banking77")
    order = json.loads((shared_datasets / "banking77" / "labels.json").read_text())
    assert (len(train), len(test)) == (10003, 3080)
    assert train.label_names == test.label_names == order and len(order) == 77
    expected = read_jsonl(shared_datasets / "banking77" / "test.jsonl")
    assert test.texts == [r["text"] for r in expected]
    assert named(test) == [r["label"] for r in expected]
    assert set(train.labels) == set(range(77))
    assert test.source == str(shared_datasets / "banking77" / "test.jsonl")


def test_sst2_splits_by_exact_and_prefix_name(shared_datasets: Path) -> None:
    train, test = load_labelled_splits(shared_datasets / "sst2")
    assert (len(train), len(test)) == (67349, 1821)
    assert train.label_names == ["0", "1"]
    assert test.source.endswith("test_sst_binary_labeled.jsonl")
    first = read_jsonl(shared_datasets / "sst2" / "test_sst_binary_labeled.jsonl")[0]
    assert (test.texts[0], test.labels[0]) == (first["text"], first["label"])

    _, validation = load_labelled_splits(shared_datasets / "sst2", test_split="validation")
    assert len(validation) == 872
    assert Counter(named(validation)) == {"1": 444, "0": 428}


def test_sms_spam_split_dir_and_all_file_agree(shared_datasets: Path) -> None:
    """all.jsonl, split by us, reproduces the documented stratified split behind train/test.jsonl."""
    train, test = load_labelled_splits(shared_datasets / "sms_spam")
    assert (len(train), len(test)) == (4460, 1114)
    assert train.label_names == ["ham", "spam"]
    assert Counter(named(test)) == {"ham": 965, "spam": 149}

    split_train, split_test = load_labelled_splits(shared_datasets / "sms_spam" / "all.jsonl", seed=0)
    assert split_train.texts == train.texts and split_test.texts == test.texts
    assert split_train.labels == train.labels and split_test.labels == test.labels


def test_bbc_label_folders_stratified(caplog: pytest.LogCaptureFixture) -> None:
    root = Path(default_classification_data())
    counts = {folder.name: len(list(folder.glob("*.txt"))) for folder in root.iterdir()}
    with caplog.at_level(logging.WARNING):
        train, test = load_labelled_splits(root)
    assert train.label_names == sorted(counts) and len(counts) == 5
    assert len(train) + len(test) == sum(counts.values()) == 2225
    assert Counter(named(test)) == {name: round(0.2 * n) for name, n in counts.items()}
    assert all(text == text.strip() and text for text in train.texts + test.texts)
    # The one Latin-1 article is read with its pound sign, and the fallback is reported.
    assert any("£15.8m signing" in text for text in train.texts + test.texts)
    assert "199.txt, line 5: not valid UTF-8" in caplog.text

    again_train, again_test = load_labelled_splits(root)
    assert again_test.texts == test.texts and again_train.labels == train.labels
    _, other_test = load_labelled_splits(root, seed=1)
    assert other_test.texts != test.texts and Counter(other_test.labels) == Counter(test.labels)


def test_subsample_keeps_label_coverage_and_proportion(shared_datasets: Path) -> None:
    train, test = load_labelled_splits(shared_datasets / "banking77", max_train=200, max_test=77)
    assert (len(train), len(test)) == (200, 77)
    assert set(test.labels) == set(range(77)) and set(train.labels) == set(range(77))
    assert len(train.label_names) == 77

    few, _ = load_labelled_splits(shared_datasets / "banking77", max_train=50)
    assert len(set(few.labels)) == 50
    pair, _ = load_labelled_splits(shared_datasets / "sms_spam", max_train=2)
    assert sorted(named(pair)) == ["ham", "spam"], "coverage before proportion, even at 598 spam to 3862 ham"

    spam, _ = load_labelled_splits(shared_datasets / "sms_spam", max_train=1000)
    assert abs(Counter(named(spam))["spam"] - 1000 * 598 / 4460) <= 1

    same, _ = load_labelled_splits(shared_datasets / "sms_spam", max_train=1000)
    other, _ = load_labelled_splits(shared_datasets / "sms_spam", max_train=1000, seed=3)
    assert same.texts == spam.texts and other.texts != spam.texts
    full, _ = load_labelled_splits(shared_datasets / "sms_spam")
    kept = iter(full.texts)
    assert all(any(text == t for t in kept) for text in spam.texts), "subsample keeps file order"


# ---------------------------------------------------------------- local layouts


def test_single_csv_with_custom_fields_and_multiline_text(tmp_path: Path) -> None:
    path = tmp_path / "reviews.csv"
    body = "".join(f'{i},"review {i}, with a comma",{"good" if i % 3 else "bad"}\n' for i in range(30))
    path.write_text('id,body,verdict\n99,"spans\ntwo lines",bad\n\n' + body, encoding="utf-8")
    train, test = load_labelled_splits(path, text_field="body", label_field="verdict", test_fraction=0.3)
    assert train.label_names == ["bad", "good"]
    assert len(train) + len(test) == 31
    assert Counter(named(test)) == {"bad": round(0.3 * 11), "good": round(0.3 * 20)}
    assert "spans\ntwo lines" in train.texts + test.texts
    assert "review 5, with a comma" in train.texts + test.texts


def test_tsv_keeps_quotes_and_sorts_integer_labels_numerically(tmp_path: Path) -> None:
    lines = "".join(f'a "quoted {i} word\t{i % 3 * 5 + 2}\n' for i in range(9))
    (tmp_path / "train.tsv").write_text("sentence\tlabel\n" + lines, encoding="utf-8")
    (tmp_path / "test.tsv").write_text("sentence\tlabel\nit 's \"odd\t12\n", encoding="utf-8")
    train, test = load_labelled_splits(tmp_path, text_field="sentence")
    assert train.label_names == ["2", "7", "12"]
    assert test.texts == ['it \'s "odd'] and named(test) == ["12"]


def test_labels_json_fixes_order_and_unused_labels_are_allowed(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", rows("abab"))
    write_jsonl(tmp_path / "test.jsonl", rows("bc"))
    (tmp_path / "labels.json").write_text('["c", "b", "a", "d"]')
    train, test = load_labelled_splits(tmp_path)
    assert train.label_names == ["c", "b", "a", "d"]
    assert train.labels == [2, 1, 2, 1] and test.labels == [1, 0]


def test_int_and_string_labels_are_one_class(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", [{"text": "x", "label": 1}, {"text": "y", "label": 0}])
    write_jsonl(tmp_path / "test.jsonl", [{"text": "z", "label": "1"}])
    _, test = load_labelled_splits(tmp_path)
    assert named(test) == ["1"]


def test_saved_dataset_dict_with_class_label(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "topic": datasets.ClassLabel(names=["zeta", "alpha", "mid"])})
    splits = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"sentence": ["a", "b", "c"], "topic": [0, 1, 1]}, features),
        "validation_matched": datasets.Dataset.from_dict({"sentence": ["d"], "topic": [2]}, features),
    })
    splits.save_to_disk(str(tmp_path / "saved"))
    train, test = load_labelled_splits(tmp_path / "saved", test_split="validation",
                                       text_field="sentence", label_field="topic")
    assert train.label_names == ["zeta", "alpha", "mid"]
    assert (train.texts, train.labels) == (["a", "b", "c"], [0, 1, 1])
    assert (test.texts, test.labels) == (["d"], [2])

    with pytest.raises(DataError, match="no such column; the columns are sentence, topic") as error:
        load_labelled_splits(tmp_path / "saved", test_split="validation")
    assert error.value.field == "text"
    with pytest.raises(SlmError, match="no split 'test'; available splits: train, validation_matched"):
        load_labelled_splits(tmp_path / "saved", text_field="sentence", label_field="topic")


def test_saved_single_dataset_is_split_and_unlabelled_rows_rejected(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neg", "pos"])})
    datasets.Dataset.from_dict({"text": [f"t{i}" for i in range(10)], "label": [0, 1] * 5},
                               features).save_to_disk(str(tmp_path / "one"))
    train, test = load_labelled_splits(tmp_path / "one")
    assert (len(train), len(test)) == (8, 2) and sorted(named(test)) == ["neg", "pos"]

    datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, -1]}, features).save_to_disk(
        str(tmp_path / "hidden"))
    with pytest.raises(DataError, match=r"line 2, field 'label': label -1 is not a class index"):
        load_labelled_splits(tmp_path / "hidden")


def test_hub_name_offline_gives_clear_error() -> None:
    """The real load_dataset path, with the Hub marked offline so it fails in seconds, not after retries."""
    code = ("from smallmighty.data.classification import load_labelled_splits\n"
            "from smallmighty.errors import SlmError\n"
            "try:\n    load_labelled_splits('someone/no-such-dataset')\n"
            "except SlmError as error:\n    print('SlmError:', error)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("SlmError: 'someone/no-such-dataset' is not a local file or folder")
    assert "could not be downloaded" in result.stdout and "Pass a local path" in result.stdout


@pytest.mark.slow
def test_hub_name_without_network_gives_clear_error() -> None:
    with pytest.raises(SlmError, match="could not be downloaded from the Hugging Face Hub"):
        load_labelled_splits("someone/no-such-dataset")


@pytest.mark.parametrize("source", ["no/such/dir/train.jsonl", "./missing", "data.csv"])
def test_missing_local_path_is_named(source: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SlmError, match=f"no such file or folder: {source}"):
        load_labelled_splits(source)
    with pytest.raises(SlmError, match="no such file or folder"):
        load_labelled_splits(Path("missing"))


# ---------------------------------------------------------------- split and option errors


def test_unknown_and_ambiguous_split_names(shared_datasets: Path) -> None:
    available = "test_sst_binary_labeled, train, validation"
    with pytest.raises(SlmError, match=f"sst2: no split 'dev'; available splits: {available}") as error:
        load_labelled_splits(shared_datasets / "sst2", test_split="dev")
    assert not isinstance(error.value, DataError)
    with pytest.raises(SlmError, match=r"split 't' is ambiguous \(test, train\)"):
        load_labelled_splits(shared_datasets / "sms_spam", train_split="t")


def test_two_files_for_one_split(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", rows("ab"))
    (tmp_path / "train.csv").write_text("text,label\nx,a\n")
    with pytest.raises(SlmError, match="two files for split 'train'"):
        load_labelled_splits(tmp_path)


@pytest.mark.parametrize("options, message", [
    ({"test_fraction": 0.0}, "test_fraction must be between 0 and 1"),
    ({"test_fraction": 1.0}, "test_fraction must be between 0 and 1"),
    ({"max_train": 0}, "max_train must be at least 1"),
    ({"max_test": -1}, "max_test must be at least 1"),
])
def test_bad_options(options: dict, message: str, tmp_path: Path) -> None:
    with pytest.raises(SlmError, match=message):
        load_labelled_splits(write_jsonl(tmp_path / "d.jsonl", rows("aabb")), **options)


def test_every_label_keeps_a_training_example(tmp_path: Path) -> None:
    train, test = load_labelled_splits(write_jsonl(tmp_path / "d.jsonl", rows("aaaaab")), test_fraction=0.6)
    assert named(train).count("b") == 1 and Counter(named(test)) == {"a": 3}


def test_too_few_examples_to_split_and_unknown_file_type(tmp_path: Path) -> None:
    with pytest.raises(SlmError, match=r"too few examples \(2\) to hold out"):
        load_labelled_splits(write_jsonl(tmp_path / "d.jsonl", rows("ab")))
    (tmp_path / "d.txt").write_text("hello")
    with pytest.raises(SlmError, match="unsupported file type '.txt'"):
        load_labelled_splits(tmp_path / "d.txt")


def test_folder_with_nothing_to_read(tmp_path: Path) -> None:
    (tmp_path / "notes.md").write_text("hi")
    with pytest.raises(SlmError, match="found no split files"):
        load_labelled_splits(tmp_path)


# ---------------------------------------------------------------- data errors, located


GOOD = '{"text": "fine", "label": "a"}\n'


@pytest.mark.parametrize("name, content, line, field, message", [
    ("missing text key", GOOD + '{"body": "x", "label": "a"}\n', 2, "text",
     "missing text field; this line has keys body, label"),
    ("missing label key", GOOD + '{"text": "x"}\n', 2, "label", "missing label field"),
    ("invalid JSON", GOOD + GOOD + '{"text": "x", "label": }\n', 3, None, "invalid JSON: Expecting value"),
    ("not an object", GOOD + '["x", "a"]\n', 2, None, "expected a JSON object"),
    ("empty text", GOOD + '{"text": "", "label": "a"}\n', 2, "text", "empty text"),
    ("whitespace text", '{"text": " \\t\\n", "label": "a"}\n', 1, "text", "whitespace-only text"),
    ("text not a string", GOOD + '{"text": 5, "label": "a"}\n', 2, "text", "text must be a string"),
    ("null label", GOOD + GOOD + GOOD + '{"text": "x", "label": null}\n', 4, "label", "label is null"),
    ("float label", GOOD + '{"text": "x", "label": 1.5}\n', 2, "label",
     "label must be a string or an integer, got 1.5"),
    ("bool label", GOOD + '{"text": "x", "label": true}\n', 2, "label",
     "label must be a string or an integer"),
    ("empty label", GOOD + '{"text": "x", "label": " "}\n', 2, "label", "empty label"),
])
def test_jsonl_errors(name: str, content: str, line: int, field: str | None, message: str,
                      tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text(content, encoding="utf-8")
    write_jsonl(tmp_path / "test.jsonl", rows("a"))
    with pytest.raises(DataError) as error:
        load_labelled_splits(tmp_path)
    assert (error.value.file, error.value.line, error.value.field) == (str(path), line, field)
    assert message in str(error.value)
    assert str(error.value).startswith(f"{path}, line {line}")


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_empty_files(suffix: str, tmp_path: Path) -> None:
    for content in ("", "\n\n"):
        (tmp_path / f"d{suffix}").write_text(content)
        with pytest.raises(DataError, match="empty file") as error:
            load_labelled_splits(tmp_path / f"d{suffix}")
        assert error.value.file == str(tmp_path / f"d{suffix}")
    (tmp_path / "d.csv").write_text("text,label\n")
    with pytest.raises(DataError, match="empty file: no examples"):
        load_labelled_splits(tmp_path / "d.csv")


def test_non_utf8_bytes_name_the_line(tmp_path: Path) -> None:
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_bytes(GOOD.encode() * 2 + b'{"text": "caf\xe9", "label": "a"}\n')
    with pytest.raises(DataError, match=r"d.jsonl, line 3: not valid UTF-8 \(byte 0xe9\)"):
        load_labelled_splits(jsonl)
    csv_file = tmp_path / "d.csv"
    csv_file.write_bytes(b"\xef\xbb\xbftext,label\nok,a\n\xff,b\n")
    with pytest.raises(DataError, match=r"d.csv, line 3: not valid UTF-8 \(byte 0xff\)"):
        load_labelled_splits(csv_file)


def test_csv_errors_are_located(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("text,category\nx,a\n")
    with pytest.raises(DataError, match="line 1, field 'label': no such column; the header has text, cat"):
        load_labelled_splits(path)
    path.write_text('text,label\n"two\nlines",a\n"four\nlines",too,many\n')
    with pytest.raises(DataError, match="line 4: 3 fields, but the header has 2"):
        load_labelled_splits(path)
    path.write_text('text,label\n"ok",a\n"unterminated,a\n')
    with pytest.raises(DataError, match="malformed CSV"):
        load_labelled_splits(path)
    path.write_text("text,label\nx,a\n   ,b\n")
    with pytest.raises(DataError, match="line 3, field 'text': whitespace-only text"):
        load_labelled_splits(path)
    path.write_text("text,label\nx,a\ny,\n")
    with pytest.raises(DataError, match="line 3, field 'label': empty label"):
        load_labelled_splits(path)


def test_test_label_never_seen_in_training(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", rows("ab"))
    write_jsonl(tmp_path / "test.jsonl", rows("abac"))
    with pytest.raises(DataError) as error:
        load_labelled_splits(tmp_path)
    located = (error.value.file, error.value.line, error.value.field)
    assert located == (str(tmp_path / "test.jsonl"), 4, "label")
    assert "label 'c' in the test split never appears in training (training labels: a, b)" in str(error.value)


@pytest.mark.parametrize("content, message", [
    ('{"a": 0}', "expected a JSON list of label names"),
    ("[]", "expected a JSON list of label names"),
    ('["a", 2]', "item 1 is 2 (int)"),
    ('["a", ""]', "item 1 is ''"),
    ('["a", "a"]', "label 'a' is listed twice"),
    ('["a",\n "b",]', "line 2: invalid JSON"),
])
def test_bad_labels_json(content: str, message: str, tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", rows("ab"))
    write_jsonl(tmp_path / "test.jsonl", rows("ab"))
    (tmp_path / "labels.json").write_text(content)
    with pytest.raises(DataError, match=re.escape(message)) as error:
        load_labelled_splits(tmp_path)
    assert error.value.file == str(tmp_path / "labels.json")


def test_label_not_in_labels_json(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", rows("ab"))
    write_jsonl(tmp_path / "test.jsonl", rows("bz"))
    (tmp_path / "labels.json").write_text('["a", "b"]')
    with pytest.raises(DataError) as error:
        load_labelled_splits(tmp_path)
    located = (error.value.file, error.value.line, error.value.field)
    assert located == (str(tmp_path / "test.jsonl"), 2, "label")
    assert f"label 'z' is not in {tmp_path / 'labels.json'}" in str(error.value)


def test_label_folder_errors(tmp_path: Path) -> None:
    for label in ("pos", "neg"):
        (tmp_path / label).mkdir()
        for i in range(3):
            (tmp_path / label / f"{i}.txt").write_text(f"  {label} text {i}\n")
    train, test = load_labelled_splits(tmp_path, test_fraction=0.34)
    assert train.label_names == ["neg", "pos"] and "neg text 0" in train.texts + test.texts

    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="label folder has no .txt files") as error:
        load_labelled_splits(tmp_path)
    assert error.value.file == str(tmp_path / "empty")
    (tmp_path / "empty").rmdir()

    (tmp_path / "pos" / "9.txt").write_text(" \n")
    with pytest.raises(DataError, match="9.txt: empty text"):
        load_labelled_splits(tmp_path)
    # 0x81 is undefined in Windows-1252 too, so there is no reading to fall back on.
    (tmp_path / "pos" / "9.txt").write_bytes(b"ok\nbad \x81 byte")
    with pytest.raises(DataError, match=r"9.txt, line 2: not valid UTF-8 \(byte 0x81\)"):
        load_labelled_splits(tmp_path)
    (tmp_path / "pos" / "9.txt").unlink()

    (tmp_path / "labels.json").write_text('["pos"]')
    with pytest.raises(DataError, match=f"label 'neg' is not in {tmp_path / 'labels.json'}"):
        load_labelled_splits(tmp_path)


# ---------------------------------------------------------------- validation split


def test_validation_is_carved_stratified_disjoint_and_reproducible(shared_datasets: Path) -> None:
    data = load_labelled_data(shared_datasets / "banking77")
    train, test = load_labelled_splits(shared_datasets / "banking77")
    assert len(data.train) + len(data.validation) == len(train) and data.test.texts == test.texts
    assert len(data.validation) == 1003  # round(10% of each label's count), summed over the 77 labels
    # Disjoint: every training example lands in exactly one of train / validation, none in test.
    assert sorted(data.train.texts + data.validation.texts) == sorted(train.texts)
    assert not set(data.validation.texts) & set(data.train.texts)
    assert not set(data.validation.texts) & set(test.texts)
    # Stratified: each label's share of the validation split is its share of the training data.
    whole, held = Counter(train.labels), Counter(data.validation.labels)
    assert set(held) == set(whole)
    assert all(abs(held[label] - 0.1 * n) <= 1 for label, n in whole.items())
    assert data.validation.label_names == data.train.label_names == data.test.label_names
    assert data.validation_origin == "1003 of the 10003 training examples (stratified, seed 0)"
    again = load_labelled_data(shared_datasets / "banking77")
    assert again.validation.texts == data.validation.texts and again.train.texts == data.train.texts
    other = load_labelled_data(shared_datasets / "banking77", seed=1)
    assert other.validation.texts != data.validation.texts


def test_validation_uses_the_datas_own_split(shared_datasets: Path, tmp_path: Path) -> None:
    data = load_labelled_data(shared_datasets / "sst2")
    assert (len(data.train), len(data.validation), len(data.test)) == (67349, 872, 1821)
    assert "own split 'validation'" in data.validation_origin
    assert Counter(named(data.validation)) == {"1": 444, "0": 428}

    write_jsonl(tmp_path / "train.jsonl", rows("aabb" * 5))
    write_jsonl(tmp_path / "test.jsonl", rows("ab"))
    write_jsonl(tmp_path / "dev.jsonl", rows("ba", prefix="dev"))
    named_dev = load_labelled_data(tmp_path)
    assert named_dev.validation.texts == ["dev 0", "dev 1"] and len(named_dev.train) == 20
    carved = load_labelled_data(tmp_path, validation_fraction=0.2, validation_split="dev")
    assert carved.validation.texts == ["dev 0", "dev 1"]
    with pytest.raises(SlmError, match="no split 'holdout'"):
        load_labelled_data(tmp_path, validation_split="holdout")


def test_validation_from_a_single_file_after_the_test_split(shared_datasets: Path) -> None:
    data = load_labelled_data(shared_datasets / "sms_spam" / "all.jsonl", validation_fraction=0.1)
    assert len(data.train) + len(data.validation) + len(data.test) == 5574
    assert Counter(named(data.validation)) == {"ham": 386, "spam": 60}  # 10% of each label of the 4,460


def test_many_rare_labels_still_give_a_validation_split(tmp_path: Path) -> None:
    """150 labels with 4 examples each: 10% rounds to none per label, but 60 labels give one each."""
    records = [{"text": f"label {k} text {i}", "label": f"L{k}"} for k in range(150) for i in range(4)]
    write_jsonl(tmp_path / "train.jsonl", records)
    write_jsonl(tmp_path / "test.jsonl", records[:3])
    data = load_labelled_data(tmp_path, validation_fraction=0.1)
    assert len(data.validation) == 60 and len(set(data.validation.labels)) == 60
    assert len(data.train) == 540 and len(set(data.train.labels)) == 150  # every label keeps 3 to learn from
    with pytest.raises(SlmError, match="too few examples"):
        load_labelled_data(write_jsonl(tmp_path / "one.jsonl", rows("abcabc")), validation_fraction=0.1,
                           test_fraction=0.4)
    with pytest.raises(SlmError, match="validation_fraction must be between 0 and 1"):
        load_labelled_data(tmp_path, validation_fraction=1.0)
