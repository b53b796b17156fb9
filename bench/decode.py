"""Decode and prefill speed of SmolLM2-135M-Instruct: our engine against transformers and llama.cpp.

One run on this machine measures every backend under the same conditions (2 threads, the same
prompt token ids, the same number of new tokens, greedy), prints a table, and ends with ONE JSON
line of the figures:

    PYTHONPATH=. python bench/decode.py            # full run (median of 3)
    PYTHONPATH=. python bench/decode.py --quick    # smoke run: 32 tokens, one repeat
    PYTHONPATH=. python bench/decode.py --skip-llamacpp

All backends are loaded first, then timed in turn within each repeat, so a burst of load from
other processes hits every backend rather than the one that happened to run then; each figure is
the median over repeats, after one untimed warm-up. Every figure of our engine has an engine of its
own, loaded fresh, so each is measured in the state a user gets: a batch changes the kernels the
quantized layers use for prompts, which must not flatter a single-stream figure.

Our engine runs twice per precision: decoding in its native C step (the default) and in torch
operators (`Engine.from_pretrained(..., native=False)`, what it does without a C compiler).

Decode tokens/s = new tokens / wall time of the whole generate call (the 44-token prompt included),
with the end-of-sequence token ignored so every backend produces exactly the same number of tokens.
Prefill tokens/s = 512 prompt tokens / time of one forward pass over them that computes the last
position's logits only (transformers: `logits_to_keep=1`; ours: generate with one new token).

llama.cpp comes from llama-cpp-python 0.3.36, a benchmark extra, never a dependency: when missing
it is installed into the running environment, built from source where pip finds no wheel
(about 11 minutes on 2 cores), with sentencepiece, which llama.cpp's converter needs. Its f32 and
q8_0 GGUFs are made from our converted folder with the converter its sdist ships, Q4_0 from the f32
one with llama.cpp's own quantizer, and Q4_1 is the original PyPI file. For each file, flash
attention (on, off) and the KV cache type (f16, f32) are chosen by a short selection run, per
figure, and the faster setting is then measured.
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
from smallmighty.evaluate.cost import first_output  # noqa: E402
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
            model(long, logits_to_keep=1)  # the last position's logits, as the others compute

    return {"hf_fp32": (n, generate), "prefill_hf_fp32": (len(work.long), forward)}


def ours_measurements(model_dir: Path, work: Workload) -> Measurements:
    from smallmighty.engine.generate import Engine
    from smallmighty.engine.sampling import GenerationSettings

    n = work.new_tokens
    settings = GenerationSettings(max_new_tokens=n, temperature=0.0)
    one = GenerationSettings(max_new_tokens=1, temperature=0.0)

    def fresh(precision: str, native: bool) -> Any:
        engine = Engine.from_pretrained(model_dir, precision=precision, native=native)
        engine.eos_token_ids = set()  # produce exactly n tokens, like the other backends
        return engine

    def decode(engine: Any, prompts: list[list[int]]) -> Callable[[], None]:
        def run() -> None:
            out = engine.generate(prompts, settings)
            assert all(len(o) == n for o in out), [len(o) for o in out]
        return run

    found: Measurements = {}
    # Each precision twice: decoding in the native C step (what the engine does) and in torch
    # operators (what it does without a C compiler), to show what the native step is worth.
    for precision in ("fp32", "int8", "int4"):
        for native in (True, False):
            suffix = "" if native else "_torch_ops"
            found[f"ours_{precision}{suffix}"] = (n, decode(fresh(precision, native), [work.prompt]))
            if native:
                found[f"prefill_ours_{precision}"] = (
                    len(work.long), lambda e=fresh(precision, native): e.generate([work.long], one))
            if precision == "int8":
                found[f"ours_batch8_aggregate{suffix}"] = (n * len(work.batch),
                                                           decode(fresh(precision, native), work.batch))
    return found


def ensure_llama_cpp(cache: Path) -> Path:
    """Install what the llama.cpp rows need where missing (llama-cpp-python, and sentencepiece,
    which llama.cpp's converter imports) and return llama-cpp-python's unpacked sdist (for the
    converter)."""
    needs = {"llama_cpp": f"llama-cpp-python=={LLAMA_CPP_VERSION}", "sentencepiece": "sentencepiece"}
    missing = [requirement for module, requirement in needs.items() if importlib.util.find_spec(module) is None]
    if missing:
        log(f"installing {', '.join(missing)} for the llama.cpp rows (llama-cpp-python builds from source "
            "where pip finds no wheel: about 11 minutes on 2 cores; --skip-llamacpp skips these rows)")
        subprocess.run([sys.executable, "-m", "pip", "install", *missing], check=True)
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
    """f32, q8_0 and Q4_0 GGUFs made from our folder (once), plus the original Q4_1."""
    import llama_cpp

    files = {outtype: converted_gguf(model_dir, source, cache, outtype) for outtype in ("f32", "q8_0")}
    target = cache / f"{model_dir.name}.q4_0.gguf"
    if not target.is_file():  # the converter writes no 4-bit types: llama.cpp's quantizer does
        log(f"quantizing {model_dir.name} to Q4_0 with llama.cpp")
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
        params.nthread = THREADS
        with atomic_path(target) as tmp:
            if llama_cpp.llama_model_quantize(str(files["f32"]).encode(), str(tmp).encode(), params) != 0:
                raise RuntimeError("llama.cpp's quantizer failed to write Q4_0")
    files["q4_0"] = target
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


#: llama.cpp instances the bench loaded, kept alive to the end (see `llama_cpp_measurements`).
_LOADED: list[Any] = []
#: llama.cpp settings tried per file and figure: flash attention, and the KV cache type (ggml type id).
LLAMA_CPP_SETTINGS = [(flash, kv) for flash in (False, True) for kv in ("f16", "f32")]


def llama_cpp_measurements(files: dict[str, Path], work: Workload) -> tuple[Measurements, dict[str, str]]:
    """Each file's decode and prefill calls at the setting that was faster for that figure in a
    short selection run (a shorter generation, one timing each), and the settings chosen."""
    from llama_cpp import GGML_TYPE_F16, GGML_TYPE_F32, Llama

    n = work.new_tokens
    kv_types = {"f16": GGML_TYPE_F16, "f32": GGML_TYPE_F32}

    def load(path: Path, flash: bool, kv: str) -> Any:
        return Llama(str(path), n_ctx=len(work.long) + n + 64, n_batch=len(work.long), n_threads=THREADS,
                     n_threads_batch=THREADS, flash_attn=flash, type_k=kv_types[kv], type_v=kv_types[kv],
                     verbose=False)

    def calls(llm: Any, tokens: int) -> tuple[Callable[[], None], Callable[[], None]]:
        def generate() -> None:
            llm.reset()  # no reuse of the previous run's prompt cache
            for count, _ in enumerate(llm.generate(work.prompt, temp=0.0, top_k=1), start=1):
                if count == tokens:  # llama.cpp's generator ignores end-of-sequence; we stop it here
                    break

        def prefill() -> None:
            llm.reset()
            llm.eval(work.long)

        return generate, prefill

    def seconds(call: Callable[[], None]) -> float:
        call()  # warm-up
        start = time.perf_counter()
        call()
        return time.perf_counter() - start

    found: Measurements = {}
    chosen: dict[str, str] = {}
    for name, path in files.items():
        trials, llms = {}, {}
        for flash, kv in LLAMA_CPP_SETTINGS:
            # Every instance stays loaded until the process ends (the file is mapped once, so they
            # share its memory): closing one and collecting it later can crash llama-cpp-python.
            llms[flash, kv] = llm = load(path, flash, kv)
            generate, prefill = calls(llm, max(8, n // 4))
            trials[flash, kv] = (seconds(generate), seconds(prefill))
        for figure, index, key in (("decode", 0, f"llamacpp_{name}"), ("prefill", 1, f"prefill_llamacpp_{name}")):
            flash, kv = min(trials, key=lambda setting: trials[setting][index])
            chosen[key] = f"flash_attn={'on' if flash else 'off'}, kv={kv}"
            generate, prefill = calls(llms[flash, kv], n)
            found[key] = (n, generate) if figure == "decode" else (len(work.long), prefill)
        _LOADED.extend(llms.values())
        log(f"llama.cpp {name}: decode at {chosen[f'llamacpp_{name}']}, "
            f"prefill at {chosen[f'prefill_llamacpp_{name}']}")
    return found, chosen


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


def cold_start(runs: int = 3) -> dict[str, float]:
    """Start `slm generate --precision int8` `runs` times after one untimed run; medians of the
    time from process start to the first byte of output, its CPU seconds and peak RSS.

    The untimed run fills the caches a user's second run would find (converted model, quantized
    weights, compiled kernel, the page cache). Each child is pinned to the first THREADS CPUs with
    OpenMP's threads bound to them, as the other figures run. CPU seconds are that child's own,
    from wait4; with one new token the CPU time is what reaching the first token
    costs, a figure other processes barely disturb. Peak RSS is the child's own high-water mark
    (`evaluate.cost.PeakRss`): wait4's would fold in this process's, already a torch process.
    """
    command = [sys.executable, "-m", "smallmighty.cli", "generate", "--precision", "int8", "--max-new-tokens", "1"]
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(THREADS), "OMP_PROC_BIND": "close"}
    cpus = sorted(os.sched_getaffinity(0))[:THREADS]
    figures: dict[str, list[float]] = {"cold_start_s": [], "cold_start_cpu_s": [], "peak_rss_mb": []}
    for attempt in range(runs + 1):
        run = first_output(command, env=env, cpus=cpus, runs=1)
        log(f"slm generate, {'untimed run' if attempt == 0 else f'run {attempt}'}: first token after "
            f"{run['first_output_s']:.2f} s ({run['cpu_s']:.2f} CPU s), peak RSS {run['peak_rss_mb']:.0f} MB")
        if attempt:
            for key, name in zip(figures, ("first_output_s", "cpu_s", "peak_rss_mb")):
                figures[key].append(run[name])
    return {key: statistics.median(values) for key, values in figures.items()}


# --- report -----------------------------------------------------------------------------------

ROWS = [  # label, decode key, prefill key
    ("transformers fp32", "hf_fp32", "prefill_hf_fp32"),
    ("ours fp32", "ours_fp32", "prefill_ours_fp32"),
    ("ours int8", "ours_int8", "prefill_ours_int8"),
    ("ours int4", "ours_int4", "prefill_ours_int4"),
    ("ours int8, batch 8 (aggregate)", "ours_batch8_aggregate", None),
    ("ours fp32, torch operators", "ours_fp32_torch_ops", None),
    ("ours int8, torch operators", "ours_int8_torch_ops", None),
    ("ours int4, torch operators", "ours_int4_torch_ops", None),
    ("ours int8 batch 8, torch operators", "ours_batch8_aggregate_torch_ops", None),
    ("llama.cpp f32", "llamacpp_f32", "prefill_llamacpp_f32"),
    ("llama.cpp q8_0", "llamacpp_q8_0", "prefill_llamacpp_q8_0"),
    ("llama.cpp Q4_0", "llamacpp_q4_0", "prefill_llamacpp_q4_0"),
    ("llama.cpp Q4_1", "llamacpp_q4_1", "prefill_llamacpp_q4_1"),
]
RATIOS = {
    "ratio_ours_fp32_vs_llamacpp_f32": ("ours_fp32", "llamacpp_f32"),
    "ratio_ours_int8_vs_llamacpp_q8_0": ("ours_int8", "llamacpp_q8_0"),
    "ratio_ours_int4_vs_llamacpp_q4_0": ("ours_int4", "llamacpp_q4_0"),
    "ratio_ours_int4_vs_llamacpp_q4_1": ("ours_int4", "llamacpp_q4_1"),
    "ratio_ours_int4_vs_ours_int8": ("ours_int4", "ours_int8"),
    "ratio_ours_int8_vs_hf_fp32": ("ours_int8", "hf_fp32"),
    "ratio_batch8_vs_batch1": ("ours_batch8_aggregate", "ours_batch1"),
    "ratio_int8_native_vs_torch_ops": ("ours_int8", "ours_int8_torch_ops"),
    "ratio_fp32_native_vs_torch_ops": ("ours_fp32", "ours_fp32_torch_ops"),
    "ratio_batch8_native_vs_torch_ops": ("ours_batch8_aggregate", "ours_batch8_aggregate_torch_ops"),
}


def report(results: dict[str, float], settings: dict[str, str], args: argparse.Namespace) -> None:
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
    for key, setting in settings.items():
        print(f"{key:45} {setting}")
    for key in RATIOS:
        if key in results:
            print(f"{key:45} {results[key]:6.2f}x")
    if "cold_start_s" in results:
        print(f"cold start, `slm generate --precision int8` (median of 3 after one untimed run): first "
              f"token after {results['cold_start_s']:.2f} s ({results['cold_start_cpu_s']:.2f} CPU s), "
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
    settings: dict[str, str] = {}
    if not args.skip_llamacpp:
        cache = cache_dir("bench")
        source = ensure_llama_cpp(cache)
        found, settings = llama_cpp_measurements(llama_cpp_ggufs(model_dir, source, cache), work)
        measurements |= found
    results |= measure(measurements, args.repeats)
    report(results, settings, args)
    for llm in _LOADED:  # closed here: at interpreter exit, llama-cpp-python's finalizers raise
        llm.close()


if __name__ == "__main__":
    main()
