"""`slm distill` for causal LMs: the flags the causal-LM path adds to the one `slm distill` command.

`slm distill` takes this path when its teacher is a causal LM (a GGUF file, or a folder or hub id
whose config names a `...ForCausalLM` architecture), or with `--task lm` (then the teacher defaults
to SmolLM2-135M-Instruct). Flags shared with classifier distillation whose good defaults differ
between the two (student size, temperature, loss weights, epochs, learning rate, batch size) default
per task; their help says both. Imports nothing heavy.
"""

from __future__ import annotations

import argparse
import re

#: Flag (argparse dest) -> its default per task: classifiers, causal LMs (kd, gkd, sequence) and --method
#: answers. Shape flags left at None take the teacher's size (layers: 4/5 of the teacher's, ffn: 3/5); a classifier's
#: top_k left at None keeps every label; the learning rate of answers depends on --lora (`commands.run_answers`).
TASK_DEFAULTS: dict[str, dict[str, object]] = {
    "layers": {"classify": 4, "lm": None}, "hidden": {"classify": 256, "lm": None}, "ffn": {"classify": 480, "lm": None},
    "temperature": {"classify": 3.0, "lm": 1.0}, "alpha_kd": {"classify": 0.8, "lm": 1.0},
    "alpha_ce": {"classify": 0.2, "lm": 0.0}, "top_k": {"classify": None, "lm": 32},
    "epochs": {"classify": None, "lm": 1, "answers": 3}, "lr": {"classify": 5e-4, "lm": 1e-3, "answers": None},
    "batch_size": {"classify": 32, "lm": 8, "answers": 32},
}
_TASK_NAMES = {"classify": "classifiers", "lm": "causal LMs", "answers": "--method answers"}

EXAMPLES = """causal LMs (the teacher is a causal LM, or --task lm):
  slm distill --task lm --data ../shared/datasets/tinyshakespeare/input.txt --layers 8 --max-steps 500
  slm distill --teacher model.gguf --data corpus/ --layers 6 --hidden 384 --heads 6 --kv-heads 2 --ffn 1024
  slm distill --teacher HuggingFaceTB/SmolLM2-360M --data docs.jsonl --divergence jsd --beta 0.5 --alpha-ce 0.5
  slm distill --task lm --data corpus.txt --method gkd --on-policy-ratio 0.5       # on-policy (GKD)
  slm distill --task lm --data corpus.txt --method sequence --student runs/my-pretrained-lm  # any tokenizer
The student is cut from a Llama-family teacher (its most influential blocks' most active units,
vocabulary trimmed to the corpus's tokens) unless --student names a model to start from; a scratch baseline of the same
shape trains on the same tokens (--no-baseline skips it); the report card compares all three.
"""


def add_causal_lm_arguments(parser: argparse.ArgumentParser) -> None:
    """The causal-LM flags, and per-task defaults for the shared ones (call after adding those)."""
    parser.add_argument("--task", default="auto", choices=("auto", "classify", "lm"),
                        help="auto: a causal-LM teacher means causal-LM distillation, else classification "
                             "(default: auto)")
    group = parser.add_argument_group("causal LMs")
    group.add_argument("--divergence", default="forward_kl", choices=("forward_kl", "reverse_kl", "jsd"),
                       help="token-level divergence to the teacher (default: forward_kl)")
    group.add_argument("--beta", type=float, default=0.5,
                       help="generalised JSD's beta: 0 is forward KL, 1 reverse KL (default: 0.5)")
    group.add_argument("--init", default="cut", choices=("cut", "random"),
                       help="cut: keep the teacher's most active units; random: same shape, fresh weights "
                            "(default: cut)")
    group.add_argument("--kv-heads", type=int, default=None,
                       help="key/value heads of the student (default: as few whole teacher groups as hold --heads)")
    group.add_argument("--seq-len", type=int, default=256, help="tokens per training sequence (default: 256)")
    group.add_argument("--val-data", default=None, help="validation corpus (default: the last --val-fraction of --data)")
    group.add_argument("--val-fraction", type=float, default=0.1,
                       help="tail of the corpus's tokens held out for validation (default: 0.1)")
    group.add_argument("--max-val-rows", type=int, default=64,
                       help="validation sequences scored at each evaluation while training (default: 64; 0: all)")
    group.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                       help="bf16 autocast for the student and the teacher's passes, auto where the CPU has bf16 "
                            "(default: auto)")
    group.add_argument("--on-policy-ratio", type=float, default=0.5,
                       help="gkd: share of steps on the student's own samples, GKD's lambda (default: 0.5)")
    group.add_argument("--prompt-tokens", type=int, default=32,
                       help="gkd and sequence: corpus tokens each continuation starts from (default: 32)")
    group.add_argument("--sample-temperature", type=float, default=1.0,
                       help="gkd and sequence: temperature the continuations are sampled at (default: 1.0)")
    group.add_argument("--sequences", type=int, default=0,
                       help="sequence: teacher continuations to generate (default: 0, one per training sequence)")
    group.add_argument("--baseline-lr", type=float, default=None,
                       help="learning rate of the scratch baseline (default: --lr)")
    defer_task_defaults(parser)


