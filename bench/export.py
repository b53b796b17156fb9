"""Deploy anywhere: our exports run in llama.cpp, ONNX Runtime and LiteRT as they run in smallmighty.

One run on this machine, ending with ONE JSON line:

    PYTHONPATH=. python bench/export.py            # full run
    PYTHONPATH=. python bench/export.py --quick    # smoke run: fewer perplexity tokens, texts and repeats

- gguf_f32_greedy_match: `slm export --format gguf --type f32` of SmolLM2-135M-Instruct, loaded in
  llama.cpp (llama-cpp-python), makes the same 64 greedy tokens after a chat prompt as our engine at fp32.
- gguf_q8_0_ppl_delta: wikitext-2 validation perplexity of our q8_0 export in llama.cpp, relative to our
  f32 export in llama.cpp (the same token ids, windows of 512 with no overlap, the first N tokens).
  Our engine's fp32 perplexity on the same windows is printed beside them as a check of the f32 file.
- onnx_int8_agreement, litert_agreement (and onnx_fp32_agreement): share of banking77 test texts on
  which the exported student (run through the shipped classify.py) predicts the torch student's label.
  The student is one made by `slm distill` (--student DIR; a quick one is made if missing).
- ort_only_cold_start_s, ort_only_peak_rss_mb: classify.py (int8) in a Python with only onnxruntime,
  tokenizers and numpy, classifying one text: process start to first answer, second of two runs.
- ours_int4_tok_s, ours_int8_tok_s: our engine on SmolLM2-135M, batch 1, 128 greedy tokens (end of
  sequence ignored), median of 3, interleaved; with their CPU seconds per 1,000 tokens.

Extras are installed on first use: llama-cpp-python into this environment (builds from source, about
11 minutes; set PIP_FIND_LINKS to a folder holding a wheel to skip that), and litert-torch into an
environment of its own in the cache (`slm export --format litert` does the same).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from smallmighty.cache import cache_dir  # noqa: E402
from smallmighty.compress.classifier_export import export_classifier_onnx  # noqa: E402
from smallmighty.compress.gguf_export import export_gguf  # noqa: E402
from smallmighty.compress.litert_export import export_classifier_litert, litert_python  # noqa: E402
from smallmighty.errors import SlmError  # noqa: E402
from smallmighty.evaluate.cost import decoder_cost, request_cost, standalone_start  # noqa: E402
from smallmighty.models.causal_lm import resolve_causal_lm  # noqa: E402

LLAMA_CPP_VERSION = "0.3.36"
THREADS = 2
BANKING77 = REPO.parent / "shared" / "datasets" / "banking77"
WIKITEXT = REPO.parent / "shared" / "datasets" / "wikitext2" / "wiki.valid.tokens"
QUESTION = "What are the three primary colours, and why are they called primary?"
#: How the bench makes its student when none is given: a quick `slm distill` on banking77.
DISTILL_ARGS = ["--teacher-epochs", "2", "--epochs", "5", "--layers", "2", "--hidden", "256", "--max-length", "64",
                "--no-baseline"]


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def ensure_llama_cpp() -> None:
    if importlib.util.find_spec("llama_cpp") is None:
        log(f"installing llama-cpp-python {LLAMA_CPP_VERSION} (a source build: about 11 minutes on 2 cores)")
        subprocess.run([sys.executable, "-m", "pip", "install", f"llama-cpp-python=={LLAMA_CPP_VERSION}"], check=True)
        importlib.invalidate_caches()


# ---- GGUF in llama.cpp --------------------------------------------------------------------------


def llama(path: Path, n_ctx: int, **kwargs):
    from llama_cpp import Llama

    return Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=THREADS, n_threads_batch=THREADS,
                 verbose=False, **kwargs)


def greedy_match(gguf_f32: Path, model_dir: Path, n: int = 64) -> dict:
    from smallmighty.engine.generate import Engine
    from smallmighty.engine.sampling import GenerationSettings

    engine = Engine.from_pretrained(model_dir, precision="fp32")
    engine.eos_token_ids = set()  # llama.cpp's generator does not stop at end of sequence either
    prompt_text = engine.apply_chat_template([{"role": "user", "content": QUESTION}])
    prompt = engine.encode(prompt_text)
    ours = engine.generate([prompt], GenerationSettings(max_new_tokens=n, temperature=0.0))[0]
    llm = llama(gguf_f32, 512)
    tokenized = llm.tokenize(prompt_text.encode(), add_bos=True, special=True)
    theirs = []
    for token in llm.generate(prompt, temp=0.0, top_k=1):
        theirs.append(token)
        if len(theirs) == n:
            break
    same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), n)
    log(f"greedy {n} tokens: llama.cpp f32 equals ours for the first {same}; prompt tokenized alike: {tokenized == prompt}")
    return {"gguf_f32_greedy_match": ours == theirs, "gguf_f32_greedy_same_prefix": same,
            "gguf_prompt_tokens_match": tokenized == prompt}


def log_softmax_nll(scores: np.ndarray, targets: np.ndarray) -> float:
    """Sum over positions of -log softmax(scores)[target]."""
    top = scores.max(axis=1, keepdims=True)
    logz = np.log(np.exp(scores - top).sum(axis=1)) + top[:, 0]
    return float((logz - scores[np.arange(len(targets)), targets]).sum())


def llama_cpp_perplexity(path: Path, ids: list[int], context: int) -> float:
    llm = llama(path, context, logits_all=True)
    nll, scored = 0.0, 0
    for start in range(0, len(ids) - 1, context):
        window = ids[start:start + context]
        if len(window) < 2:
            break
        llm.reset()
        llm.eval(window)
        scores = np.asarray(llm.scores[: len(window)], dtype=np.float64)
        nll += log_softmax_nll(scores[:-1], np.asarray(window[1:]))
        scored += len(window) - 1
    return math.exp(nll / scored)


def gguf_figures(work: Path, tokens: int, context: int = 512) -> dict:
    from smallmighty.engine.generate import Engine
    from smallmighty.evaluate.perplexity import perplexity

    model_dir = resolve_causal_lm(None)
    files = {}
    for gguf_type in ("f32", "q8_0"):
        start = time.perf_counter()
        files[gguf_type] = export_gguf(None, work / f"smollm2.{gguf_type}.gguf", gguf_type=gguf_type)
        log(f"slm export --format gguf --type {gguf_type}: {time.perf_counter() - start:.1f} s, "
            f"{files[gguf_type].stat().st_size / 2**20:.0f} MB")
    figures = greedy_match(files["f32"], model_dir)
    engine = Engine.from_pretrained(model_dir, precision="fp32")
    ids = engine.encode(WIKITEXT.read_text(encoding="utf-8"))[:tokens]
    ppl = {name: llama_cpp_perplexity(path, ids, context) for name, path in files.items()}
    ours = perplexity(engine, ids, context=context, progress=False)
    log(f"wikitext-2 valid, {len(ids)} tokens, windows of {context}: llama.cpp f32 {ppl['f32']:.4f}, "
        f"q8_0 {ppl['q8_0']:.4f}; our engine fp32 {ours:.4f}")
    return figures | {"gguf_q8_0_ppl_delta": ppl["q8_0"] / ppl["f32"] - 1, "llamacpp_f32_ppl": ppl["f32"],
                      "llamacpp_q8_0_ppl": ppl["q8_0"], "ours_fp32_ppl": ours, "ppl_tokens": len(ids)}


# ---- our decode speed ---------------------------------------------------------------------------


def decode_figures(repeats: int, new_tokens: int = 128) -> dict:
    from smallmighty.engine.generate import Engine
    from smallmighty.engine.sampling import GenerationSettings

    model_dir = resolve_causal_lm(None)
    settings = GenerationSettings(max_new_tokens=new_tokens, temperature=0.0)
    engines = {p: Engine.from_pretrained(model_dir, precision=p) for p in ("int8", "int4")}
    prompt = engines["int8"].encode(engines["int8"].apply_chat_template([{"role": "user", "content": QUESTION}]))
    rates: dict[str, list[float]] = {p: [] for p in engines}
    for engine in engines.values():
        engine.eos_token_ids = set()
        engine.generate([prompt], settings)  # warm-up
    for _ in range(repeats):  # interleaved, so a busy moment hits both precisions
        for precision, engine in engines.items():
            start = time.perf_counter()
            made = len(engine.generate([prompt], settings)[0])
            rates[precision].append(made / (time.perf_counter() - start))
    figures = {f"ours_{p}_tok_s": statistics.median(r) for p, r in rates.items()}
    for precision, engine in engines.items():
        cost = decoder_cost(engine, prompt, new_tokens)
        figures[f"ours_{precision}_cpu_s_per_1k_tokens"] = cost["cpu_s_per_1k_tokens"]
    figures["ratio_int4_vs_int8"] = figures["ours_int4_tok_s"] / figures["ours_int8_tok_s"]
    return figures


# ---- classifier exports -------------------------------------------------------------------------


def ensure_student(student: Path | None) -> Path:
    if student is not None:
        return student
    run = cache_dir("bench") / "export-banking77"
    if not (run / "student" / "model.safetensors").is_file():
        command = [sys.executable, "-m", "smallmighty.cli", "distill", "--data", str(BANKING77), "--out", str(run),
                   *DISTILL_ARGS]
        log(f"no student given: making one with `slm distill {' '.join(command[4:])}` (about 15 minutes)")
        subprocess.run(command, check=True)
    return run / "student"


def litert_predictions(folder: Path, texts: list[str]) -> list[str]:
    """Labels from the exported classify.py inside the LiteRT environment (it has ai-edge-litert)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(texts, handle)
    script = ("import json, sys; sys.path.insert(0, sys.argv[1]); from classify import Classifier; "
              "clf = Classifier(sys.argv[1]); texts = json.load(open(sys.argv[2])); "
              "print(json.dumps([clf.predict([t])[0] for t in texts]))")
    done = subprocess.run([str(litert_python()), "-c", script, str(folder), handle.name], capture_output=True,
                          text=True, check=True)
    Path(handle.name).unlink()
    return json.loads(done.stdout.strip().splitlines()[-1])


