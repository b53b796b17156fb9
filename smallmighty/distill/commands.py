"""`slm distill`: teacher to student for text classification, ending with a report card."""

from __future__ import annotations

import argparse

from smallmighty.data.arguments import add_data_arguments, load_data_from_args
from smallmighty.evaluate.commands import add_evaluation_arguments
from smallmighty.train.arguments import (
    add_train_arguments,
    apply_recipe,
    train_config_from_args,
)

EXAMPLES = """examples:
  slm distill                                   # MiniLM-L6 -> 2-layer student on BBC News, report in runs/distill
  slm distill --data ../shared/datasets/banking77 --teacher runs/banking77-teacher --layers 2 --hidden 256
  slm distill --intermediate-epochs 3 --alpha-hidden 1 --alpha-attention 1   # TinyBERT-style two stages
  slm distill --recipe recipes/banking77.json --resume                       # continue a killed run

The teacher is fine-tuned on the task first when its classification head does not match the data's
labels (so a base encoder such as the default MiniLM works out of the box).
"""


def register(subparsers) -> None:
    sub = subparsers.add_parser("distill", help="distil a teacher classifier into a small, fast student",
                                description="Distil an encoder classifier into a small student: soft-logit KD, "
                                            "hidden-state and attention-map transfer, layer maps, optional "
                                            "TinyBERT-style two stages. Writes the student as a standard Hugging "
                                            "Face folder and a report card (report.json, report.html).",
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub.add_argument("--teacher", default=None,
                     help="teacher: a fine-tuned classifier folder, or any encoder (folder or hub id) to fine-tune "
                          "first (default: MiniLM-L6-H384 from PyPI)")
    sub.add_argument("--out", default="runs/distill", help="output folder (default: runs/distill)")
    sub.add_argument("--teacher-epochs", type=int, default=3,
                     help="epochs when the teacher must be fine-tuned first (default: 3)")
    sub.add_argument("--teacher-lr", type=float, default=1e-4, help="learning rate for that (default: 1e-4)")
    student = sub.add_argument_group("student shape")
    student.add_argument("--layers", type=int, default=2, help="transformer layers (default: 2)")
    student.add_argument("--hidden", type=int, default=256,
                         help="hidden width; a BERT teacher's most active channels are kept (default: 256)")
    student.add_argument("--heads", type=int, default=None,
                         help="attention heads (default: as many of the teacher's head size as fit, so the most "
                              "active teacher heads are kept)")
    student.add_argument("--ffn", type=int, default=None,
                         help="feed-forward width; the most active teacher neurons are kept (default: the teacher's "
                              "ratio to the width)")
    student.add_argument("--pooling", default="cls", choices=["cls", "mean"],
                         help="cls: a BERT student read out at [CLS]; mean: a ModernBERT student with mean pooling "
                              "(default: cls)")
    student.add_argument("--no-trim-vocab", dest="trim_vocab", action="store_false",
                         help="keep the teacher's whole vocabulary (default: trim to the pieces the training data "
                              "uses, plus ASCII characters)")
    kd = sub.add_argument_group("distillation")
    kd.add_argument("--temperature", type=float, default=3.0, help="soft-target temperature (default: 3)")
    kd.add_argument("--alpha-kd", type=float, default=0.8, help="weight of soft-logit KD (default: 0.8)")
    kd.add_argument("--alpha-ce", type=float, default=0.2, help="weight of hard-label cross-entropy (default: 0.2)")
    kd.add_argument("--alpha-hidden", type=float, default=0.0, help="weight of hidden-state MSE (default: 0)")
    kd.add_argument("--alpha-attention", type=float, default=0.0, help="weight of attention-map KL (default: 0)")
    kd.add_argument("--layer-map", default="uniform",
                    help="student:teacher layer pairs such as '1:2,2:4,3:6', or 'uniform' (default)")
    kd.add_argument("--intermediate-epochs", type=int, default=0,
                    help="epochs of a first stage on hidden states and attention maps only (TinyBERT; default: 0)")
    kd.add_argument("--augment", type=int, default=0,
                    help="perturbed copies of each training text for the teacher to label (masked and swapped "
                         "words, n-grams); more data for the student at the cost of teacher time (default: 0)")
    kd.add_argument("--top-k", type=int, default=16, help="teacher logits kept in the cache per example (default: 16)")
    add_evaluation_arguments(sub.add_argument_group("evaluation"))
    add_data_arguments(sub)
    add_train_arguments(sub, epochs=10, lr=5e-4)
    sub.set_defaults(handler=run, subparser=sub)


def run(args: argparse.Namespace) -> int:
    from smallmighty.defaults import default_teacher_encoder
    from smallmighty.distill.classifier import DistillConfig
    from smallmighty.distill.losses import DistillWeights
    from smallmighty.distill.pipeline import run_pipeline
    from smallmighty.models.encoder import StudentShape

    apply_recipe(args, args.subparser)
    train_data, test_data = load_data_from_args(args)
    config = DistillConfig(
        shape=StudentShape(layers=args.layers, hidden=args.hidden, heads=args.heads, ffn=args.ffn,
                           trim_vocab=args.trim_vocab, pooling=args.pooling),
        weights=DistillWeights(kd=args.alpha_kd, ce=args.alpha_ce, hidden=args.alpha_hidden,
                               attention=args.alpha_attention, temperature=args.temperature),
        train=train_config_from_args(args), layer_map=args.layer_map,
        intermediate_epochs=args.intermediate_epochs, top_k=args.top_k, max_length=args.max_length,
        augment=args.augment)
    teacher_train = train_config_from_args(args)
    teacher_train.epochs, teacher_train.lr = args.teacher_epochs, args.teacher_lr
    run_pipeline(args.teacher or default_teacher_encoder(), train_data, test_data, args.out, distill=config,
                 teacher_train=teacher_train, runtime=args.runtime, baseline=args.baseline, resume=args.resume)
    return 0
