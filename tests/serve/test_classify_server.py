"""/v1/classify: a saved sequence classifier served with micro-batching, on torch and ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
from live import LiveServer

from smallmighty.engine.classifier import load_classifier
from smallmighty.serve.classify import ClassifyBatcher
from smallmighty.serve.server import is_classifier, load_service

LABELS = ["food", "sport", "weather"]
TEXTS = ["pizza and pasta for dinner", "the team scored a late goal", "rain and storm tomorrow",
         "a very long text about the forecast " * 30, ""]


@pytest.fixture(scope="module")
def classifier_dir(tiny_encoder_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A classifier folder as `slm distill` saves one: HF sequence-classification weights,
    tokenizer and label names (random head, wide enough that labels differ by text)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path_factory.mktemp("classifier") / "student"
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_encoder_dir, num_labels=len(LABELS), id2label=dict(enumerate(LABELS)))
    torch.nn.init.normal_(model.classifier.weight, std=0.5)
    model.save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(tiny_encoder_dir)
    tokenizer.model_max_length = 64
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.parametrize("runtime", ["torch", "onnx"])
def test_classify_matches_the_classifier_called_directly(classifier_dir: Path, runtime: str) -> None:
    assert is_classifier(str(classifier_dir))
    server = LiveServer(load_service(str(classifier_dir), runtime=runtime))
    try:
        answer = httpx.post(server.url + "/v1/classify", json={"input": TEXTS})
        assert answer.status_code == 200
        data = answer.json()["data"]
        expected = load_classifier(str(classifier_dir), runtime=runtime).predict_logits(TEXTS)
        probs = np.exp(expected) / np.exp(expected).sum(axis=1, keepdims=True)
        assert [d["label"] for d in data] == [LABELS[i] for i in expected.argmax(axis=1)]
        np.testing.assert_allclose([d["score"] for d in data], probs.max(axis=1), rtol=1e-4)
        assert all(abs(sum(d["scores"].values()) - 1) < 1e-6 for d in data)
        one = httpx.post(server.url + "/v1/classify", json={"input": TEXTS[1]}).json()["data"]
        assert [d["label"] for d in one] == [data[1]["label"]]
        assert httpx.get(server.url + "/health").json()["kind"] == "classifier"
        assert server.metric("slm_classified_texts_total") == len(TEXTS) + 1
    finally:
        server.close()


def test_concurrent_requests_share_batches_and_get_their_own_answers(classifier_dir: Path) -> None:
    classifier = load_classifier(str(classifier_dir), runtime="torch")
    batches: list[int] = []
    predict = classifier.predict_logits

    def recording(texts: list[str]) -> np.ndarray:
        batches.append(len(texts))
        return predict(texts)

    classifier.predict_logits = recording
    batcher = ClassifyBatcher(classifier, max_batch=64)
    try:
        blocker = batcher.submit(["first"])  # the batcher is busy with this while the rest queue up
        futures = [batcher.submit([text]) for text in TEXTS * 4]
        blocker.result(30)
        labels = [f.result(30)[0]["label"] for f in futures]
        alone = [r["label"] for r in batcher.submit(TEXTS).result(30)]
        assert labels == alone * 4
        assert max(batches) > 1  # later requests were run together
    finally:
        batcher.stop()


@pytest.mark.parametrize("body", [{}, {"input": []}, {"input": 3}, {"input": [1, 2]}, {"input": ["a"] * 300},
                                  {"input": "a", "extra": 1}, [1]])
def test_bad_classify_requests_get_400(classifier_dir: Path, body) -> None:
    server = LiveServer(load_service(str(classifier_dir), runtime="torch"))
    try:
        answer = httpx.post(server.url + "/v1/classify", json=body)
        assert answer.status_code == 400 and answer.json()["error"]["type"] == "invalid_request_error"
        # A classifier server has no generation routes.
        assert httpx.post(server.url + "/v1/chat/completions", json={}).status_code == 404
    finally:
        server.close()
