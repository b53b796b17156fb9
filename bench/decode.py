"""Decode and prefill speed of SmolLM2-135M-Instruct: our engine against transformers and llama.cpp.

One run on this machine measures every backend under the same conditions (2 threads, the same
prompt token ids, the same number of new tokens, greedy), prints a table, and ends with ONE JSON
line of the figures:

    PYTHONPATH=. python bench/decode.py            # full run (median of 3)
    PYTHONPATH=. python bench/decode.py --quick    # smoke run: 32 tokens, one repeat
    PYTHONPATH=. python bench/decode.py --skip-llamacpp

All backends are loaded first, then timed in turn within each repeat, so a burst of load from
other processes hits every backend rather than the one that happened to run then; each figure is
the median over repeats, after one untimed warm-up.

Our engine runs twice per precision: decoding in its native C step (the default) and in torch
operators (`Engine.from_pretrained(..., native=False)`, what it does without a C compiler).

Decode tokens/s = new tokens / wall time of the whole generate call (the 44-token prompt included),
with the end-of-sequence token ignored so every backend produces exactly the same number of tokens.
Prefill tokens/s = 512 prompt tokens / time of one forward pass over them (ours: generate with one
new token). llama.cpp comes from llama-cpp-python 0.3.36, built from source if missing (about 11
minutes on 2 cores; a benchmark extra, never a dependency); its f32 and q8_0 GGUFs are made from our
converted folder with the converter its sdist ships, and Q4_1 is the original PyPI file.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from smallmighty.cache import cache_dir  # noqa: E402
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

#: key -> (tokens one call produces or reads, the call)
Measurements = dict[str, tuple[int, Callable[[], Any]]]


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


class Workload:
    """The token ids every backend gets: the chat prompt, the batch prompts and the long prefill prompt."""

    def __init__(self, tokenizer: Any, new_tokens: int, prefill_tokens: int) -> None:
        def encode(text: str) -> list[int]:
            return tokenizer(text, add_special_tokens=False)["input_ids"]

        def chat(question: str) -> list[int]:
            return encode(tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                                        tokenize=False, add_generation_prompt=True))

        self.new_tokens = new_tokens
        self.prompt = chat(QUESTION)
        self.batch = [chat(q) for q in BATCH_QUESTIONS]
        long = encode(PREFILL_TEXT) * (prefill_tokens // len(encode(PREFILL_TEXT)) + 1)
        self.long = long[:prefill_tokens]


# --- backends: each returns its timed calls ---------------------------------------------------

def hf_measurements(model: Any, pad_id: int, work: Workload) -> Measurements:
    import torch

    n = work.new_tokens
    prompt, long = torch.tensor([work.prompt]), torch.tensor([work.long])

    def generate() -> None:
        with torch.inference_mode():
            out = model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 attention_mask=torch.ones_like(prompt), pad_token_id=pad_id)
        assert out.shape[1] == prompt.shape[1] + n

    def forward() -> None:
        with torch.inference_mode():
            model(long)

    return {"hf_fp32": (n, generate), "prefill_hf_fp32": (len(work.long), forward)}


def ours_measurements(model_dir: Path, work: Workload) -> Measurements:
    from smallmighty.engine.generate import Engine
    from smallmighty.engine.sampling import GenerationSettings

    n = work.new_tokens
    settings = GenerationSettings(max_new_tokens=n, temperature=0.0)
    one = GenerationSettings(max_new_tokens=1, temperature=0.0)
    found: Measurements = {}
    # Each precision twice: decoding in the native C step (what the engine does) and in torch
    # operators (what it does without a C compiler), to show what the native step is worth.
    for precision in ("fp32", "int8", "int4"):
        for native in (True, False):
            engine = Engine.from_pretrained(model_dir, precision=precision, native=native)
            engine.eos_token_ids = set()  # produce exactly n tokens, like the other backends
            suffix = "" if native else "_torch_ops"

            def generate(prompts: list[list[int]], engine: Any = engine) -> None:
                out = engine.generate(prompts, settings)
                assert all(len(o) == n for o in out), [len(o) for o in out]

            found[f"ours_{precision}{suffix}"] = (n, lambda g=generate: g([work.prompt]))
            if precision != "int4" and native:
                found[f"prefill_ours_{precision}"] = (len(work.long), lambda e=engine: e.generate([work.long], one))
            if precision == "int8":
                found[f"ours_batch8_aggregate{suffix}"] = (n * len(work.batch), lambda g=generate: g(work.batch))
    return found


def ensure_llama_cpp(cache: Path) -> Path:
    """Install llama-cpp-python if missing and return its unpacked sdist (for the GGUF converter)."""
    if importlib.util.find_spec("llama_cpp") is None:
        log(f"llama-cpp-python is not installed: building {LLAMA_CPP_VERSION} from source into this "
            "environment now (about 11 minutes on 2 cores). Use --skip-llamacpp to skip the llama.cpp rows.")
        subprocess.run([sys.executable, "-m", "pip", "install", f"llama-cpp-python=={LLAMA_CPP_VERSION}"],
                       check=True)
        importlib.invalidate_caches()
    return llama_cpp_sdist(cache)


def llama_cpp_sdist(cache: Path) -> Path:
    """The llama-cpp-python sdist, downloaded and unpacked once: its converter and llama.cpp's sources."""
    source = cache / f"llama_cpp_python-{LLAMA_CPP_VERSION}"
    if not source.is_dir():
        log("fetching the llama-cpp-python sdist for its HF-to-GGUF converter")
        with tempfile.TemporaryDirectory() as download, atomic_path(source) as unpacked:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                            f"llama-cpp-python=={LLAMA_CPP_VERSION}", "-d", download], check=True)
            (archive,) = Path(download).glob("*.tar.gz")
            with tarfile.open(archive) as tar:  # holds one top folder, named like `source`
                tar.extractall(unpacked.parent, filter="data")
    return source


