"""Headline claim: a distilled student many times smaller and faster keeps nearly all of its teacher's
accuracy, and beats the classical baseline by more than its seed-to-seed spread.

One run, on this machine, with the defaults of `slm distill` (every flag of `slm distill` is accepted
and means the same here): fine-tune the teacher once on the train split (reused from an earlier run
of the same out folder), distil a student with at most 1/8 of its parameters once per seed, then
evaluate teacher, students and a TF-IDF + logistic regression baseline on the test split. Every
setting is chosen on the validation split; the test split is scored once, at the end. Teacher and
students are timed on the same runtime (ONNX Runtime by default), batch 1, each in a fresh process.

    python bench/distill_classifier.py --data ../shared/datasets/banking77
    python bench/distill_classifier.py --data ../shared/datasets/sst2 --seeds 0,1,2
    python bench/distill_classifier.py --data ../shared/datasets/banking77 --teacher mpnet --hidden 384 --ffn 1536

Prints the report-card table and ends with one JSON line of figures: student figures are means over
the seeds, with standard deviations (`*_std`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from smallmighty.cli import build_parser
from smallmighty.data.arguments import load_data_from_args
from smallmighty.defaults import default_teacher_encoder, mpnet_teacher_encoder
from smallmighty.distill.commands import configs_from_args
from smallmighty.distill.pipeline import run_pipeline
from smallmighty.train.arguments import apply_recipe

TEACHERS = {"minilm": default_teacher_encoder, "mpnet": mpnet_teacher_encoder}


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def figures_from_card(card: dict, *, data: str, teacher: str, seeds: list[int], wall_s: float) -> dict:
    """The bench's JSON figures: teacher and baseline as measured, students as mean and std over seeds."""
    teacher_row = next(m for m in card["models"] if m["role"] == "teacher")
    students = [m for m in card["models"] if m["role"] == "student"]
    baseline = next((m for m in card["models"] if m["role"] == "baseline"), None)
    figures: dict = {"data": data, "teacher": teacher, "runtime": teacher_row["runtime"], "seeds": seeds,
                     "selection_split": card["selection"]["validation_split"], "primary_metric": card["primary_metric"],
                     "teacher_accuracy": teacher_row["accuracy"], "teacher_macro_f1": teacher_row["macro_f1"],
                     "teacher_params": teacher_row["params"], "teacher_latency_ms_p50": teacher_row["latency_ms_p50"],
                     "teacher_throughput_per_s": teacher_row["throughput_per_s"]}
    for key in ("accuracy", "macro_f1", "latency_ms_p50", "throughput_per_s"):
        figures[f"student_{key}"], figures[f"student_{key}_std"] = _mean_std([s[key] for s in students])
    figures["student_accuracy_by_seed"] = [s["accuracy"] for s in students]
    figures["student_params"] = students[0]["params"]
    figures["param_ratio"] = teacher_row["params"] / students[0]["params"]
    figures["retained"] = figures["student_accuracy"] / teacher_row["accuracy"]
    figures["speedup"] = teacher_row["latency_ms_p50"] / figures["student_latency_ms_p50"]
    if baseline is not None:
        metric = card["primary_metric"]
        margin = figures[f"student_{metric}"] - baseline[metric]
        figures.update({
            "baseline_accuracy": baseline["accuracy"], "baseline_macro_f1": baseline["macro_f1"],
            "baseline_latency_ms_p50": baseline["latency_ms_p50"], "baseline_C": baseline["selection"]["C"],
            # Student mean minus baseline on the primary metric, against the seed-to-seed spread, and the
            # paired bootstrap interval of each seed's student against the baseline on the test examples.
            "student_beats_baseline": {
                "metric": metric, "margin": margin, "student_std": figures[f"student_{metric}_std"],
                "beyond_std": margin > figures[f"student_{metric}_std"],
                "ci95_by_seed": [m["ci95"] for m in card["student_margins"] if m["role"] == "baseline"]}})
    figures["recommended"] = card["summary"]["recommended"]["role"] if card["summary"]["recommended"] else None
    figures["headline"] = card["summary"]["headline"]
    figures["wall_s"] = wall_s
    return figures


def main(argv: list[str] | None = None) -> int:
    bench = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                    epilog="Every other flag is one of `slm distill --help`.")
    bench.add_argument("--data", required=True, help="a labelled dataset folder or file (as slm distill --data)")
    bench.add_argument("--teacher", default="minilm", help="minilm, mpnet, or a model folder (default: minilm)")
    bench.add_argument("--out", default=None, help="run folder (default: runs/bench/<data>-<teacher>)")
    bench.add_argument("--seeds", default="0,1,2", help="student seeds, comma-separated (default: 0,1,2)")
    ours, rest = bench.parse_known_args(argv)
    teacher = TEACHERS[ours.teacher]() if ours.teacher in TEACHERS else ours.teacher
    out = Path(ours.out or f"runs/bench/{Path(ours.data).name}-{Path(str(ours.teacher)).name}")
    args = build_parser().parse_args(["distill", "--data", ours.data, "--teacher", teacher, "--out", str(out), *rest])
    apply_recipe(args, args.subparser)
    seeds = [int(s) for s in ours.seeds.split(",") if s.strip()]

    start = time.perf_counter()
    data = load_data_from_args(args)
    teacher, config, teacher_train, choices = configs_from_args(args, data)
    card = run_pipeline(teacher, data, out, distill=config, teacher_train=teacher_train, runtime=args.runtime,
                        baseline=args.baseline, choices=choices, student_seeds=seeds)
    print(json.dumps(figures_from_card(card, data=Path(ours.data).name, teacher=ours.teacher, seeds=seeds,
                                       wall_s=time.perf_counter() - start)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
