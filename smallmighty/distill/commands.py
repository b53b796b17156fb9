"""`slm distill`: teacher to student for text classification, ending with a report card."""

from __future__ import annotations

import argparse

from smallmighty.data.arguments import add_data_arguments, load_data_from_args
from smallmighty.distill.lm_commands import EXAMPLES as CAUSAL_LM_EXAMPLES
from smallmighty.distill.lm_commands import add_causal_lm_arguments, fill_task_defaults, is_causal_lm_task
from smallmighty.evaluate.commands import add_evaluation_arguments
from smallmighty.train.arguments import (
    add_chat_tuning_arguments,
    add_train_arguments,
    apply_recipe,
    train_config_from_args,
)

EXAMPLES = """examples:
  slm distill                                   # MiniLM-L6 -> 4-layer student on BBC News, report in runs/distill
  slm distill --data ../shared/datasets/banking77 --teacher runs/banking77-teacher --layers 2 --hidden 256
  slm distill --intermediate-epochs 3 --alpha-hidden 1 --alpha-attention 1   # TinyBERT-style two stages
  slm distill --recipe recipes/banking77.json --resume                       # continue a killed run

The teacher is fine-tuned on the task first when its classification head does not match the data's
labels (so a base encoder such as the default MiniLM works out of the box). Training lengths, the
checkpoints kept and the baseline's regularisation are all chosen on a validation split (the data's
own, or 10% of the training data); the test split is scored once, at the end. The report's headline
says which model to use: when the TF-IDF baseline scores at least as well as the student, it says so.

Learning from a teacher's answers (Orca 2 style; any two causal LMs, no shared vocabulary needed):
  slm distill --method answers --student runs/student --data prompts.jsonl --lora
  slm distill --method answers --teacher gemma-3-270m.gguf --student SmolLM2.gguf --data chats.jsonl \
      --teacher-system "Think step by step, then answer carefully."   # seen by the teacher only
The teacher answers each prompt of --data (its conversations without their last answer) with our
engine, batched; the answers are cached in <out>/teacher_answers.jsonl; the student is tuned on them
and scored before and after on held-out prompts (ROUGE-L against the teacher, perplexity on its
answers), answers side by side in <out>/report.html.

""" + CAUSAL_LM_EXAMPLES