def llama_cpp_ggufs(model_dir: Path, source: Path, cache: Path) -> dict[str, Path]:
    """f32 and q8_0 GGUFs converted from our folder (once), plus the original Q4_1."""
    files = {outtype: converted_gguf(model_dir, source, cache, outtype) for outtype in ("f32", "q8_0")}
    files["q4_1"] = Path(default_causal_lm_gguf())
    return files


def converted_gguf(model_dir: Path, source: Path, cache: Path, outtype: str) -> Path:
    """`model_dir` as a GGUF of `outtype`, made once with the converter the sdist ships."""
    converter = source / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    target = cache / f"{model_dir.name}.{outtype}.gguf"
    if not target.is_file():
        log(f"converting {model_dir.name} to {outtype} GGUF with llama.cpp's converter")
        with tempfile.TemporaryDirectory() as view, atomic_path(target) as tmp:
            done = subprocess.run([sys.executable, str(converter), str(hf_view(model_dir, Path(view))),
                                   "--outtype", outtype, "--outfile", str(tmp)], capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"llama.cpp's converter failed:\n{done.stderr[-3000:]}")
    return target


def hf_view(model_dir: Path, view: Path) -> Path:
    """Link `model_dir` into `view` without extra safetensors files (such as the engine's quantized
    caches), which llama.cpp's converter would otherwise read as model weights."""
    index = model_dir / "model.safetensors.index.json"
    weights = set(json.loads(index.read_text())["weight_map"].values()) if index.is_file() else {"model.safetensors"}
    for file in model_dir.iterdir():
        if file.suffix != ".safetensors" or file.name in weights:
            (view / file.name).symlink_to(file)
    return view


def llama_cpp_measurements(files: dict[str, Path], work: Workload) -> Measurements:
    from llama_cpp import Llama

    n = work.new_tokens
    found: Measurements = {}
    for name, path in files.items():
        llm = Llama(str(path), n_ctx=len(work.long) + n + 64, n_batch=len(work.long),
                    n_threads=THREADS, n_threads_batch=THREADS, verbose=False)

        def generate(llm: Any = llm) -> None:
            llm.reset()  # no reuse of the previous run's prompt cache
            for count, _ in enumerate(llm.generate(work.prompt, temp=0.0, top_k=1), start=1):
                if count == n:  # llama.cpp's generator ignores end-of-sequence; we stop it here
                    break

        def prefill(llm: Any = llm) -> None:
            llm.reset()
            llm.eval(work.long)

        found[f"llamacpp_{name}"] = (n, generate)
        found[f"prefill_llamacpp_{name}"] = (len(work.long), prefill)
    return found


def measure(measurements: Measurements, repeats: int) -> dict[str, float]:
    """Warm each call up once, then time every call once per repeat, interleaved; median rates."""
    from tqdm import tqdm

    for _, run in tqdm(measurements.values(), desc="warm-up", file=sys.stderr):
        run()
    rates: dict[str, list[float]] = {key: [] for key in measurements}
    for _ in tqdm(range(repeats), desc="repeats", file=sys.stderr):
        for key, (count, run) in measurements.items():
            start = time.perf_counter()
            run()
            rates[key].append(count / (time.perf_counter() - start))
    return {key: statistics.median(values) for key, values in rates.items()}


