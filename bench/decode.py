"""Decode and prefill speed of SmolLM2-135M-Instruct: our engine against transformers and llama.cpp.

One run on this machine measures every backend under the same conditions (2 threads, same prompt,
same number of new tokens, greedy), prints a table, and ends with ONE JSON line of the figures:

    PYTHONPATH=. python bench/decode.py            # full run (median of 3)
    PYTHONPATH=. python bench/decode.py --quick    # smoke run: 32 tokens, one repeat
    PYTHONPATH=. python bench/decode.py --skip-llamacpp

Decode tokens/s = new tokens / wall time of the whole generate call (the ~44-token prompt included),
with the end-of-sequence token ignored so every backend produces exactly the same number of tokens.
Prefill tokens/s = 512 prompt tokens / time of one forward pass over them (ours: generate with one
new token). llama.cpp comes from llama-cpp-python 0.3.36, built from source if missing (about 11
minutes on 2 cores; it is a benchmark extra, never a dependency); its f32 and q8_0 GGUFs are made from
our converted folder with the converter its sdist ships, and Q4_1 is the original PyPI file.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from smallmighty.defaults import default_causal_lm_gguf  # noqa: E402
from smallmighty.io import atomic_path  # noqa: E402
from smallmighty.models.causal_lm import load_hf_causal_lm, resolve_causal_lm  # noqa: E402

LLAMA_CPP_VERSION = "0.3.36"
THREADS = 2
QUESTION = "What are the three primary colours, and why are they called primary?"
#: Distinct questions for the batch-8 run, so the batch is a realistic mix rather than one prompt copied.
BATCH_QUESTIONS = [
    QUESTION, "Explain photosynthesis to a ten-year-old.", "Write a short poem about the sea.",
    "What is the capital of Australia?", "Give me three tips for learning to cook.",
    "Why is the sky blue?", "How does a bicycle stay upright?", "Summarise the plot of Romeo and Juliet.",
]
PREFILL_TEXT = ("The history of computing is a story of people finding faster ways to do arithmetic, from the "
                "abacus and slide rule to mechanical calculators, vacuum tubes, transistors and chips. ")


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def median_rate(count: int, run: Callable[[], Any], repeats: int) -> float:
    """Median of `count / seconds` over `repeats` timed calls, after one untimed warm-up call."""
    run()
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        rates.append(count / (time.perf_counter() - start))
    return statistics.median(rates)


# --- workload ---------------------------------------------------------------------------------

def chat_prompt(tokenizer: Any, question: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)


def prefill_ids(encode: Callable[[str], list[int]], length: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < length:
        ids += encode(PREFILL_TEXT)
    return ids[:length]


# --- backends ---------------------------------------------------------------------------------

def bench_hf(model_dir: Path, args: argparse.Namespace, results: dict[str, float]) -> list[int]:
    """transformers fp32 `generate` and forward pass; returns the prompt ids every backend reuses."""
    import torch

    torch.set_num_threads(THREADS)
    model, tokenizer = load_hf_causal_lm(model_dir)
    ids = tokenizer(chat_prompt(tokenizer, QUESTION), add_special_tokens=False)["input_ids"]
    prompt = torch.tensor([ids])
    n = args.new_tokens

    def generate() -> None:
        with torch.inference_mode():
            out = model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 attention_mask=torch.ones_like(prompt), pad_token_id=tokenizer.eos_token_id)
        assert out.shape[1] == len(ids) + n

    log(f"transformers fp32: {len(ids)}-token prompt, {n} new tokens")
    results["hf_fp32"] = median_rate(n, generate, args.repeats)
    long = torch.tensor([prefill_ids(lambda t: tokenizer(t, add_special_tokens=False)["input_ids"],
                                     args.prefill_tokens)])

    def forward() -> None:
        with torch.inference_mode():
            model(long)

    results["prefill_hf_fp32"] = median_rate(args.prefill_tokens, forward, args.repeats)
    del model
    gc.collect()
    return ids


def bench_ours(model_dir: Path, ids: list[int], args: argparse.Namespace, results: dict[str, float]) -> None:
    from smallmighty.serve.engine import Engine
    from smallmighty.serve.sampling import GenerationSettings

    n = args.new_tokens
    settings = GenerationSettings(max_new_tokens=n, temperature=0.0)
    for precision in ("fp32", "int8", "int4"):
        log(f"ours {precision}")
        engine = Engine.from_pretrained(model_dir, precision=precision)
        engine.eos_token_ids = set()  # produce exactly n tokens, like the other backends

        def generate(prompts: list[list[int]]) -> None:
            out = engine.generate(prompts, settings)
            assert all(len(o) == n for o in out), [len(o) for o in out]

        results[f"ours_{precision}"] = median_rate(n, lambda: generate([ids]), args.repeats)
        if precision != "int4":
            long = prefill_ids(engine.encode, args.prefill_tokens)
            one = GenerationSettings(max_new_tokens=1, temperature=0.0)
            results[f"prefill_ours_{precision}"] = median_rate(
                args.prefill_tokens, lambda: engine.generate([long], one), args.repeats)
        if precision == "int8":
            batch = [engine.encode(engine.apply_chat_template([{"role": "user", "content": q}]))
                     for q in BATCH_QUESTIONS]
            log(f"ours int8, batch of {len(batch)}")
            results["ours_batch1"] = results["ours_int8"]
            results["ours_batch8_aggregate"] = median_rate(n * len(batch), lambda: generate(batch), args.repeats)
        del engine
        gc.collect()


def ensure_llama_cpp(cache: Path) -> Path:
    """Install llama-cpp-python if missing and return its unpacked sdist (for the GGUF converter)."""
    if importlib.util.find_spec("llama_cpp") is None:
        log(f"llama-cpp-python is not installed: building {LLAMA_CPP_VERSION} from source into this "
            "environment now (about 11 minutes on 2 cores). Use --skip-llamacpp to skip the llama.cpp rows.")
        subprocess.run([sys.executable, "-m", "pip", "install", f"llama-cpp-python=={LLAMA_CPP_VERSION}"],
                       check=True)
    source = cache / f"llama_cpp_python-{LLAMA_CPP_VERSION}"
    if not source.is_dir():
        log("fetching the llama-cpp-python sdist for its HF-to-GGUF converter")
        with atomic_path(cache / "sdist") as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                            f"llama-cpp-python=={LLAMA_CPP_VERSION}", "-d", str(tmp)], check=True)
            (archive,) = tmp.glob("*.tar.gz")
            with atomic_path(source) as unpacked:
                with tarfile.open(archive) as tar:
                    tar.extractall(unpacked.parent / "x", filter="data")
                (unpacked.parent / "x" / source.name).rename(unpacked)
    return source


def llama_cpp_ggufs(model_dir: Path, source: Path, cache: Path) -> dict[str, Path]:
    """f32 and q8_0 GGUFs converted from our folder (once), plus the original Q4_1."""
    files = {"q4_1": Path(default_causal_lm_gguf())}
    converter = source / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    for outtype in ("f32", "q8_0"):
        target = cache / f"{model_dir.name}.{outtype}.gguf"
        if not target.is_file():
            log(f"converting {model_dir.name} to {outtype} GGUF with llama.cpp's converter")
            with atomic_path(target) as tmp:
                done = subprocess.run([sys.executable, str(converter), str(model_dir), "--outtype", outtype,
                                       "--outfile", str(tmp)], capture_output=True, text=True)
                if done.returncode != 0:
                    raise RuntimeError(f"llama.cpp's converter failed:\n{done.stderr[-3000:]}")
        files[outtype] = target
    return files


def bench_llama_cpp(files: dict[str, Path], prompt: str, args: argparse.Namespace,
                    results: dict[str, float]) -> None:
    from llama_cpp import Llama

    n = args.new_tokens
    for name, path in files.items():
        log(f"llama.cpp {name}")
        llm = Llama(str(path), n_ctx=args.prefill_tokens + n + 64, n_batch=args.prefill_tokens,
                    n_threads=THREADS, n_threads_batch=THREADS, verbose=False)
        ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)

        def generate() -> None:
            llm.reset()  # no reuse of the previous run's prompt cache
            for count, _ in enumerate(llm.generate(ids, temp=0.0, top_k=1, reset=True), start=1):
                if count == n:
                    break

        results[f"llamacpp_{name}"] = median_rate(n, generate, args.repeats)
        long = prefill_ids(lambda t: llm.tokenize(t.encode(), add_bos=False), args.prefill_tokens)

        def prefill() -> None:
            llm.reset()
            llm.eval(long)

        results[f"prefill_llamacpp_{name}"] = median_rate(args.prefill_tokens, prefill, args.repeats)
        del llm
        gc.collect()


def bench_cold_start(args: argparse.Namespace, results: dict[str, float]) -> None:
    """Run `slm generate --precision int8` twice; the second run's start-to-first-byte time counts."""
    command = [sys.executable, "-m", "smallmighty.cli", "generate", "--precision", "int8",
               "--max-new-tokens", "16"]
    env = os.environ | {"PYTHONPATH": str(REPO)}
    for attempt in ("first", "second"):
        start = time.perf_counter()
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, bufsize=0)
        first = child.stdout.read(1)
        first_byte = time.perf_counter() - start
        child.stdout.read()
        # wait4 reports this child's own peak RSS (getrusage(RUSAGE_CHILDREN) would mix in others).
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait again
        if child.returncode != 0 or not first:
            raise RuntimeError(f"`{' '.join(command)}` failed with status {child.returncode}")
        log(f"cold start, {attempt} run: first token after {first_byte:.2f} s, peak RSS {usage.ru_maxrss / 1024:.0f} MB")
    results["cold_start_s"] = first_byte
    results["peak_rss_mb"] = usage.ru_maxrss / 1024


