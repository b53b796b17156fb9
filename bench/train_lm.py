"""Training throughput of `slm pretrain` against Hugging Face `Trainer` on the same model, data, batch and precision.

A Llama-style decoder (the "30m" preset: 29.4M parameters with an 8,192-token byte-level BPE) trains
on packed rows of 256 tokens of tiny Shakespeare, batch 8, AdamW, warm-up + cosine, gradient clipping
at 1.0. Each side runs in its own fresh process: ours (`smallmighty.train.pretrain.pretrain`, the
function behind `slm pretrain`, with its defaults: its training attention and fused output-layer loss)
and `transformers.Trainer` configured at its best on a CPU (the same autocast precision, transformers'
fastest training attention here (eager; SDPA's CPU backward is slow), fused AdamW, no
logging/saving/evaluation inside the timed steps, and `torch_compile` when ours compiles). Tokens/s
is measured over the steps after `--warmup` steps (compilation, allocator warm-up), from each loop's
own step-end times. The sides alternate for `--rounds` runs each (ABBA order), so a machine that
speeds up or slows down over minutes favours neither. bench/train_parts.py times each of our pieces
against what it replaced.

MFU = 6 x parameters x tokens/s over this machine's fp32 matmul peak, measured in the same run
(a 4096^3 fp32 matmul, best of 5, with the same threads). With bf16 autocast the matrix products run
in bf16, whose own peak (also measured and reported) is higher: `ours_mfu` is against the fp32 peak as
the issue defines it, `ours_mfu_bf16_peak` against the bf16 one.

Ends with one JSON line. `--quick` is a smoke run (tiny model, a few steps).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "datasets" / "tinyshakespeare" / "input.txt"


def matmul_peak_gflops(dtype_name: str, n: int = 4096, reps: int = 5) -> float:
    import torch

    dtype = getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[dtype_name])
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e9


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _setup(args):
    """Tokenizer, packed rows and a fresh model: the same for both sides (same seed)."""
    from smallmighty.data.corpus import load_corpus
    from smallmighty.models.decoder import build_decoder, decoder_shape
    from smallmighty.train.pretrain import corpus_tokenizer

    tok = corpus_tokenizer(args.data, args.vocab_size)
    corpus = load_corpus(args.data, tok, args.seq_len, progress=False)
    shape = decoder_shape(args.preset)
    return tok, corpus, shape, build_decoder(shape, tok, seed=0)


def _train_config(args):
    from smallmighty.train.loop import TrainConfig

    return TrainConfig(max_steps=args.warmup + args.steps, batch_size=args.batch_size, lr=3e-4, schedule="cosine",
                       min_lr_ratio=0.1, weight_decay=0.1, warmup_ratio=0.05, checkpoint_every=0)


def run_ours(args) -> dict:
    from smallmighty.models.decoder import decoder_shape
    from smallmighty.train.pretrain import PretrainConfig, pretrain

    with tempfile.TemporaryDirectory() as tmp:
        result = pretrain(args.data, Path(tmp) / "model", shape=decoder_shape(args.preset),
                          config=_train_config(args),
                          settings=PretrainConfig(seq_len=args.seq_len, vocab_size=args.vocab_size,
                                                  precision=args.precision, compile=args.compile,
                                                  attention=args.ours_attention, max_val_rows=8))
    return _rate(result.step_ends, args, sum(p.numel() for p in result.module.model.parameters()))


def run_trainer(args) -> dict:
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from smallmighty.train.causal_lm import resolve_precision

    tok, corpus, shape, model = _setup(args)
    model.set_attn_implementation(args.attention)
    config = _train_config(args)
    rows = [{"input_ids": row, "labels": row} for row in corpus.train]
    ends: list[float] = []

    class StepTimes(TrainerCallback):
        def on_train_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            ends.append(time.perf_counter() - self.start)

    bf16 = resolve_precision(args.precision) == "bf16"
    with tempfile.TemporaryDirectory() as tmp:
        training_args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=args.batch_size, max_steps=config.max_steps,
            learning_rate=config.lr, lr_scheduler_type="cosine_with_min_lr",
            lr_scheduler_kwargs={"min_lr_rate": config.min_lr_ratio},
            warmup_steps=config.warmup_ratio,
            weight_decay=config.weight_decay, max_grad_norm=config.max_grad_norm, bf16=bf16, use_cpu=True,
            optim="adamw_torch_fused", torch_compile=args.compile, logging_strategy="no", save_strategy="no",
            eval_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0, seed=0,
            data_seed=0)
        trainer = Trainer(model=model, args=training_args, train_dataset=rows, callbacks=[StepTimes()])
        trainer.train()
    del torch
    return _rate(ends, args, sum(p.numel() for p in model.parameters()))


def _rate(ends: list[float], args, params: int) -> dict:
    if len(ends) != args.warmup + args.steps:
        raise RuntimeError(f"expected {args.warmup + args.steps} step times, got {len(ends)}")
    seconds = ends[-1] - ends[args.warmup - 1]
    return {"tok_s": args.batch_size * args.seq_len * args.steps / seconds, "params": params,
            "warmup_s": ends[args.warmup - 1], "s_per_step": seconds / args.steps}


def child(side: str, args) -> dict:
    """Run one side in a fresh interpreter (no compiled graphs or allocator state shared)."""
    cmd = [sys.executable, __file__, "--side", side, *sys.argv[1:]]
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{side} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--preset", default="30m")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per side and round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=3,
                        help="runs per side, alternating; each side's figure is its median (odd: a real run)")
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--attention", default="eager", choices=("eager", "sdpa"),
                        help="Trainer's attention implementation (default: eager, its fastest for training on CPUs)")
    parser.add_argument("--ours-attention", default="slm_eager", choices=("slm_eager", "eager", "sdpa"),
                        help="slm pretrain's --attention (default: its own default, slm_eager)")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny model, 3 timed steps")
    parser.add_argument("--side", choices=("ours", "trainer"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.preset, args.steps, args.warmup, args.vocab_size, args.rounds = "tiny", 3, 2, 1024, 1
    if args.side:
        print(json.dumps(run_ours(args) if args.side == "ours" else run_trainer(args)))
        return

    from smallmighty.train.causal_lm import resolve_precision

    precision = resolve_precision(args.precision)
    peak = {name: matmul_peak_gflops(name) for name in ("fp32", "bf16")}
    # The machine's speed drifts over minutes (shared hosts), so the sides alternate, ABBA order, and
    # each side's figure is its median round; the speed-up is the median of the rounds' ratios.
    runs: dict[str, list[dict]] = {"ours": [], "trainer": []}
    for round_ in range(args.rounds):
        for side in ("ours", "trainer") if round_ % 2 == 0 else ("trainer", "ours"):
            runs[side].append(child(side, args))
    ratios = [o["tok_s"] / t["tok_s"] for o, t in zip(runs["ours"], runs["trainer"])]
    ours, hf = (sorted(runs[side], key=lambda r: r["tok_s"])[(args.rounds - 1) // 2] for side in ("ours", "trainer"))
    flops_per_token = 6 * ours["params"]
    mfu = {side: flops_per_token * r["tok_s"] / 1e9 / peak["fp32"] for side, r in (("ours", ours), ("hf", hf))}
    print(f"{cpu_name()}, {os.environ.get('OMP_NUM_THREADS', '?')} threads; {args.preset} preset "
          f"({ours['params'] / 1e6:.1f}M parameters), seq {args.seq_len}, batch {args.batch_size}, {precision}"
          f"{', torch.compile' if args.compile else ''}, attention: ours {args.ours_attention}, "
          f"Trainer {args.attention}; "
          f"matmul peak fp32 {peak['fp32']:.0f} / bf16 "
          f"{peak['bf16']:.0f} GFLOP/s")
    print(f"{'loop':<14}{'tokens/s':>10}{'s/step':>9}{'MFU (fp32 peak)':>17}{'warm-up s':>11}")
    for name, r in (("slm pretrain", ours), ("HF Trainer", hf)):
        side = "ours" if r is ours else "hf"
        print(f"{name:<14}{r['tok_s']:>10.0f}{r['s_per_step']:>9.2f}{mfu[side]:>16.0%}{r['warmup_s']:>11.1f}")
    print(json.dumps({
        "ours_tok_s": round(ours["tok_s"], 1), "hf_trainer_tok_s": round(hf["tok_s"], 1),
        "speedup": round(sorted(ratios)[(args.rounds - 1) // 2], 3),
        "round_speedups": [round(r, 3) for r in ratios], "ours_mfu": round(mfu["ours"], 4),
        "ours_mfu_bf16_peak": round(mfu["ours"] * peak["fp32"] / peak["bf16"], 4),
        "hf_trainer_mfu": round(mfu["hf"], 4), "matmul_peak_gflops": round(peak["fp32"], 1),
        "matmul_peak_bf16_gflops": round(peak["bf16"], 1), "params": ours["params"], "precision": precision,
        "compile": args.compile, "attention": args.attention,
        "ours_attention": args.ours_attention, "seq_len": args.seq_len,
        "batch_size": args.batch_size, "steps": args.steps, "rounds": args.rounds,
        "cpu": cpu_name(), "threads": os.environ.get("OMP_NUM_THREADS")}))


if __name__ == "__main__":
    main()
