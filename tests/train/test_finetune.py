"""Fine-tuning scored on validation: the best weights are the ones saved, early stopping ends a run that
no longer improves, and the automatic length follows the data size."""

from __future__ import annotations

import json

import pytest

from smallmighty.data.classification import load_labelled_data
from smallmighty.engine.classifier import load_classifier
from smallmighty.metrics import classification_metrics
from smallmighty.train.budget import STUDENT_BUDGET, TEACHER_BUDGET, Budget, budgeted
from smallmighty.train.finetune import finetune_classifier
from smallmighty.train.loop import TrainConfig


def test_early_stopping_keeps_the_best_validation_weights(topic_data_dir, tiny_encoder_dir, tmp_path):
    data = load_labelled_data(topic_data_dir)
    config = TrainConfig(epochs=40, batch_size=16, lr=2e-3, warmup_ratio=0.0, eval_every=14, patience=3)
    out = finetune_classifier(str(tiny_encoder_dir), data.train, tmp_path / "teacher", config=config,
                              validation=data.validation, max_length=16)
    selection = json.loads((out / "smallmighty.json").read_text())["selection"]
    total = 40 * -(-len(data.train) // 16)
    assert selection["split"] == "validation" and selection["metric"] == "accuracy"
    assert selection["stopped_early"] and selection["steps_run"] < total / 2  # the easy task peaks early
    steps = [h["step"] for h in selection["history"]]
    assert steps == list(range(14, selection["steps_run"] + 1, 14))
    assert selection["steps_run"] - selection["best_step"] == 3 * 14  # patience: three scores without a gain
    best = max(h["accuracy"] for h in selection["history"])
    assert selection["best_validation"]["accuracy"] == pytest.approx(best) and best > 0.9
    # The saved model is the best-scoring one, not the last.
    predicted = load_classifier(str(out)).predict_logits(data.validation.texts).argmax(-1)
    scored = classification_metrics(data.validation.labels, predicted.tolist(), data.validation.label_names)
    assert scored["accuracy"] == pytest.approx(best)


def test_budget_follows_the_data_size() -> None:
    budget = Budget(epochs=10, min_steps=600, max_steps=3000, max_tokens=1_500_000)
    assert budget.steps(900, 32, 15) == 600         # a thousand short texts: 21 epochs, not 3
    assert budget.steps(9000, 32, 15) == 2813       # banking77: 10 epochs
    assert budget.steps(67000, 32, 12) == 3000      # sst2: capped, 1.4 epochs
    assert budget.steps(1600, 32, 400) == 117       # long articles: capped by the tokens read
    config = budgeted(TrainConfig(batch_size=16, grad_accum=2), budget, 900, 15)
    assert (config.max_steps, config.eval_every, config.patience) == (600, 30, 3)


def test_a_students_budget_runs_in_full_and_a_teachers_stops_early() -> None:
    """A patience of 3 stopped a banking77 student on a passing plateau (validation 91.1% at step 1,410 of
    2,813; 92.4% by the end), so students run their whole budget; teachers, which cost far more, stop early."""
    student = budgeted(TrainConfig(batch_size=32), STUDENT_BUDGET, 9000, 15)
    teacher = budgeted(TrainConfig(batch_size=32), TEACHER_BUDGET, 9000, 15)
    assert (student.max_steps, student.patience) == (2813, 0)
    assert (teacher.max_steps, teacher.patience) == (2813, 3)