# --- report -----------------------------------------------------------------------------------

ROWS = [  # label, decode key, prefill key
    ("transformers fp32", "hf_fp32", "prefill_hf_fp32"),
    ("ours fp32", "ours_fp32", "prefill_ours_fp32"),
    ("ours int8", "ours_int8", "prefill_ours_int8"),
    ("ours int4", "ours_int4", None),
    ("ours int8, batch 8 (aggregate)", "ours_batch8_aggregate", None),
    ("llama.cpp f32", "llamacpp_f32", "prefill_llamacpp_f32"),
    ("llama.cpp q8_0", "llamacpp_q8_0", "prefill_llamacpp_q8_0"),
    ("llama.cpp Q4_1", "llamacpp_q4_1", "prefill_llamacpp_q4_1"),
]
RATIOS = {
    "ratio_ours_fp32_vs_llamacpp_f32": ("ours_fp32", "llamacpp_f32"),
    "ratio_ours_int8_vs_llamacpp_q8_0": ("ours_int8", "llamacpp_q8_0"),
    "ratio_ours_int8_vs_hf_fp32": ("ours_int8", "hf_fp32"),
    "ratio_batch8_vs_batch1": ("ours_batch8_aggregate", "ours_batch1"),
}


def report(results: dict[str, float], args: argparse.Namespace) -> None:
    for key, (num, den) in RATIOS.items():
        if num in results and den in results:
            results[key] = results[num] / results[den]

    def cell(key: str | None) -> str:
        return f"{results[key]:.1f}" if key in results else "-"

    print(f"\nSmolLM2-135M-Instruct, {THREADS} threads, greedy, median of {args.repeats}")
    print(f"{'backend':34} {'decode tok/s':>13} {f'prefill {args.prefill_tokens} tok/s':>18}")
    for label, decode, prefill in ROWS:
        print(f"{label:34} {cell(decode):>13} {cell(prefill):>18}")
    for key in RATIOS:
        if key in results:
            print(f"{key:51} {results[key]:.2f}x")
    if "cold_start_s" in results:
        print(f"cold start (2nd run, process start to first token) {results['cold_start_s']:.2f} s, "
              f"peak RSS {results['peak_rss_mb']:.0f} MB")
    print(json.dumps({k: round(v, 3) for k, v in results.items()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 32 new tokens, 128-token prefill, one repeat")
    parser.add_argument("--skip-llamacpp", action="store_true", help="leave out llama.cpp (no build, no download)")
    parser.add_argument("--skip-cold-start", action="store_true", help="leave out the `slm generate` start-up runs")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure; the median counts")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.new_tokens, args.prefill_tokens = 1, 32, 128

    import torch

    torch.set_num_threads(THREADS)
    model_dir = resolve_causal_lm(None)
    results: dict[str, float] = {}
    if not args.skip_cold_start:
        bench_cold_start(args, results)
    ids = bench_hf(model_dir, args, results)
    bench_ours(model_dir, ids, args, results)
    if not args.skip_llamacpp:
        cache = model_dir.parent / "bench"
        files = llama_cpp_ggufs(model_dir, ensure_llama_cpp(cache), cache)
        from transformers import AutoTokenizer

        bench_llama_cpp(files, chat_prompt(AutoTokenizer.from_pretrained(model_dir), QUESTION), args, results)
    report(results, args)


if __name__ == "__main__":
    main()
