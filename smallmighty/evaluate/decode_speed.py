"""Decoding speed and memory of a causal LM in our engine, measured in a fresh process.

A fresh process per model and precision, for the same reason as `speed.profile_classifier`: the
parent holds other models and data, which would inflate the peak RSS and warm the caches. The
child loads the model with `engine.generate.Engine`, generates once untimed (building the native
step and any quantized weights), then times `tokens` greedy tokens at batch 1 with end-of-sequence
ignored, so every model makes exactly as many tokens.

Run as a module (`python -m smallmighty.evaluate.decode_speed --model DIR --precision P`), this file
is that child.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from smallmighty.errors import SlmError
from smallmighty.evaluate.speed import USER_ERROR_STATUS, peak_rss_mb, run_child
from smallmighty.io import write_text

#: The prompt every model continues (tokenised by each model's own tokenizer).
PROMPT = "Once upon a time, in a small town by the sea, there lived"


def profile_decode(model_dir: str, precision: str, *, tokens: int = 128) -> dict:
    """{"decode_tok_s", "peak_rss_mb", "load_s"} of `model_dir` at `precision`, from a fresh process."""
    return run_child("smallmighty.evaluate.decode_speed",
                     ["--model", str(model_dir), "--precision", precision, "--tokens", str(tokens)],
                     what=f"timing {model_dir} ({precision})")


def _measure(model_dir: str, precision: str, tokens: int) -> dict:
    from smallmighty.engine.generate import Engine
    from smallmighty.engine.sampling import GenerationSettings

    start = time.perf_counter()
    engine = Engine.from_pretrained(model_dir, precision=precision)
    load_s = time.perf_counter() - start
    engine.eos_token_ids = set()  # exactly `tokens` new tokens for every model
    prompt = [engine.encode(PROMPT)]
    engine.generate(prompt, GenerationSettings(max_new_tokens=8))
    start = time.perf_counter()
    engine.generate(prompt, GenerationSettings(max_new_tokens=tokens))
    return {"decode_tok_s": tokens / (time.perf_counter() - start), "peak_rss_mb": peak_rss_mb(), "load_s": load_s}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m smallmighty.evaluate.decode_speed",
                                     description="Time batch-1 decoding of one causal LM in this fresh process.")
    parser.add_argument("--model", required=True, help="model folder (config.json, safetensors, tokenizer.json)")
    parser.add_argument("--precision", default="fp32", help="fp32, int8 or int4")
    parser.add_argument("--tokens", type=int, default=128, help="tokens timed (default: 128)")
    parser.add_argument("--out", default=None, help="write the JSON here instead of stdout")
    args = parser.parse_args(argv)
    try:
        result = _measure(args.model, args.precision, args.tokens)
    except SlmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USER_ERROR_STATUS
    if args.out:
        write_text(args.out, json.dumps(result) + "\n")
    else:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
