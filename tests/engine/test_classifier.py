"""load_classifier: every runtime tokenizes the same way and predicts like transformers' model."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from folders import folder_bytes
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from smallmighty.engine.classifier import load_classifier, runtime_file
from smallmighty.errors import SlmError

LABELS = ["billing", "card", "transfer"]
MAX_LENGTH = 32
TEXTS = [
    "How do I locate my card?",
    "why was I charged twice for one transfer " * 10,  # far longer than MAX_LENGTH: truncated
    "top up",
    "My card has not arrived yet, I ordered it over a week ago.",
    "Can I get a refund?",
]


def save_random_classifier(encoder_dir, out_dir, labels: list[str], max_length: int):
    """A classifier over `encoder_dir` with a random head, saved with its tokenizer. The head is
    drawn wider than HF's default (std 0.5, not 0.02) so logits are of order 1 and argmaxes are
    decided by real margins."""
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        encoder_dir, num_labels=len(labels), id2label=dict(enumerate(labels)))
    torch.nn.init.normal_(model.classifier.weight, std=0.5)
    model.save_pretrained(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(encoder_dir)
    tokenizer.model_max_length = max_length
    tokenizer.save_pretrained(out_dir)
    return model.eval(), tokenizer


def reference_logits(model, tokenizer, texts: list[str], max_length: int) -> np.ndarray:
    enc = tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    with torch.inference_mode():
        return model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.numpy()


@pytest.fixture(scope="module")
def classifier_dir(tiny_encoder_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-classifier")
    model, tokenizer = save_random_classifier(tiny_encoder_dir, path, LABELS, MAX_LENGTH)
    return path, reference_logits(model, tokenizer, TEXTS, MAX_LENGTH)


@pytest.mark.parametrize("runtime", ["torch", "onnx", "onnx-int8"])
def test_every_runtime_predicts_like_transformers(classifier_dir, runtime):
    path, expected = classifier_dir
    clf = load_classifier(str(path), runtime)
    assert clf.label_names == LABELS and clf.max_length == MAX_LENGTH
    logits = clf.predict_logits(TEXTS)
    assert logits.shape == (len(TEXTS), len(LABELS)) and logits.dtype == np.float32
    if runtime == "onnx-int8":
        assert np.abs(logits - expected).max() < 0.25 * np.abs(expected).max()
        assert (logits.argmax(1) == expected.argmax(1)).mean() >= 0.8
    else:
        np.testing.assert_allclose(logits, expected, atol=1e-4)
    assert clf.predict(TEXTS) == [LABELS[i] for i in logits.argmax(1)]


def test_torch_runtime_runs_one_text_on_one_thread_then_restores_the_count(classifier_dir, monkeypatch):
    clf = load_classifier(str(classifier_dir[0]), "torch")
    before, calls = torch.get_num_threads(), []
    real_set = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (calls.append(n), real_set(n)))
    clf.predict(TEXTS[:1])
    assert calls == [1, before] and torch.get_num_threads() == before
    calls.clear()
    clf.predict(TEXTS[:2])
    assert calls == [before]


def test_padding_to_a_longer_neighbour_does_not_change_logits(classifier_dir):
    clf = load_classifier(str(classifier_dir[0]), "onnx")
    alone = clf.predict_logits(TEXTS[:1])
    with_long_neighbour = clf.predict_logits([TEXTS[0], TEXTS[1]])
    np.testing.assert_allclose(with_long_neighbour[:1], alone, atol=1e-5)


def test_onnx_file_is_made_once_in_the_cache_and_remade_when_the_weights_change(classifier_dir, tmp_path):
    path = tmp_path / "model"
    shutil.copytree(classifier_dir[0], path)
    before = folder_bytes(path)
    load_classifier(str(path), "onnx")
    onnx_file = runtime_file(path, "onnx")
    assert onnx_file.is_file() and path not in onnx_file.parents
    first = onnx_file.stat().st_mtime_ns
    load_classifier(str(path), "onnx")
    assert runtime_file(path, "onnx").stat().st_mtime_ns == first  # reused, not re-exported
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-4:] = bytes(4)  # as if the model had been retrained after the export
    weights.write_bytes(bytes(data))
    load_classifier(str(path), "onnx")
    assert runtime_file(path, "onnx") != onnx_file
    assert folder_bytes(path) == before | {"model.safetensors": bytes(data)}  # nothing written beside it


def test_long_texts_are_read_in_windows_whose_logits_are_averaged(classifier_dir, tmp_path):
    """A model saved with windows > 1 reads a long text as consecutive windows of its length (each
    with its own [CLS] and [SEP]) and averages their logits; short texts are one window, as before."""
    path = tmp_path / "windows"
    shutil.copytree(classifier_dir[0], path)
    (path / "smallmighty.json").write_text(json.dumps({"max_length": MAX_LENGTH, "windows": 3}))
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    long_text = " ".join(f"charge number {i} on my card" for i in range(40))  # about 8 windows of 32
    pieces = tokenizer(long_text, add_special_tokens=False)["input_ids"]
    body = MAX_LENGTH - 2
    windows = [tokenizer.decode(pieces[i * body:(i + 1) * body]) for i in range(3)]
    expected = reference_logits(model, tokenizer, windows, MAX_LENGTH).mean(axis=0)
    for runtime in ("torch", "onnx"):
        clf = load_classifier(str(path), runtime)
        assert clf.windows == 3
        logits = clf.predict_logits([TEXTS[0], long_text, TEXTS[2]])
        np.testing.assert_allclose(logits[1], expected, atol=1e-4)
        np.testing.assert_allclose(logits[[0, 2]], classifier_dir[1][[0, 2]], atol=1e-4)


def test_empty_and_string_inputs(classifier_dir):
    clf = load_classifier(str(classifier_dir[0]), "torch")
    assert clf.predict_logits([]).shape == (0, len(LABELS))
    with pytest.raises(SlmError, match="list of texts"):
        clf.predict("one text")


def test_bad_runtime_and_bad_folders_are_clear_errors(tiny_encoder_dir, classifier_dir, tmp_path):
    with pytest.raises(SlmError, match="unknown runtime 'tensorrt'"):
        load_classifier(str(classifier_dir[0]), "tensorrt")
    with pytest.raises(SlmError, match="not found: .*missing"):
        load_classifier(str(tmp_path / "missing"))
    for runtime in ("torch", "onnx"):  # a base encoder has no classification head
        with pytest.raises(SlmError, match=f"{tiny_encoder_dir}.*no sequence classifier"):
            load_classifier(str(tiny_encoder_dir), runtime)
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(classifier_dir[0] / name, no_tokenizer / name)
    with pytest.raises(SlmError, match="no-tokenizer has no tokenizer"):
        load_classifier(str(no_tokenizer))
    mismatched = tmp_path / "mismatched"
    shutil.copytree(classifier_dir[0], mismatched)
    config = json.loads((mismatched / "config.json").read_text())
    (mismatched / "config.json").write_text(json.dumps(config | {"vocab_size": 1000}))
    with pytest.raises(SlmError, match="tokenizer has 30522 tokens but the model only 1000"):
        load_classifier(str(mismatched))
    (no_tokenizer / "config.json").write_text("{not json")
    with pytest.raises(SlmError, match="config.json, line 1: not valid JSON"):
        load_classifier(str(no_tokenizer))


def test_read_only_cache_is_a_clear_error(classifier_dir, tmp_path, monkeypatch):
    from smallmighty.compress import onnx_export

    copy = tmp_path / "copy"
    shutil.copytree(classifier_dir[0], copy)
    monkeypatch.setenv("SLM_CACHE_DIR", str(tmp_path / "cache"))

    def refuse(*args, **kwargs):  # what a read-only cache does to the export (root ignores chmod)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(onnx_export, "export_onnx", refuse)
    with pytest.raises(SlmError, match="cannot write the ONNX export into the cache at .*SLM_CACHE_DIR"):
        load_classifier(str(copy), "onnx")


@pytest.mark.slow
def test_minilm_teacher_on_onnx_runtime_matches_torch(shared_datasets, tmp_path):
    from smallmighty.defaults import default_teacher_encoder

    texts = [json.loads(line)["text"] for line in
             (shared_datasets / "banking77" / "test.jsonl").read_text().splitlines()[:64]]
    labels = [f"intent_{i}" for i in range(77)]
    model, tokenizer = save_random_classifier(default_teacher_encoder(), tmp_path, labels, 64)
    expected = reference_logits(model, tokenizer, texts, 64)
    for runtime in ("torch", "onnx"):
        logits = np.concatenate([load_classifier(str(tmp_path), runtime).predict_logits(texts[i:i + 16])
                                 for i in range(0, len(texts), 16)])
        np.testing.assert_allclose(logits, expected, atol=1e-4)
    # A random 77-way head leaves top-2 margins of a few hundredths, so judge int8 by how well it
    # keeps the logits rather than by exact argmax agreement.
    int8 = load_classifier(str(tmp_path), "onnx-int8").predict_logits(texts)
    assert np.corrcoef(int8.ravel(), expected.ravel())[0, 1] > 0.95
    top3 = np.argsort(int8, axis=1)[:, -3:]
    assert np.mean([e in row for e, row in zip(expected.argmax(1), top3)]) >= 0.9