def defer_task_defaults(parser: argparse.ArgumentParser) -> None:
    """Leave the `TASK_DEFAULTS` flags unset (None) until the task is known, and say each task's default."""
    for action in parser._actions:
        if action.dest == "baseline":
            action.help += " (causal LMs: the same student shape trained from scratch on as many tokens)"
        if action.dest in TASK_DEFAULTS:
            action.default = None
            shown = {"layers": "4/5 of the teacher's", "epochs": "auto (a step budget from the data size)",
                     "ffn": "3/5 of the teacher's", "top_k": "every label"}.get(action.dest, "the teacher's")
            parts = [f"{shown if value is None else value} for {_TASK_NAMES[task]}"
                     for task, value in TASK_DEFAULTS[action.dest].items() if value is not None or task != "answers"]
            note = f"(default: {', '.join(parts)})"
            action.help = re.sub(r"\(default: [^)]*\)", note, action.help or "") if "(default:" in (action.help or "") \
                else f"{action.help} {note}"


def fill_task_defaults(args: argparse.Namespace, task: str) -> None:
    """Give every `TASK_DEFAULTS` flag left unset its default for `task` ("classify", "lm" or "answers")."""
    for dest, defaults in TASK_DEFAULTS.items():
        if getattr(args, dest, None) is None:
            setattr(args, dest, defaults.get(task, defaults["classify"]))


def is_causal_lm_task(args: argparse.Namespace) -> bool:
    """gkd and sequence are for causal LMs; kd is too when --task lm says so or the teacher is one."""
    if args.method in ("gkd", "sequence"):
        return True
    if args.task != "auto":
        return args.task == "lm"
    from smallmighty.models.causal_lm import is_causal_lm

    return bool(args.teacher) and is_causal_lm(args.teacher)


def run_causal_lm(args: argparse.Namespace) -> int:
    from smallmighty.distill.causal_lm import LMDistillConfig
    from smallmighty.distill.lm_pipeline import run_lm_pipeline
    from smallmighty.distill.losses import DistillWeights
    from smallmighty.errors import SlmError
    from smallmighty.models.decoder_prune import DecoderCut
    from smallmighty.train.arguments import train_config_from_args

    fill_task_defaults(args, "lm")
    if not args.data:
        raise SlmError("distilling a causal LM needs --data: a text corpus (a text file, a JSONL file, a folder of "
                       "them or a Hugging Face dataset)")
    train = train_config_from_args(args, eval_every=args.eval_every, weight_decay=0.1, warmup_ratio=0.05,
                                   schedule="cosine", min_lr_ratio=0.1)
    config = LMDistillConfig(
        method=args.method, divergence=args.divergence, beta=args.beta,
        weights=DistillWeights(kd=args.alpha_kd, ce=args.alpha_ce, hidden=args.alpha_hidden,
                               attention=args.alpha_attention, temperature=args.temperature),
        top_k=args.top_k, layer_map=args.layer_map,
        cut=DecoderCut(layers=args.layers, hidden=args.hidden, heads=args.heads, kv_heads=args.kv_heads, ffn=args.ffn),
        init=args.init, student=args.student, trim_vocab=args.trim_vocab, seq_len=args.seq_len,
        text_field=args.text_field, val_fraction=args.val_fraction, val_data=args.val_data,
        max_val_rows=args.max_val_rows, precision=args.precision, on_policy_ratio=args.on_policy_ratio,
        prompt_tokens=args.prompt_tokens, sample_temperature=args.sample_temperature, sequences=args.sequences,
        teacher_precision=args.teacher_precision, train=train)
    baseline_train = train_config_from_args(args, eval_every=args.eval_every, weight_decay=0.1, warmup_ratio=0.05,
                                            schedule="cosine", min_lr_ratio=0.1)
    baseline_train.lr = args.baseline_lr or args.lr
    run_lm_pipeline(args.teacher, args.data, args.out, config, baseline=args.baseline, baseline_train=baseline_train,
                    resume=args.resume)
    return 0
