"""`slm eval`: the report card for classifiers, teacher and students side by side."""

from __future__ import annotations

import argparse

from smallmighty.data.arguments import add_data_arguments, load_data_from_args
from smallmighty.evaluate.cost import DEFAULT_PRICE_PER_CORE_HOUR, DEFAULT_WATTS_PER_CORE
from smallmighty.train.arguments import add_recipe_argument

EXAMPLES = """examples:
  slm eval --teacher runs/distill/teacher --model runs/distill/student --data ../shared/datasets/banking77
  slm eval --model runs/distill/student --runtime torch --no-baseline --out runs/eval-torch
  slm eval --recipe recipes/banking77.json --model runs/banking77/student   # data and out from a recipe
"""


def add_evaluation_arguments(parser) -> None:
    """The runtime the models are timed on and the baseline switch (`slm eval` and `slm distill`)."""
    parser.add_argument("--runtime", default="onnx", choices=["torch", "onnx", "onnx-int8"],
                        help="runtime every model is timed on (default: onnx, the fastest)")
    parser.add_argument("--no-baseline", dest="baseline", action="store_false",
                        help="skip the TF-IDF + logistic regression baseline")


def register(subparsers) -> None:
    sub = subparsers.add_parser("eval", help="report card: quality, size, memory and speed of classifiers",
                                description="Evaluate classifiers on the test split and write report.json and a "
                                            "self-contained report.html: accuracy, macro-F1, parameters, disk size, "
                                            "peak RAM, batch-1 latency p50/p95 and batch-32 throughput on this CPU, "
                                            "with ratios against the teacher and a TF-IDF baseline.",
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub.add_argument("--model", action="append", default=[], metavar="DIR",
                     help="a classifier folder to evaluate as a student (repeatable)")
    sub.add_argument("--teacher", default=None, metavar="DIR", help="the teacher classifier folder to compare with")
    add_evaluation_arguments(sub)
    sub.add_argument("--out", default="runs/eval", help="folder for report.json and report.html (default: runs/eval)")
    cost = sub.add_argument_group("cost (CPU time is measured; these turn it into dollars and, without RAPL, energy)")
    cost.add_argument("--price-per-core-hour", type=float, default=DEFAULT_PRICE_PER_CORE_HOUR,
                      help=f"dollars per CPU core-hour (default: {DEFAULT_PRICE_PER_CORE_HOUR}, a cloud vCPU on demand)")
    cost.add_argument("--watts-per-core", type=float, default=DEFAULT_WATTS_PER_CORE,
                      help=f"watts per busy core, for the energy estimate where RAPL cannot be read "
                           f"(default: {DEFAULT_WATTS_PER_CORE})")
    add_data_arguments(sub)
    add_recipe_argument(sub)
    sub.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from smallmighty.errors import SlmError
    from smallmighty.evaluate.card import (
        build_card,
        dataset_label,
        evaluate_baseline,
        evaluate_classifier,
    )
    from smallmighty.evaluate.cost import cost_assumptions
    from smallmighty.evaluate.report import publish

    if not args.model and not args.teacher:
        raise SlmError("nothing to evaluate: give --model DIR (and optionally --teacher DIR)")
    data = load_data_from_args(args)
    test = data.test
    models = []
    if args.teacher:
        models.append(evaluate_classifier(args.teacher, test, name=Path(args.teacher).name or "teacher",
                                          role="teacher", runtime=args.runtime))
    for model in args.model:
        models.append(evaluate_classifier(model, test, name=Path(model).name or "student", role="student",
                                          runtime=args.runtime))
    if args.baseline:
        models.append(evaluate_baseline(data.train, data.validation, test))
    card = build_card(models, data.train, test, title=f"Report card: {dataset_label(test.source)}",
                      selection={"validation_split": data.validation_origin,
                                 **({"baseline": models[-1]["selection"]} if args.baseline else {})})
    card["cost"] = cost_assumptions(args.price_per_core_hour, args.watts_per_core)
    publish(args.out, card)
    return 0