def register(subparsers) -> None:
    sub = subparsers.add_parser("distill", help="distil a teacher classifier or causal LM into a small, fast student",
                                description="Distil an encoder classifier into a small student: soft-logit KD, "
                                            "hidden-state and attention-map transfer, layer maps, optional "
                                            "TinyBERT-style two stages; or a causal LM: token-level KD (forward "
                                            "KL, reverse KL, generalised JSD), on-policy GKD or sequence-level KD. "
                                            "Writes the student as a standard Hugging Face folder and a report card "
                                            "(report.json, report.html).",
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub.add_argument("--teacher", default=None,
                     help="teacher: a fine-tuned classifier folder, or any encoder (folder or hub id) to fine-tune "
                          "first (default: MiniLM-L6-H384 from PyPI); or a causal LM (GGUF file, folder or hub id; "
                          "default with --task lm: SmolLM2-135M-Instruct from PyPI)")
    sub.add_argument("--out", default="runs/distill", help="output folder (default: runs/distill)")
    sub.add_argument("--method", choices=["kd", "gkd", "sequence", "answers"], default="kd",
                     help="kd: the student learns the teacher's logits (a classifier's, or a causal LM's cached "
                          "top-k next-token distributions); gkd: causal LMs, on-policy, the teacher scores the "
                          "student's own samples for a share of the steps; sequence: causal LMs, the student "
                          "learns the teacher's continuations of the corpus (works across tokenizers); answers: a "
                          "causal-LM student is tuned on the teacher's answers to the prompts of --data "
                          "(default: kd)")
    sub.add_argument("--student", default=None,
                     help="a causal-LM student to start from (folder, .gguf or hub id): for --method answers "
                          "(default: SmolLM2-135M-Instruct), or for kd, gkd and sequence instead of cutting one "
                          "out of the teacher (e.g. a model made by slm pretrain)")
    answers = sub.add_argument_group("learning from answers (--method answers)")
    answers.add_argument("--teacher-system", default=None, metavar="TEXT",
                         help="system prompt only the teacher sees, e.g. asking for careful step-by-step answers; "
                              "the student's training data leaves it out (Orca 2's prompt erasure)")
    answers.add_argument("--max-new-tokens", type=int, default=128, help="longest answer, in tokens (default: 128)")
    answers.add_argument("--teacher-chat-template", default=None, metavar="FILE",
                         help="a jinja chat template for a teacher that has none (a base model), e.g. "
                              "recipes/chat_templates/gemma.jinja")
    answers.add_argument("--teacher-precision", choices=["fp32", "int8", "int4"], default="int8",
                         help="the teacher's weights in our engine while it generates (answers and sequence) "
                              "(default: int8)")
    add_chat_tuning_arguments(sub)
    sub.add_argument("--teacher-epochs", type=int, default=None,
                     help="epochs when the teacher must be fine-tuned first (default: auto, a step budget from the "
                          "data size stopped early on validation)")
    sub.add_argument("--teacher-lr", type=float, default=1e-4, help="learning rate for that (default: 1e-4)")
    student = sub.add_argument_group("student shape")
    student.add_argument("--layers", type=int, default=4, help="transformer layers (default: 4)")
    student.add_argument("--hidden", type=int, default=256,
                         help="hidden width; a BERT teacher's most active channels are kept (default: 256)")
    student.add_argument("--heads", type=int, default=None,
                         help="attention heads (default: as many of the teacher's head size as fit, so the most "
                              "active teacher heads are kept)")
    student.add_argument("--ffn", type=int, default=480,
                         help="feed-forward width; the most active teacher neurons are kept (default: 480, which makes "
                              "a 4L-256 student 1/8 of MiniLM-L6)")
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
    kd.add_argument("--top-k", type=int, default=None,
                    help="teacher logits kept in the cache per example (causal LMs: per position)")
    add_evaluation_arguments(sub.add_argument_group("evaluation"))
    add_data_arguments(sub)
    add_train_arguments(sub, epochs=None, lr=5e-4, max_length="auto")
    add_causal_lm_arguments(sub)
    sub.set_defaults(handler=run, subparser=sub)


def configs_from_args(args: argparse.Namespace, data) -> tuple[str, object, object, dict]:
    """(teacher, DistillConfig, teacher TrainConfig, the choices made from the data) that the flags
    describe for `data` (LabelledSplits): lengths left unset are set from the data (train.budget,
    train.lengths). Shared with bench/distill_classifier.py, whose defaults are these."""
    from smallmighty.defaults import default_teacher_encoder
    from smallmighty.distill.classifier import DistillConfig
    from smallmighty.distill.losses import DistillWeights
    from smallmighty.models.encoder import StudentShape, load_tokenizer
    from smallmighty.train.budget import STUDENT_BUDGET, TEACHER_BUDGET
    from smallmighty.train.lengths import text_lengths

    fill_task_defaults(args, "classify")  # idempotent; bench/distill_classifier.py calls this directly
    teacher = args.teacher or default_teacher_encoder()
    lengths = text_lengths(load_tokenizer(teacher), data.train.texts, args.max_length)
    student_examples = len(data.train) * (1 + args.augment)
    config = DistillConfig(
        shape=StudentShape(layers=args.layers, hidden=args.hidden, heads=args.heads, ffn=args.ffn,
                           trim_vocab=args.trim_vocab, pooling=args.pooling),
        weights=DistillWeights(kd=args.alpha_kd, ce=args.alpha_ce, hidden=args.alpha_hidden,
                               attention=args.alpha_attention, temperature=args.temperature),
        train=train_config_from_args(args, budget=STUDENT_BUDGET, n_examples=student_examples,
                                     mean_tokens=lengths.mean_tokens),
        layer_map=args.layer_map, intermediate_epochs=args.intermediate_epochs, top_k=args.top_k,
        max_length=lengths.max_length, windows=lengths.windows, augment=args.augment)
    # --epochs, --lr and --max-steps describe the student; the teacher has --teacher-epochs and
    # --teacher-lr, and otherwise its own budget (a student's --max-steps 6000 is not the teacher's).
    teacher_args = argparse.Namespace(**{**vars(args), "epochs": args.teacher_epochs, "lr": args.teacher_lr,
                                         "max_steps": 0})
    teacher_train = train_config_from_args(teacher_args, budget=TEACHER_BUDGET, n_examples=len(data.train),
                                           mean_tokens=lengths.mean_tokens)
    choices = {"max_length": (f"{lengths.max_length} tokens: " + (
        "the shorter of 64/128 that holds 95% of the training texts whole" if lengths.chosen else "given")
        + (f"; longer texts read as up to {lengths.windows} windows at inference" if lengths.windows > 1 else ""))}
    for role, given, train in (("teacher", args.teacher_epochs, teacher_train),
                               ("student", args.epochs or args.max_steps or None, config.train)):
        if given is None:
            stop = (f"stopped after {train.patience} without a gain" if train.patience
                    else "run in full, the best-scoring weights kept")
            choices[f"{role}_length"] = (f"at most {train.max_steps} steps from the data size, scored on validation "
                                         f"every {train.eval_every}, {stop}")
    return teacher, config, teacher_train, choices


def run(args: argparse.Namespace) -> int:
    if args.method == "answers":
        return run_answers(args)
    from smallmighty.distill.pipeline import run_pipeline

    apply_recipe(args, args.subparser)
    if is_causal_lm_task(args):
        from smallmighty.distill.lm_commands import run_causal_lm

        return run_causal_lm(args)
    data = load_data_from_args(args)
    teacher, config, teacher_train, choices = configs_from_args(args, data)
    run_pipeline(teacher, data, args.out, distill=config, teacher_train=teacher_train, runtime=args.runtime,
                 baseline=args.baseline, resume=args.resume, choices=choices)
    return 0


def run_answers(args: argparse.Namespace) -> int:
    """`--method answers`: split the prompts of --data, then `distill.from_answers.learn_from_answers`."""
    import random
    from pathlib import Path

    from smallmighty.data.chat import load_chat, prompts_of
    from smallmighty.distill.answers import TeacherSettings
    from smallmighty.distill.from_answers import learn_from_answers
    from smallmighty.errors import SlmError
    from smallmighty.train.arguments import lora_settings_from_args

    apply_recipe(args, args.subparser)
    fill_task_defaults(args, "answers")
    if not args.data:
        raise SlmError("--method answers needs --data: chat JSONL whose prompts the teacher answers")
    prompts = prompts_of(load_chat(args.data))
    random.Random(args.seed).shuffle(prompts)
    n_test = max(1, round(len(prompts) * args.test_fraction))
    n_val = min(50, len(prompts) // 10) if len(prompts) >= 40 else 0
    test, val, train = prompts[:n_test], prompts[n_test:n_test + n_val], prompts[n_test + n_val:]
    train, test = train[:args.max_train] if args.max_train else train, test[:args.max_test] if args.max_test else test
    if not train:
        raise SlmError(f"{args.data}: {len(prompts)} distinct prompts leave none for training")
    print(f"prompts: {len(train)} train / {len(val)} validation / {len(test)} held out ({args.data})")
    parser = args.subparser
    lora = lora_settings_from_args(args)
    # The classifier defaults (10 epochs at 5e-4) would overfit a few hundred answers (see TASK_DEFAULTS).
    lr = args.lr if args.lr is not None else 1e-3 if lora else 1e-4
    max_length = 512 if args.max_length == parser.get_default("max_length") else args.max_length
    config = train_config_from_args(args, lr=lr, schedule="cosine")
    template = None
    if args.teacher_chat_template:
        try:
            template = Path(args.teacher_chat_template).read_text(encoding="utf-8")
        except OSError as exc:
            raise SlmError(f"--teacher-chat-template: {exc}") from exc
    settings = TeacherSettings(precision=args.teacher_precision, max_new_tokens=args.max_new_tokens,
                               seed=args.seed, system_prompt=args.teacher_system, chat_template=template)
    card = learn_from_answers(args.teacher, args.student, train, test, args.out, teacher_settings=settings,
                              config=config, lora=lora, max_length=max_length, validation_prompts=val,
                              resume=args.resume)
    for m in card["models"][1:]:
        print(f"{m['name']}: ROUGE-L vs teacher {m['rouge_l']:.3f}, perplexity on the teacher's answers "
              f"{m['answer_ppl']:.2f}")
    print(f"tuned student in {args.out}/student; report {args.out}/report.html")
    return 0
