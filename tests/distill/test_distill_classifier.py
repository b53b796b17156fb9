"""Distillation end to end on a small learnable task: the student learns from the teacher."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from smallmighty.data.classification import load_labelled_data
from smallmighty.distill.classifier import DistillConfig, distill_classifier
from smallmighty.distill.losses import DistillWeights
from smallmighty.errors import SlmError
from smallmighty.models.encoder import StudentShape
from smallmighty.train.finetune import finetune_classifier
from smallmighty.train.loop import TrainConfig


@pytest.fixture(scope="module")
def task(topic_data_dir, tiny_encoder_dir, tmp_path_factory):
    data = load_labelled_data(topic_data_dir)
    teacher = finetune_classifier(str(tiny_encoder_dir), data.train, tmp_path_factory.mktemp("t") / "teacher",
                                  config=TrainConfig(epochs=4, batch_size=16, lr=2e-3, warmup_ratio=0.0),
                                  validation=data.validation, max_length=16)
    return data, teacher


def _accuracy(model_dir, test) -> float:
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    with torch.no_grad():
        pred = model(**tok(test.texts, padding=True, truncation=True, return_tensors="pt")).logits.argmax(-1)
    return (pred == torch.tensor(test.labels)).float().mean().item()


@pytest.mark.parametrize("two_stage,augment,pooling", [(False, 0, "cls"), (True, 0, "cls"), (False, 2, "mean")])
def test_student_learns_from_teacher(task, tmp_path, two_stage, augment, pooling):
    data, teacher = task
    train, test = data.train, data.test
    config = DistillConfig(
        shape=StudentShape(layers=1, hidden=32, heads=2, ffn=64, pooling=pooling),
        weights=DistillWeights(kd=0.8, ce=0.2, hidden=1.0 if two_stage else 0.0,
                               attention=1.0 if two_stage else 0.0),
        train=TrainConfig(epochs=6, batch_size=16, lr=3e-3, warmup_ratio=0.0),
        intermediate_epochs=2 if two_stage else 0, max_length=16, layer_map="1:2", augment=augment)
    info = distill_classifier(str(teacher), train, tmp_path / "student", config, validation=data.validation)
    assert info["stages"] == (["intermediate", "prediction"] if two_stage else ["prediction"])
    assert info["architecture"] == ("ModernBertForSequenceClassification" if pooling == "mean"
                                    else "BertForSequenceClassification")
    assert info["params"] < info["teacher_params"] / 8
    meta = json.loads((tmp_path / "student" / "smallmighty.json").read_text())
    assert meta["recipe"] == "distill" and meta["max_length"] == 16
    assert meta["config"]["top_k"] == len(train.label_names)  # the default caches every label's logit
    assert _accuracy(tmp_path / "student", test) > 0.85  # chance is 1/3
    # The verified ONNX export serves the same predictions as the torch model, whatever the architecture.
    from smallmighty.engine.classifier import load_classifier

    by_runtime = [load_classifier(str(tmp_path / "student"), rt).predict(test.texts) for rt in ("torch", "onnx")]
    assert by_runtime[0] == by_runtime[1]
    assert not (tmp_path / "student.checkpoint").exists()
    # The student kept is the one that scored best on validation, over the prediction stage only.
    selection = info["selection"]
    assert selection["split"] == "validation" and selection["best_step"] <= selection["steps_run"]
    steps = [h["step"] for h in selection["history"]]  # scored at each epoch's end
    assert steps == [steps[0] * e for e in range(1, 7)]
    if not augment:  # augmented copies that repeat a text are dropped, so only the plain count is exact
        assert steps[0] == -(-len(train) // 16)


def test_teacher_for_other_labels_is_rejected(task, tmp_path, tiny_encoder_dir):
    data, _ = task
    with pytest.raises(SlmError, match="other labels"):
        distill_classifier(str(tiny_encoder_dir), data.train, tmp_path / "s", DistillConfig(),
                           validation=data.validation)


def test_invalid_settings_are_rejected(task, tmp_path):
    data, teacher = task
    with pytest.raises(SlmError, match="top_k"):
        distill_classifier(str(teacher), data.train, tmp_path / "s", DistillConfig(top_k=0),
                           validation=data.validation)
    with pytest.raises(SlmError, match="layer"):
        distill_classifier(str(teacher), data.train, tmp_path / "s",
                           DistillConfig(shape=StudentShape(layers=1, hidden=32, heads=2), layer_map="1:9",
                                         weights=DistillWeights(hidden=1.0), max_length=16),
                           validation=data.validation)
