"""Headline claim: a distilled student many times smaller and faster keeps nearly all of its teacher's
accuracy, and beats the classical baseline.

One run, on this machine: fine-tune the teacher on the task (reused from an earlier run of the same
out folder), distil a student with at most 1/8 of its parameters, then evaluate teacher, student and a
TF-IDF + logistic regression baseline on the test split. Teacher and student are timed on the same
runtime (ONNX Runtime, the fastest the toolkit offers), batch 1, each in a fresh process.

    python bench/distill_classifier.py --data ../shared/datasets/banking77
    python bench/distill_classifier.py --data ../shared/datasets/banking77 --teacher mpnet

Prints the report-card table and ends with one JSON line of figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from smallmighty.data.classification import load_labelled_splits
from smallmighty.defaults import default_teacher_encoder, mpnet_teacher_encoder
from smallmighty.distill.classifier import DistillConfig
from smallmighty.distill.losses import DistillWeights
from smallmighty.distill.pipeline import run_pipeline
from smallmighty.models.encoder import StudentShape
from smallmighty.train.loop import TrainConfig

TEACHERS = {"minilm": default_teacher_encoder, "mpnet": mpnet_teacher_encoder}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a labelled dataset folder (train and test splits)")
    parser.add_argument("--test-split", default="test")
    parser.add_argument("--teacher", default="minilm", help="minilm, mpnet, or a model folder")
    parser.add_argument("--out", default=None, help="run folder (default: runs/bench/<data>-<teacher>)")
    parser.add_argument("--teacher-epochs", type=int, default=10)
    parser.add_argument("--teacher-lr", type=float, default=1e-4)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=None, help="default: the teacher's head size")
    parser.add_argument("--ffn", type=int, default=480)
    parser.add_argument("--pooling", default="cls", choices=["cls", "mean"])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--intermediate-epochs", type=int, default=0)
    parser.add_argument("--alpha-hidden", type=float, default=0.0)
    parser.add_argument("--alpha-attention", type=float, default=0.0)
    parser.add_argument("--temperature", type=float, default=3.0)
    parser.add_argument("--augment", type=int, default=0)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--max-train", type=int, default=None)
    parser.add_argument("--max-test", type=int, default=None)
    parser.add_argument("--runtime", default="onnx", choices=["torch", "onnx", "onnx-int8"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    teacher = TEACHERS[args.teacher]() if args.teacher in TEACHERS else args.teacher
    out = Path(args.out or f"runs/bench/{Path(args.data).name}-{Path(str(args.teacher)).name}")
    train, test = load_labelled_splits(args.data, test_split=args.test_split, seed=args.seed,
                                       max_train=args.max_train, max_test=args.max_test)
    print(f"data: {len(train)} train / {len(test)} test, {len(train.label_names)} labels; teacher {teacher}")
    distill = DistillConfig(
        shape=StudentShape(layers=args.layers, hidden=args.hidden, heads=args.heads, ffn=args.ffn,
                           pooling=args.pooling),
        weights=DistillWeights(hidden=args.alpha_hidden, attention=args.alpha_attention,
                               temperature=args.temperature),
        train=TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=32, seed=args.seed),
        intermediate_epochs=args.intermediate_epochs, max_length=args.max_length,
        augment=args.augment)
    teacher_train = TrainConfig(epochs=args.teacher_epochs, lr=args.teacher_lr, batch_size=32, seed=args.seed)
    start = time.perf_counter()
    card = run_pipeline(teacher, train, test, out, distill=distill, teacher_train=teacher_train,
                        runtime=args.runtime, resume=False)
    models = {m["role"]: m for m in card["models"]}
    t, s, b = models["teacher"], models["student"], models["baseline"]
    figures = {
        "data": Path(args.data).name, "teacher": args.teacher, "runtime": args.runtime,
        "teacher_accuracy": t["accuracy"], "student_accuracy": s["accuracy"],
        "baseline_accuracy": b["accuracy"], "retained": s["accuracy"] / t["accuracy"],
        "teacher_macro_f1": t["macro_f1"], "student_macro_f1": s["macro_f1"],
        "teacher_params": t["params"], "student_params": s["params"], "param_ratio": t["params"] / s["params"],
        "teacher_latency_ms_p50": t["latency_ms_p50"], "student_latency_ms_p50": s["latency_ms_p50"],
        "baseline_latency_ms_p50": b["latency_ms_p50"], "speedup": t["latency_ms_p50"] / s["latency_ms_p50"],
        "teacher_throughput_per_s": t["throughput_per_s"], "student_throughput_per_s": s["throughput_per_s"],
        "student_beats_baseline": s["accuracy"] > b["accuracy"], "wall_s": time.perf_counter() - start,
    }
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
