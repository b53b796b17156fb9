"""Headline claim: a causal LM distilled from SmolLM2-135M-Instruct into at most half its parameters is
much better than the same student trained from scratch on as many tokens, and close to its teacher.

One run on Tiny Shakespeare (first 90% of the characters train, last 10% validation):

1. the teacher's validation perplexity (SmolLM2-135M-Instruct as shipped, no fine-tuning);
2. the student: cut out of the teacher with `slm distill`'s default shape (the 24 of 30 blocks that
   change the residual stream most, each keeping its most active 928 of 1,536 FFN neurons, vocabulary
   trimmed to the tokens the training text uses: 0.4985x the teacher's parameters), trained on the
   teacher's cached top-k next-token distributions plus the text's own next tokens;
3. the scratch baseline: the same student shape from random weights, trained on the same rows for
   the same number of steps (its own learning rate);
4. all three scored on the validation text in our engine (per teacher token, so the trimmed
   vocabulary's finer split of unseen words does not flatter anyone) and timed decoding at fp32 and
   int8; the report card lands in the run folder.

    PYTHONPATH=. python bench/distill_lm.py              # the full run (300 steps each)
    PYTHONPATH=. python bench/distill_lm.py --steps 100  # a reduced run (bench/README.md has one)
    PYTHONPATH=. python bench/distill_lm.py --quick      # smoke run: a slice of the text, a few steps

The learning rates are set, not swept (1e-3 for both, `slm distill`'s default for causal LMs; 1e-3 healed
the cut student faster than 3e-4 in 80-step trials); bench/README.md says which settings were measured.
Prints the report-card table and ends with one JSON line of figures, including each stage's wall-clock
(`timings_s`) and the wall-clock per training step (`step_s`, periodic validation included).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from smallmighty.distill.causal_lm import LMDistillConfig
from smallmighty.distill.lm_pipeline import run_lm_pipeline
from smallmighty.distill.losses import DistillWeights
from smallmighty.evaluate.speed import hardware_info
from smallmighty.io import write_text
from smallmighty.models.decoder_prune import DecoderCut
from smallmighty.train.loop import TrainConfig

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "tinyshakespeare" / "input.txt"


def split_text(source: Path, folder: Path, quick: bool) -> tuple[Path, Path]:
    """train.txt (first 90% of the characters) and val.txt (the rest) in `folder`; --quick keeps the
    first 60,000 characters of the text before splitting."""
    text = source.read_text(encoding="utf-8")
    if quick:
        text = text[:60_000]
    cut = len(text) * 9 // 10
    train, val = folder / "train.txt", folder / "val.txt"
    write_text(train, text[:cut])
    write_text(val, text[cut:])
    return train, val


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA, help="the Tiny Shakespeare input.txt")
    parser.add_argument("--teacher", default=None, help="teacher model (default: SmolLM2-135M-Instruct from PyPI)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/distill_lm"))
    parser.add_argument("--quick", action="store_true", help="smoke run: 60k characters, a few steps")
    parser.add_argument("--layers", type=int, default=None, help="default: 4/5 of the teacher's blocks")
    parser.add_argument("--hidden", type=int, default=None, help="default: the teacher's")
    parser.add_argument("--heads", type=int, default=None, help="default: the teacher's")
    parser.add_argument("--kv-heads", type=int, default=None, help="default: the teacher's")
    parser.add_argument("--ffn", type=int, default=None, help="default: 3/5 of the teacher's, a multiple of 16")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps, student and baseline alike")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--lr", type=float, default=1e-3, help="the distilled student's peak learning rate")
    parser.add_argument("--baseline-lr", type=float, default=1e-3, help="the scratch baseline's peak learning rate")
    parser.add_argument("--divergence", default="forward_kl", choices=["forward_kl", "reverse_kl", "jsd"])
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--alpha-kd", type=float, default=1.0)
    parser.add_argument("--alpha-ce", type=float, default=0.5)
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--max-val-rows", type=int, default=32, help="validation rows scored while training")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--no-speed", dest="speed", action="store_false", help="skip the decode timings")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.eval_every, args.max_val_rows = min(args.steps, 6), 3, 4

    start = time.perf_counter()
    train_file, val_file = split_text(args.data, args.out / "data", args.quick)
    split_s = time.perf_counter() - start
    train = TrainConfig(max_steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                        eval_every=args.eval_every, weight_decay=0.1, warmup_ratio=0.05, schedule="cosine",
                        min_lr_ratio=0.1, checkpoint_every=100)
    config = LMDistillConfig(
        divergence=args.divergence, beta=args.beta,
        weights=DistillWeights(kd=args.alpha_kd, ce=args.alpha_ce, temperature=args.temperature), top_k=args.top_k,
        cut=DecoderCut(layers=args.layers, hidden=args.hidden, heads=args.heads, kv_heads=args.kv_heads, ffn=args.ffn),
        seq_len=args.seq_len, val_data=str(val_file), max_val_rows=args.max_val_rows, precision=args.precision,
        train=train)
    baseline = replace(train, lr=args.baseline_lr)
    card = run_lm_pipeline(args.teacher, str(train_file), args.out, config, baseline=True, baseline_train=baseline,
                           speed=args.speed)
    models = {m["role"]: m for m in card["models"]}
    teacher, student, scratch = models["teacher"], models["student"], models["baseline"]
    student_facts = card["training"]["student"]
    timings = {"split_s": split_s, **student_facts["timings_s"], "total_s": time.perf_counter() - start}
    figures = {
        "teacher_ppl": teacher["val_ppl"], "scratch_ppl": scratch["val_ppl"], "distilled_ppl": student["val_ppl"],
        "distilled_vs_scratch": student["val_ppl"] / scratch["val_ppl"],
        "distilled_vs_teacher": student["val_ppl"] / teacher["val_ppl"],
        "meets_targets": student["val_ppl"] <= 0.9 * scratch["val_ppl"] and student["val_ppl"] <= 1.3 * teacher["val_ppl"],
        "teacher_params": teacher["params"], "student_params": student["params"],
        "param_ratio": student["params"] / teacher["params"], "train_tokens": student_facts["train_tokens"],
        "scratch_train_tokens": card["training"]["scratch"]["train_tokens"],
        "validation_tokens": card["task"]["validation_tokens"],
        "teacher_decode_tok_s_int8": teacher["decode_tok_s_int8"], "student_decode_tok_s_int8": student["decode_tok_s_int8"],
        "teacher_decode_tok_s_fp32": teacher["decode_tok_s_fp32"], "student_decode_tok_s_fp32": student["decode_tok_s_fp32"],
        "timings_s": timings,
        # Wall-clock per optimizer step, periodic validation included.
        "step_s": {"distilled": timings["distill_train_s"] / max(1, student_facts["steps"]),
                   "scratch": timings["scratch_train_s"] / max(1, card["training"]["scratch"]["steps"])},
        "cpu": hardware_info()["cpu"], "quick": args.quick,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