def load_example(folder: Path):
    spec = importlib.util.spec_from_file_location("exported_classify", folder / "classify.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Classifier


def classifier_figures(student: Path, work: Path, max_texts: int | None) -> dict:
    from smallmighty.data.classification import load_labelled_splits
    from smallmighty.engine.classifier import load_classifier

    _, test = load_labelled_splits(str(BANKING77))
    texts = test.texts[:max_texts]
    reference = load_classifier(str(student), "torch")
    expected = [label for i in range(0, len(texts), 64) for label in reference.predict(texts[i:i + 64])]
    accuracy = float(np.mean([test.label_names[y] == p for y, p in zip(test.labels, expected)]))
    onnx = export_classifier_onnx(student, work / "student-onnx", int8=True)
    Classifier = load_example(onnx)

    def agreement(predicted: list[str]) -> float:
        return float(np.mean([a == b for a, b in zip(predicted, expected)]))

    figures = {"student_accuracy_torch": accuracy, "agreement_texts": len(texts)}
    for name, model_file in (("fp32", "model.onnx"), ("int8", "model.int8.onnx")):
        clf = Classifier(onnx, model_file)
        figures[f"onnx_{name}_agreement"] = agreement([p for i in range(0, len(texts), 64)
                                                       for p in clf.predict(texts[i:i + 64])])
        figures[f"onnx_{name}_cpu_s_per_1k_requests"] = request_cost(lambda t: clf.predict([t]), texts[:300])["cpu_s_per_1k"]
    try:  # a failed conversion is a figure too: the bench reports it and goes on
        litert = export_classifier_litert(student, work / "student-litert")
        figures["litert_agreement"] = agreement(litert_predictions(litert, texts))
    except SlmError as err:
        log(f"LiteRT export failed: {err}")
        figures["litert_agreement"], figures["litert_error"] = None, str(err)
    for name, model_file in (("", "model.int8.onnx"), ("fp32_", "model.onnx")):
        start = standalone_start(onnx, texts[0], model_file=model_file)
        figures[f"ort_only_{name}cold_start_s"] = start["cold_start_s"]
        figures[f"ort_only_{name}peak_rss_mb"] = start["peak_rss_mb"]
    log(f"student torch accuracy {accuracy:.4f} on {len(texts)} texts; agreements: onnx fp32 "
        f"{figures['onnx_fp32_agreement']:.4f}, onnx int8 {figures['onnx_int8_agreement']:.4f}, "
        f"litert {figures['litert_agreement']}; torch-free int8 start {figures['ort_only_cold_start_s']:.2f} s, "
        f"{figures['ort_only_peak_rss_mb']:.0f} MB")
    return figures


TARGETS = {"gguf_f32_greedy_match": lambda v: v is True, "gguf_q8_0_ppl_delta": lambda v: abs(v) < 0.01,
           "onnx_int8_agreement": lambda v: v >= 0.995, "litert_agreement": lambda v: v >= 0.995,
           "ort_only_cold_start_s": lambda v: v < 1.0, "ort_only_peak_rss_mb": lambda v: v < 150}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8k perplexity tokens, 500 test texts, 1 repeat")
    parser.add_argument("--student", type=Path, default=None, help="a banking77 student from `slm distill`")
    parser.add_argument("--ppl-tokens", type=int, default=32768, help="wikitext-2 validation tokens scored")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-decode", action="store_true", help="leave out our decode speed (the only long timing)")
    args = parser.parse_args()
    max_texts = 500 if args.quick else None
    if args.quick:
        args.ppl_tokens, args.repeats = 8192, 1

    import torch

    torch.set_num_threads(THREADS)
    ensure_llama_cpp()
    student = ensure_student(args.student)
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="slm-bench-export-") as tmp:
        work = Path(tmp)
        if not args.skip_decode:
            results |= decode_figures(args.repeats)
        results |= classifier_figures(student, work, max_texts)
        results |= gguf_figures(work, args.ppl_tokens)
    from smallmighty.evaluate.speed import hardware_info

    results["cpu"] = hardware_info()["cpu"]
    print("\nfigure                                   value        target")
    for key, value in results.items():
        check = TARGETS.get(key)
        mark = "" if check is None else ("met" if value is not None and check(value) else "MISSED")
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        print(f"{key:40} {shown:>12} {mark}")
    print(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in results.items()}))


if __name__ == "__main__":
    main()