def cold_start(repeat: int = 2) -> dict[str, float]:
    """Run `slm generate --precision int8` `repeat` times; the last run's start-to-first-byte time counts.

    Earlier runs fill the caches a user's second run would find (converted model, quantized weights,
    the page cache). Peak RSS and CPU seconds are that child's own, from wait4; with one new token
    the CPU time is what reaching the first token costs, a figure other processes barely disturb.
    """
    command = [sys.executable, "-m", "smallmighty.cli", "generate", "--precision", "int8", "--max-new-tokens", "1"]
    env = os.environ | {"PYTHONPATH": str(REPO)}
    for attempt in range(1, repeat + 1):
        start = time.perf_counter()
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, bufsize=0)
        first = child.stdout.read(1)
        first_byte = time.perf_counter() - start
        child.stdout.read()
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait again
        if child.returncode != 0 or not first:
            raise RuntimeError(f"`{' '.join(command)}` failed with status {child.returncode}")
        cpu = usage.ru_utime + usage.ru_stime
        log(f"slm generate, run {attempt}: first token after {first_byte:.2f} s ({cpu:.2f} CPU s), "
            f"peak RSS {usage.ru_maxrss / 1024:.0f} MB")
    return {"cold_start_s": first_byte, "cold_start_cpu_s": cpu, "peak_rss_mb": usage.ru_maxrss / 1024}


# --- report -----------------------------------------------------------------------------------

ROWS = [  # label, decode key, prefill key
    ("transformers fp32", "hf_fp32", "prefill_hf_fp32"),
    ("ours fp32", "ours_fp32", "prefill_ours_fp32"),
    ("ours int8", "ours_int8", "prefill_ours_int8"),
    ("ours int4", "ours_int4", None),
    ("ours int8, batch 8 (aggregate)", "ours_batch8_aggregate", None),
    ("ours fp32, torch operators", "ours_fp32_torch_ops", None),
    ("ours int8, torch operators", "ours_int8_torch_ops", None),
    ("ours int4, torch operators", "ours_int4_torch_ops", None),
    ("ours int8 batch 8, torch operators", "ours_batch8_aggregate_torch_ops", None),
    ("llama.cpp f32", "llamacpp_f32", "prefill_llamacpp_f32"),
    ("llama.cpp q8_0", "llamacpp_q8_0", "prefill_llamacpp_q8_0"),
    ("llama.cpp Q4_1", "llamacpp_q4_1", "prefill_llamacpp_q4_1"),
]
RATIOS = {
    "ratio_ours_fp32_vs_llamacpp_f32": ("ours_fp32", "llamacpp_f32"),
    "ratio_ours_int8_vs_llamacpp_q8_0": ("ours_int8", "llamacpp_q8_0"),
    "ratio_ours_int8_vs_hf_fp32": ("ours_int8", "hf_fp32"),
    "ratio_batch8_vs_batch1": ("ours_batch8_aggregate", "ours_batch1"),
    "ratio_int8_native_vs_torch_ops": ("ours_int8", "ours_int8_torch_ops"),
    "ratio_fp32_native_vs_torch_ops": ("ours_fp32", "ours_fp32_torch_ops"),
    "ratio_batch8_native_vs_torch_ops": ("ours_batch8_aggregate", "ours_batch8_aggregate_torch_ops"),
}


def report(results: dict[str, float], args: argparse.Namespace) -> None:
    if "ours_int8" in results:
        results["ours_batch1"] = results["ours_int8"]  # the batch-8 run is at int8 too
    for key, (num, den) in RATIOS.items():
        if num in results and den in results:
            results[key] = results[num] / results[den]

    def cell(key: str | None) -> str:
        return f"{results[key]:.1f}" if key in results else "-"

    print(f"\nSmolLM2-135M-Instruct, {THREADS} threads, {args.new_tokens} new tokens, greedy, "
          f"median of {args.repeats}")
    print(f"{'backend':32} {'decode tok/s':>13} {f'prefill {args.prefill_tokens} tok/s':>18}")
    for label, decode, prefill in ROWS:
        print(f"{label:32} {cell(decode):>13} {cell(prefill):>18}")
    for key in RATIOS:
        if key in results:
            print(f"{key:45} {results[key]:6.2f}x")
    if "cold_start_s" in results:
        print(f"cold start, `slm generate --precision int8` (2nd run): first token after "
              f"{results['cold_start_s']:.2f} s ({results['cold_start_cpu_s']:.2f} CPU s), "
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
        results |= cold_start()
    log("loading every backend")
    model, tokenizer = load_hf_causal_lm(model_dir)
    work = Workload(tokenizer, args.new_tokens, args.prefill_tokens)
    log(f"{len(work.prompt)}-token chat prompt, {args.new_tokens} new tokens, {len(work.long)}-token prefill")
    measurements = hf_measurements(model, tokenizer.eos_token_id, work) | ours_measurements(model_dir, work)
    if not args.skip_llamacpp:
        cache = cache_dir("bench")
        measurements |= llama_cpp_measurements(llama_cpp_ggufs(model_dir, ensure_llama_cpp(cache), cache), work)
    results |= measure(measurements, args.repeats)
    report(results, args)


if __name__ == "__main__":
    main()
