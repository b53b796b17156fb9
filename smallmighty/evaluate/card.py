"""Build the report card: each model's task quality, size and speed on this CPU, side by side.

Quality comes from running the model over the test split in this process; latency, throughput
and peak memory come from a fresh child process per model (`profile_classifier`), so one model's
memory or warm caches never flatter another's. Every setting was chosen on the validation split
before this point (the card records which split chose what); the test split is scored here, once.
Each row keeps its test predictions, so the card can say how sure a difference between two models
is (`student_margins`: a paired bootstrap interval), not only how large.
"""

from __future__ import annotations

import pickle
import time
from pathlib import Path

import numpy as np

from smallmighty.data.classification import LabelledTexts
from smallmighty.evaluate.baseline import TfidfBaseline
from smallmighty.evaluate.cost import request_cost, standalone_profile
from smallmighty.evaluate.speed import (
    hardware_info,
    latency_ms,
    profile_classifier,
    throughput_per_s,
)
from smallmighty.io import read_json
from smallmighty.metrics import classification_metrics, paired_margin, selection_metric
from smallmighty.models.encoder import read_meta

#: Test texts timed one at a time for batch-1 latency (the quality metrics use the whole split).
LATENCY_ITEMS = 300


def disk_size_mb(path: Path) -> float:
    """Size on disk of a file, or of everything under a folder, in MiB."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2**20


def describe_model(model_dir: str | Path) -> str:
    """A short name from the model's config, such as 'bert 6L-384'."""
    config = read_json(Path(model_dir) / "config.json")
    return f"{config.get('model_type', 'model')} {config.get('num_hidden_layers')}L-{config.get('hidden_size')}"


def dataset_label(source: str) -> str:
    """A readable dataset name from a source path: its folder, skipping generic names."""
    path = Path(source.split(" [split ")[0])
    if path.suffix:
        path = path.parent
    while path.name in ("data", "") and path.parent != path:
        path = path.parent
    return path.name or source


def evaluate_classifier(model_dir: str | Path, test: LabelledTexts, *, name: str, role: str,
                        runtime: str = "onnx", batch_size: int = 32) -> dict:
    """One model's row of the card: accuracy and macro-F1 on `test`, size, speed and memory."""
    from smallmighty.engine.classifier import load_classifier, runtime_file

    model_dir = Path(model_dir)
    classifier = load_classifier(str(model_dir), runtime)
    if classifier.label_names != test.label_names:
        from smallmighty.errors import SlmError

        raise SlmError(f"model '{model_dir}' predicts labels {classifier.label_names[:5]}... but the data has "
                       f"{test.label_names[:5]}...; evaluate it on the task it was trained for")
    predictions = np.concatenate([classifier.predict_logits(test.texts[i:i + batch_size]).argmax(-1)
                                  for i in range(0, len(test), batch_size)])
    quality = classification_metrics(test.labels, predictions.tolist(), test.label_names)
    speed = profile_classifier(str(model_dir), runtime, test.texts[:LATENCY_ITEMS], batch_size=batch_size)
    if runtime.startswith("onnx"):  # the same model as `slm export --format onnx` ships it, without torch
        speed |= standalone_profile(model_dir, runtime, test.texts[0])
    meta = read_meta(model_dir)
    return {"name": name, "role": role, "runtime": runtime, "params": meta.get("params"),
            "disk_mb": disk_size_mb(runtime_file(model_dir, runtime)),
            "accuracy": quality["accuracy"], "macro_f1": quality["macro_f1"], **speed,
            "predictions": predictions.tolist()}


def evaluate_baseline(train: LabelledTexts, validation: LabelledTexts, test: LabelledTexts, *,
                      batch_size: int = 32) -> dict:
    """TF-IDF + logistic regression, trained here with its regularisation chosen on `validation`
    (by the same metric that picks the neural models' checkpoints): the bar a student has to clear."""
    start = time.perf_counter()
    baseline = TfidfBaseline()
    metric = selection_metric(train.labels, len(train.label_names))
    choice = baseline.fit_on_validation(
        train.texts, train.labels, validation.texts,
        lambda predicted: classification_metrics(validation.labels, predicted.tolist(), validation.label_names)[metric])
    fit_s = time.perf_counter() - start
    predictions = baseline.predict(test.texts).tolist()
    quality = classification_metrics(test.labels, predictions, test.label_names)
    texts = test.texts[:LATENCY_ITEMS]
    latency = latency_ms(lambda text: baseline.predict([text]), texts)
    throughput = throughput_per_s(baseline.predict, texts, batch_size=batch_size)
    return {"name": "TF-IDF + logistic regression", "role": "baseline", "runtime": "scikit-learn",
            "params": baseline.num_features * len(test.label_names),
            # Size as scikit-learn users store it (pickled); measured only, never loaded back.
            "disk_mb": len(pickle.dumps(baseline)) / 2**20,
            "accuracy": quality["accuracy"], "macro_f1": quality["macro_f1"],
            "latency_ms_p50": latency["p50"], "latency_ms_p95": latency["p95"],
            "throughput_per_s": throughput, "peak_rss_mb": None, "fit_s": fit_s, "predictions": predictions,
            **request_cost(lambda text: baseline.predict([text]), texts),
            "selection": {"split": "validation", "metric": metric, "C": choice["C"],
                          "validation_scores": {str(c): round(v, 5) for c, v in choice["scores"].items()}}}


def student_margins(models: list[dict], test: LabelledTexts, metric: str) -> list[dict]:
    """Each student against every other model on the card: the difference in `metric` on the test
    split with its 95% paired bootstrap interval (rows without predictions are skipped)."""
    from smallmighty.evaluate.report import model_label

    margins = []
    for student in (m for m in models if m["role"] == "student" and m.get("predictions")):
        for other in (m for m in models if m is not student and m.get("predictions")):
            margin = paired_margin(test.labels, student["predictions"], other["predictions"], len(test.label_names),
                                   metric=metric)
            margins.append({"model": model_label(student), "versus": model_label(other), "role": other["role"],
                            **margin})
    return margins


def build_card(models: list[dict], train: LabelledTexts, test: LabelledTexts, *, title: str,
               training: dict | None = None, selection: dict | None = None) -> dict:
    """The card: `selection` records which split chose what (see `distill.pipeline`)."""
    metric = selection_metric(train.labels, len(train.label_names))
    return {"title": title,
            "task": {"dataset": dataset_label(test.source), "source": test.source, "n_train": len(train),
                     "n_test": len(test), "num_labels": len(test.label_names)},
            "primary_metric": metric, "hardware": hardware_info(), "models": models,
            "student_margins": student_margins(models, test, metric), "selection": selection or {},
            "training": training or {}}
