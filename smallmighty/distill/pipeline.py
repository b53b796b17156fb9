"""The whole classifier job in one call: teacher fine-tuned on the task if it is not yet, student
distilled, both evaluated with the classical baseline, report card written.

This is what `slm distill` runs; with no arguments it distils MiniLM-L6 on BBC News, both from PyPI.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from smallmighty.data.classification import LabelledTexts
from smallmighty.distill.classifier import DistillConfig, distill_classifier
from smallmighty.io import read_json
from smallmighty.models.encoder import read_meta
from smallmighty.train.finetune import finetune_classifier
from smallmighty.train.loop import TrainConfig


def teacher_matches(model: str, label_names: list[str]) -> bool:
    """Whether `model` is already a classifier for exactly these labels (a fine-tuned teacher)."""
    data = read_json(Path(model) / "config.json", default=None)
    if not isinstance(data, dict):
        return False
    id2label = data.get("id2label") or {}
    archs = data.get("architectures") or []
    return (any(a.endswith("ForSequenceClassification") for a in archs)
            and [id2label.get(str(i)) for i in range(len(id2label))] == label_names)


def run_pipeline(teacher: str, train: LabelledTexts, test: LabelledTexts, out_dir: str | Path, *,
                 distill: DistillConfig, teacher_train: TrainConfig, runtime: str = "onnx",
                 baseline: bool = True, resume: bool = False) -> dict:
    """Fine-tune (if needed), distil, evaluate; returns the report card and writes it to `out_dir`."""
    from smallmighty.evaluate.card import (
        build_card,
        dataset_label,
        describe_model,
        evaluate_baseline,
        evaluate_classifier,
    )
    from smallmighty.evaluate.report import publish

    out_dir = Path(out_dir)
    timings: dict[str, float] = {}
    teacher_dir = teacher
    if not teacher_matches(teacher, train.label_names):
        teacher_dir = str(out_dir / "teacher")
        if teacher_matches(teacher_dir, train.label_names) and not resume:
            trained = read_meta(teacher_dir).get("train")
            other = (f"; it was trained with other settings ({trained}): use another output folder to "
                     "fine-tune afresh" if trained not in (None, asdict(teacher_train)) else "")
            print(f"reusing the fine-tuned teacher in {teacher_dir}{other}")
        else:
            print(f"fine-tuning the teacher {teacher} on the task first ({teacher_train.epochs} epochs)")
            start = time.perf_counter()
            finetune_classifier(teacher, train, teacher_dir, config=teacher_train, max_length=distill.max_length,
                                resume=resume and (out_dir / "teacher.checkpoint").exists())
            timings["teacher_finetune_s"] = time.perf_counter() - start
    start = time.perf_counter()
    info = distill_classifier(teacher_dir, train, out_dir / "student", distill, resume=resume)
    timings["distill_s"] = time.perf_counter() - start
    print("evaluating teacher, student and baseline on the test split")
    models = [evaluate_classifier(teacher_dir, test, name=describe_model(teacher_dir), role="teacher",
                                  runtime=runtime),
              evaluate_classifier(out_dir / "student", test, name=describe_model(out_dir / "student"), role="student",
                                  runtime=runtime)]
    if baseline:
        models.append(evaluate_baseline(train, test))
    card = build_card(models, train, test, title=f"Distillation report: {dataset_label(test.source)}",
                      training={"teacher": str(teacher_dir), "student": info, "timings_s": timings,
                                "teacher_train": asdict(teacher_train)})
    return {**card, "summary": publish(out_dir, card)}

