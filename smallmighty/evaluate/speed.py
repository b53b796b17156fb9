"""Speed and memory of a classifier, measured the way a user would feel them.

Batch-1 latency (one query at a time, as a chat or search box sends them) and batched throughput (as an
offline job would run) tell different stories on a CPU, so both are measured. `profile_classifier`
runs the measurement in a fresh Python process: the parent has usually loaded a teacher, a student and
a dataset already, which would inflate the peak RSS and warm or pollute caches for the timings.

Run as a module (`python -m smallmighty.evaluate.speed --model DIR --runtime R --texts FILE`), this file
is that child: it loads one classifier, times it and prints one JSON object.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from smallmighty.errors import SlmError
from smallmighty.evaluate.cost import request_cost
from smallmighty.io import write_text

DEFAULT_LOADER = "smallmighty.engine.classifier:load_classifier"
#: Exit status of the child when the failure is the user's (bad model directory, bad runtime, ...).
USER_ERROR_STATUS = 2


def latency_ms(fn: Callable[[Any], Any], inputs: Sequence, *, warmup: int = 10,
               max_items: int | None = None) -> dict:
    """Time `fn(x)` for each input, one call at a time; return {"p50", "p95", "mean"} in milliseconds.

    The first `warmup` calls (cycling through the inputs) are not timed, so lazy initialisation and
    cold caches do not land in the percentiles. `max_items` caps the timed calls to bound run time.
    """
    items = list(inputs[:max_items] if max_items is not None else inputs)
    if not items:
        raise SlmError("no inputs to time")
    for i in range(warmup):
        fn(items[i % len(items)])
    times = np.empty(len(items))
    for i, item in enumerate(items):
        start = time.perf_counter()
        fn(item)
        times[i] = (time.perf_counter() - start) * 1000.0
    return {"p50": float(np.percentile(times, 50)), "p95": float(np.percentile(times, 95)),
            "mean": float(times.mean())}


def throughput_per_s(fn_batch: Callable[[list], Any], inputs: Sequence, *, batch_size: int = 32) -> float:
    """Items per second through `fn_batch`, over all inputs in consecutive batches of `batch_size`.

    One untimed batch runs first, for the same reason `latency_ms` warms up.
    """
    items = list(inputs)
    if not items:
        raise SlmError("no inputs to time")
    if batch_size < 1:
        raise SlmError(f"batch size must be at least 1, got {batch_size}")
    fn_batch(items[:batch_size])
    start = time.perf_counter()
    for i in range(0, len(items), batch_size):
        fn_batch(items[i:i + batch_size])
    return len(items) / (time.perf_counter() - start)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB.

    On Linux this reads VmHWM, which starts afresh at exec: ru_maxrss does not, so a child started
    by a large parent would report the parent's size at fork. Elsewhere ru_maxrss (KiB on Linux,
    bytes on macOS).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def hardware_info() -> dict:
    """What the timings ran on, for the report card: CPU, core count, torch threads, platform."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__}


def profile_classifier(model_dir: str, runtime: str, texts: list[str], *, batch_size: int = 32,
                       max_latency_items: int = 300, threads: int | None = None,
                       loader: str | None = None) -> dict:
    """Load and time one classifier in a fresh subprocess; return its measurements.

    Returns {"latency_ms_p50", "latency_ms_p95", "throughput_per_s", "peak_rss_mb", "load_s",
    "cpu_s_per_1k", "rapl_j_per_1k"} (the last two from `cost.request_cost`, batch-1 requests).
    The child uses `threads` torch threads (default: this process's torch default), so the numbers
    match what an in-process run would see. `loader` ("module:function", default `DEFAULT_LOADER`)
    names the factory that turns (model_dir, runtime) into an object with
    `predict_logits(texts) -> array`. A child that fails or dies is one SlmError line.
    """
    if not Path(model_dir).exists():
        raise SlmError(f"model directory not found: {model_dir}")
    if not texts:
        raise SlmError("no texts to profile the classifier on")
    if threads is None:
        import torch

        threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="slm-profile-") as tmp:
        texts_file = Path(tmp) / "texts.json"
        write_text(texts_file, json.dumps(list(texts)))
        return run_child("smallmighty.evaluate.speed",
                         ["--model", str(model_dir), "--runtime", runtime, "--texts", str(texts_file),
                          "--batch-size", str(batch_size), "--max-latency-items", str(max_latency_items),
                          "--threads", str(threads), "--loader", loader or DEFAULT_LOADER],
                         what=f"profiling {model_dir} ({runtime})")


