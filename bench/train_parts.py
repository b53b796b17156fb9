"""Each piece that makes `slm pretrain` fast, timed against what it replaced, the two alternated in one process.

1. loss: the 30m preset's output layer and next-token loss (8 x 255 tokens of 512 features to 8,192
   words), forward and backward: `train.linear_cross_entropy` against autocast logits + `.float()` +
   `F.cross_entropy` (what transformers' `labels=` loss does).
2. attention: a whole 30m training step (bf16, batch 8 x 256, AdamW, clipping) with the training
   attention (`slm_eager`) against transformers' eager attention, two copies of the same model.
3. optimizer: AdamW's step on the 30m model's gradients, fused against foreach (torch's default).
4. vocabulary: forward and backward of SmolLM2-135M (49,152 words; batch 8 x 256, bf16, every weight
   trained) through `CausalLMObjective` against the usual logits + cross-entropy loss.

Alternating A and B (`--reps` times, the first of each untimed) keeps a machine whose speed drifts
from favouring either. Each row reports both medians and their ratio; the script ends with one JSON
line. `--quick` is a smoke run (tiny model, two reps, `--large-model` for part 4).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from smallmighty.evaluate.speed import hardware_info
from smallmighty.models.causal_lm import load_hf_causal_lm
from smallmighty.models.decoder import build_decoder, decoder_shape
from smallmighty.train.causal_lm import CausalLMObjective, causal_lm_loss
from smallmighty.train.linear_cross_entropy import linear_cross_entropy
from smallmighty.train.pretrain import corpus_tokenizer

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "tinyshakespeare" / "input.txt"


def alternate(ours: Callable[[], float | None], theirs: Callable[[], float | None], reps: int) -> dict:
    """Median seconds of each callable over `reps` alternated calls (the first of each untimed). A
    callable may return the seconds to count itself (the part it times); otherwise its whole call."""
    times: dict[str, list[float]] = {"ours": [], "theirs": []}
    for rep in range(reps + 1):
        for name, run in (("ours", ours), ("theirs", theirs)):
            start = time.perf_counter()
            counted = run()
            if rep:
                times[name].append(counted if counted is not None else time.perf_counter() - start)
    ours_s, theirs_s = (statistics.median(times[name]) for name in ("ours", "theirs"))
    return {"ours_ms": round(ours_s * 1e3, 1), "theirs_ms": round(theirs_s * 1e3, 1),
            "speedup": round(theirs_s / ours_s, 3)}


def train_step(objective: CausalLMObjective, optimizer: torch.optim.Optimizer, batch: dict) -> float:
    """One optimizer step as the training loop takes it; returns the seconds of `optimizer.step()`."""
    loss, _ = objective(batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(objective.parameters(), 1.0)
    start = time.perf_counter()
    optimizer.step()
    seconds = time.perf_counter() - start
    optimizer.zero_grad(set_to_none=True)
    return seconds


def backward_of(loss: Callable[[], torch.Tensor], *tensors: torch.Tensor) -> Callable[[], None]:
    """A call that runs `loss()` backward and drops the gradients it left on `tensors`."""
    def run() -> None:
        loss().backward()
        for tensor in tensors:
            tensor.grad = None
    return run


def usual_model_loss(model, batch: dict) -> torch.Tensor:
    """The loss before the blocked one: the model's logits under autocast, then `causal_lm_loss`."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=batch["input_ids"], use_cache=False).logits
    return causal_lm_loss(logits, batch["labels"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(DATA), help="text for the tokenizer and the batches")
    parser.add_argument("--preset", default="30m")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--reps", type=int, default=8, help="timed calls of each side (parts 1-3)")
    parser.add_argument("--large-reps", type=int, default=4, help="timed calls of each side (part 4)")
    parser.add_argument("--large-model", default=None,
                        help="the model of part 4 (default: SmolLM2-135M-Instruct, installed with the package)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny model, two reps")
    args = parser.parse_args()
    if args.quick:
        args.preset, args.vocab_size, args.reps, args.large_reps = "tiny", 1024, 2, 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tokenizer = corpus_tokenizer(args.data, args.vocab_size)
    model = build_decoder(decoder_shape(args.preset), tokenizer, seed=0).train()
    ids = torch.randint(3, len(tokenizer), (8, 256))
    batch = {"input_ids": ids, "labels": ids}
    parts = {}

    hidden = torch.randn(8 * 255, model.config.hidden_size, requires_grad=True)
    weight = model.lm_head.weight.detach().clone().requires_grad_()
    labels = ids[:, 1:].flatten()

    def usual_loss() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = hidden @ weight.t()
        return F.cross_entropy(logits.float(), labels)

    parts["loss"] = alternate(
        backward_of(lambda: linear_cross_entropy(hidden, weight, labels, dtype=torch.bfloat16), hidden, weight),
        backward_of(usual_loss, hidden, weight), args.reps)

    ours = CausalLMObjective(model, precision="bf16")
    eager = CausalLMObjective(copy.deepcopy(model), precision="bf16", attention="eager")
    fused = {o: torch.optim.AdamW(o.parameters(), lr=3e-4, fused=True) for o in (ours, eager)}

    def whole_step(objective: CausalLMObjective) -> Callable[[], None]:
        def run() -> None:  # timed whole, not just its optimizer step
            train_step(objective, fused[objective], batch)
        return run

    parts["attention"] = alternate(whole_step(ours), whole_step(eager), args.reps)
    foreach = torch.optim.AdamW(ours.parameters(), lr=3e-4, foreach=True)
    parts["optimizer"] = alternate(lambda: train_step(ours, fused[ours], batch),
                                   lambda: train_step(ours, foreach, batch), args.reps)

    large, large_tokenizer = load_hf_causal_lm(args.large_model)
    large.train()
    large_ids = torch.randint(3, len(large_tokenizer), (8, 256))
    large_batch = {"input_ids": large_ids, "labels": large_ids}
    large_objective = CausalLMObjective(large, precision="bf16")
    weights = list(large.parameters())
    parts["vocabulary"] = alternate(backward_of(lambda: large_objective(large_batch)[0], *weights),
                                    backward_of(lambda: usual_model_loss(large, large_batch), *weights),
                                    args.large_reps)
    parts["vocabulary"]["vocab_size"] = large.config.vocab_size

    cpu = hardware_info()["cpu"]
    print(f"{cpu}, {args.threads} threads; {args.preset} preset, bf16; medians of alternated calls")
    print(f"{'part':<12}{'ours ms':>10}{'replaced ms':>13}{'speed-up':>10}")
    for name, row in parts.items():
        print(f"{name:<12}{row['ours_ms']:>10.1f}{row['theirs_ms']:>13.1f}{row['speedup']:>9.2f}x")
    print(json.dumps({"parts": parts, "preset": args.preset, "reps": args.reps, "large_reps": args.large_reps,
                      "threads": args.threads, "cpu": cpu, "quick": args.quick}))


if __name__ == "__main__":
    main()