def run_child(module: str, args: list[str], *, what: str) -> dict:
    """Run `python -m module *args --out FILE` in a fresh process and return the JSON it writes.

    The child exits with `USER_ERROR_STATUS` and an "error: ..." line for a user's mistake, which
    becomes an `SlmError` here; any other failure is a crash, reported with the child's stderr.
    """
    # The child must import this very package, even when it is not installed (a checkout on PYTHONPATH).
    package_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    with tempfile.TemporaryDirectory(prefix="slm-child-") as tmp:
        out_file = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", module, *args, "--out", str(out_file)]
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if proc.returncode == USER_ERROR_STATUS:
            lines = proc.stderr.strip().splitlines()
            raise SlmError(lines[-1].removeprefix("error: ") if lines else f"{what} failed")
        if proc.returncode != 0:
            raise SlmError(f"{what} failed: the child process {_how_it_ended(proc.returncode, proc.stderr)}")
        return json.loads(out_file.read_text(encoding="utf-8"))


def _how_it_ended(status: int, stderr: str) -> str:
    """A child's death in words: the signal that killed it, or its status and last stderr line."""
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = f"signal {-status}"
        hint = " (out of memory?)" if -status == signal.SIGKILL else ""
        return f"was killed by {name}{hint}"
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return f"exited with status {status}" + (f": {lines[-1].strip()}" if lines else "")


def _load_factory(spec: str) -> Callable[..., Any]:
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise SlmError(f"loader must be 'module:function', got {spec!r}")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise SlmError(f"cannot import the classifier loader {spec!r}: {exc}") from exc


def _measure(args: argparse.Namespace) -> dict:
    texts = json.loads(Path(args.texts).read_text(encoding="utf-8"))
    factory = _load_factory(args.loader)
    start = time.perf_counter()
    clf = factory(args.model, args.runtime)
    load_s = time.perf_counter() - start
    # Pin torch only if the classifier pulled it in: importing it just to set threads would add its
    # hundreds of MiB to the peak RSS of a runtime (ONNX) that never uses it.
    if args.threads and "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(args.threads)
    latency = latency_ms(lambda text: clf.predict_logits([text]), texts, max_items=args.max_latency_items)
    throughput = throughput_per_s(clf.predict_logits, texts, batch_size=args.batch_size)
    cost = request_cost(lambda text: clf.predict_logits([text]), texts[:args.max_latency_items])
    return {"latency_ms_p50": latency["p50"], "latency_ms_p95": latency["p95"], "throughput_per_s": throughput,
            "peak_rss_mb": peak_rss_mb(), "load_s": load_s, **cost}


def main(argv: list[str] | None = None) -> int:
    """Child entry point: measure one classifier and write (or print) the result as JSON."""
    parser = argparse.ArgumentParser(prog="python -m smallmighty.evaluate.speed",
                                     description="Time one classifier in this fresh process.")
    parser.add_argument("--model", required=True, help="classifier directory")
    parser.add_argument("--runtime", default="torch", help="runtime the loader should use (torch, onnx)")
    parser.add_argument("--texts", required=True, help="JSON file holding a list of input texts")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-latency-items", type=int, default=300)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--loader", default=DEFAULT_LOADER, help="classifier factory as module:function")
    parser.add_argument("--out", default=None, help="write the JSON here instead of stdout")
    args = parser.parse_args(argv)
    try:
        result = _measure(args)
    except SlmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USER_ERROR_STATUS
    text = json.dumps(result)
    if args.out:
        write_text(args.out, text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
