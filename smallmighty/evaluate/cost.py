"""What a model costs to run: CPU time, energy and money per 1,000 requests (classifiers, one text at
a time, as a service receives them) or per 1,000 generated tokens (decoders), measured on this machine.

- **CPU seconds** are the process's own (user + system, all threads), read around the requests: wall
  time moves with whatever else runs on a shared machine, CPU time much less, and CPU time is what a
  bill or a battery pays for. Threads that spin while waiting count too, as they should.
- **Energy** comes from RAPL (`/sys/class/powercap/intel-rapl:N/energy_uj`, Intel and AMD) where the
  kernel exposes it readably: the CPU packages' energy while the requests ran, which includes anything
  else running then. Elsewhere (most VMs and containers) it is an estimate, CPU seconds x a stated
  figure of watts per busy core, and the card says "estimate" beside it.
- **Dollars per million requests** = CPU seconds per request x 10^6 / 3600 x a stated price per
  core-hour (`slm eval --price-per-core-hour`).

The card also carries the start of the torch-free runtime `slm export --format onnx` ships
(classify.py with only onnxruntime, tokenizers and numpy): seconds from process start to the first
answer and that process's peak memory, the second of two runs (the first warms the disk cache, as a
service's restart would find it).
"""

from __future__ import annotations

import html
import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

#: A current server core under load: about 360 W for a 96-core AMD EPYC 9654, 350 W for a 56-core
#: Xeon 8480+ (TDP / cores: 3.8-6.3 W). Used only when RAPL cannot be read, and labelled an estimate.
DEFAULT_WATTS_PER_CORE = 5.0
#: On-demand price of one cloud vCPU-hour on compute-optimised instances, late 2026 (about $0.04-0.05).
DEFAULT_PRICE_PER_CORE_HOUR = 0.05
RAPL_ROOT = Path("/sys/class/powercap")


def rapl_energy_uj(root: Path = RAPL_ROOT) -> int | None:
    """Total energy counter of the CPU packages in microjoules, or None where it cannot be read.

    Only the top-level package domains (`intel-rapl:0`, `intel-rapl:1`) are summed: their
    sub-domains (`intel-rapl:0:0`, cores or DRAM) are parts of them.
    """
    try:
        domains = [d for d in root.iterdir() if d.name.startswith("intel-rapl:") and d.name.count(":") == 1]
        if not domains:
            return None
        return sum(int((d / "energy_uj").read_text()) for d in domains)
    except (OSError, ValueError):
        return None


def _rapl_range_uj(root: Path = RAPL_ROOT) -> int | None:
    try:
        return sum(int((d / "max_energy_range_uj").read_text()) for d in root.iterdir()
                   if d.name.startswith("intel-rapl:") and d.name.count(":") == 1)
    except (OSError, ValueError):
        return None


class Meter:
    """CPU seconds of this process and package energy (RAPL, when readable) between start and stop."""

    def __init__(self, rapl_root: Path = RAPL_ROOT) -> None:
        self.rapl_root = rapl_root

    def __enter__(self) -> "Meter":
        self._energy = rapl_energy_uj(self.rapl_root)
        self._cpu = time.process_time()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.cpu_s = time.process_time() - self._cpu
        end = rapl_energy_uj(self.rapl_root)
        self.energy_j = None
        if self._energy is not None and end is not None:
            used = end - self._energy
            if used < 0:  # the counter wrapped around once
                used += _rapl_range_uj(self.rapl_root) or 0
            self.energy_j = used / 1e6 if used >= 0 else None


def request_cost(fn: Callable[[Any], Any], items: Sequence[Any]) -> dict:
    """Call `fn(item)` once per item (warm: call it a few times first) and return
    {"cpu_s_per_1k", "rapl_j_per_1k"} per 1,000 calls; the energy is None without RAPL."""
    if not items:
        raise ValueError("no requests to measure")
    with Meter() as meter:
        for item in items:
            fn(item)
    scale = 1000 / len(items)
    return {"cpu_s_per_1k": meter.cpu_s * scale,
            "rapl_j_per_1k": None if meter.energy_j is None else meter.energy_j * scale}


def decoder_cost(engine: Any, prompt: list[int], new_tokens: int = 128) -> dict:
    """{"cpu_s_per_1k_tokens", "rapl_j_per_1k_tokens"} of `engine` generating `new_tokens` greedy
    tokens after `prompt` at batch 1 (end-of-sequence ignored, so every run makes the same count)."""
    from smallmighty.engine.sampling import GenerationSettings

    settings = GenerationSettings(max_new_tokens=new_tokens, temperature=0.0)
    eos, engine.eos_token_ids = engine.eos_token_ids, set()
    try:
        engine.generate([prompt], settings)  # warm
        with Meter() as meter:
            made = len(engine.generate([prompt], settings)[0])
    finally:
        engine.eos_token_ids = eos
    scale = 1000 / made
    return {"cpu_s_per_1k_tokens": meter.cpu_s * scale,
            "rapl_j_per_1k_tokens": None if meter.energy_j is None else meter.energy_j * scale}


def first_output(command: list[str], *, cwd: str | os.PathLike | None = None, runs: int = 2,
                 env: dict[str, str] | None = None, cpus: list[int] | None = None) -> dict:
    """Start `command` `runs` times (the earlier runs fill the caches a user's second start finds); for
    the last, seconds to its first byte of output, its CPU seconds and its peak RSS (the child's own
    high-water mark, see `PeakRss`). `cpus`: pin the child to these CPUs (Linux)."""
    pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    for _ in range(runs):
        start = time.perf_counter()
        child = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 bufsize=0, preexec_fn=pin)
        peak = PeakRss(child.pid)
        first = child.stdout.read(1)
        seconds = time.perf_counter() - start
        child.stdout.read()
        error = child.stderr.read()
        peak.stop()
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)  # reaped here; Popen must not wait again
        if child.returncode != 0 or not first:
            raise RuntimeError(f"`{' '.join(command)}` failed with status {child.returncode}: "
                               f"{error.decode(errors='replace')[-2000:]}")
    peak_mb = peak.mb if peak.mb is not None else usage.ru_maxrss / 1024
    return {"first_output_s": seconds, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mb": peak_mb}


class PeakRss:
    """A child's peak RSS, read from its /proc status (VmHWM) every few milliseconds while it lives.

    Why not wait4's ru_maxrss: Linux folds the parent's high-water mark into a child's at exec
    (fork, vfork and posix_spawn alike), so a child of a large process (`slm eval` with torch
    loaded: 800 MB) would be reported at the parent's size. VmHWM belongs to the child's own
    memory map. The last read may precede the child's final milliseconds (its exit), after its
    answer was printed. `mb` is None where /proc is not there (wait4's figure is used).
    """

    def __init__(self, pid: int, interval_s: float = 0.002) -> None:
        self.mb: float | None = None
        self._status = Path(f"/proc/{pid}/status")
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, args=(interval_s,), daemon=True)
        self._thread.start()

    def _watch(self, interval_s: float) -> None:
        while True:
            try:
                for line in self._status.read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        self.mb = max(self.mb or 0.0, int(line.split()[1]) / 1024)
            except OSError:
                return
            if self._done.wait(interval_s):
                return

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


def standalone_start(export_dir: str | os.PathLike, text: str, *, model_file: str | None = None) -> dict:
    """Cold start of an exported folder's classify.py in a Python that has only onnxruntime,
    tokenizers and numpy (`compress.runtime_env`): {"cold_start_s", "peak_rss_mb", "cpu_s"}."""
    from smallmighty.compress.runtime_env import minimal_python

    command = [str(minimal_python()), "-I", str(Path(export_dir) / "classify.py"), text]
    if model_file:
        command += ["--model", model_file]
    with tempfile.TemporaryDirectory() as empty:  # -I and an empty cwd: nothing of ours on sys.path
        measured = first_output(command, cwd=empty)
    return {"cold_start_s": measured["first_output_s"], "peak_rss_mb": measured["peak_rss_mb"],
            "cpu_s": measured["cpu_s"]}


def standalone_profile(model_dir: str | os.PathLike, runtime: str, text: str) -> dict:
    """Time the torch-free classify.py on the ONNX file `runtime` ("onnx" or "onnx-int8") reads
    (the same verified export `slm export --format onnx` writes, from the cache), with the export's
    tokenizer and labels beside it: {"standalone_cold_start_s", "standalone_peak_rss_mb"}."""
    from smallmighty.compress.classifier_export import max_length, write_runtime_files
    from smallmighty.engine.classifier import runtime_file

    model_dir = Path(model_dir)
    with tempfile.TemporaryDirectory(prefix="slm-standalone-") as tmp:
        folder = Path(tmp)
        (folder / "model.onnx").symlink_to(runtime_file(model_dir, runtime).resolve())
        write_runtime_files(model_dir, folder, max_length=max_length(model_dir), info={"format": "onnx"})
        start = standalone_start(folder, text, model_file="model.onnx")
    return {"standalone_cold_start_s": start["cold_start_s"], "standalone_peak_rss_mb": start["peak_rss_mb"]}


# ---- the card's cost rows ---------------------------------------------------------------------


def cost_assumptions(price_per_core_hour: float = DEFAULT_PRICE_PER_CORE_HOUR,
                     watts_per_core: float = DEFAULT_WATTS_PER_CORE) -> dict:
    """The stated figures a card's costs are computed with (kept in the card as `cost`)."""
    for name, value in (("price per core-hour", price_per_core_hour), ("watts per core", watts_per_core)):
        if not value > 0:
            from smallmighty.errors import SlmError

            raise SlmError(f"{name} must be a positive number, got {value!r}")
    return {"price_per_core_hour": price_per_core_hour, "watts_per_core": watts_per_core}


def cost_rows(card: dict) -> list[dict]:
    """One row per model measured for cost: CPU s / 1k requests, energy J / 1k (RAPL or estimate),
    $ / 1M requests, and the torch-free runtime's start where measured."""
    assumed = card.get("cost") or cost_assumptions()
    rows = []
    for model in card["models"]:
        cpu = model.get("cpu_s_per_1k")
        if cpu is None:
            continue
        rapl = model.get("rapl_j_per_1k")
        rows.append({
            "model": f"{model['name']} ({model['runtime']})", "cpu_s_per_1k": cpu,
            "energy_j_per_1k": rapl if rapl is not None else cpu * assumed["watts_per_core"],
            "energy_source": "RAPL" if rapl is not None else f"estimate, {assumed['watts_per_core']:g} W per busy core",
            "usd_per_1m": cpu * 1000 / 3600 * assumed["price_per_core_hour"],
            "standalone_cold_start_s": model.get("standalone_cold_start_s"),
            "standalone_peak_rss_mb": model.get("standalone_peak_rss_mb"),
        })
    return rows


_COLUMNS = [("model", "model", "{}"), ("CPU s / 1k requests", "cpu_s_per_1k", "{:.3f}"),
            ("energy J / 1k", "energy_j_per_1k", "{:.2f}"), ("energy from", "energy_source", "{}"),
            ("$ / 1M requests", "usd_per_1m", "{:.4f}"), ("torch-free start s", "standalone_cold_start_s", "{:.2f}"),
            ("torch-free peak RSS MB", "standalone_peak_rss_mb", "{:.0f}")]


def _cells(row: dict) -> list[str]:
    return ["-" if row[key] is None else fmt.format(row[key]) for _, key, fmt in _COLUMNS]


def _note(card: dict) -> str:
    assumed = card.get("cost") or cost_assumptions()
    return (f"Requests are single texts (batch 1). CPU seconds measured (process CPU time, all threads); dollars at "
            f"${assumed['price_per_core_hour']:g} per core-hour. Torch-free start: classify.py from "
            "`slm export --format onnx` in a Python with only onnxruntime, tokenizers and numpy, first answer "
            "to one text, second run.")


def format_cost_table(card: dict) -> str:
    """The cost rows as fixed-width text, with the note on what they assume ('' when none were measured)."""
    rows = cost_rows(card)
    if not rows:
        return ""
    table = [[h for h, _, _ in _COLUMNS]] + [_cells(r) for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(_COLUMNS))]
    lines = ["  ".join(c.ljust(w) if i in (0, 3) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n" + _note(card)


def cost_html(card: dict) -> str:
    """The cost section of the HTML report ('' when no model was measured for cost)."""
    rows = cost_rows(card)
    if not rows:
        return ""
    head = "".join(f'<th class="{"text" if i in (0, 3) else ""}">{html.escape(h)}</th>' for i, (h, _, _) in enumerate(_COLUMNS))
    body = "".join("<tr>" + "".join(f'<td class="{"text" if i in (0, 3) else ""}">{html.escape(c)}</td>'
                                    for i, c in enumerate(_cells(r))) + "</tr>" for r in rows)
    return (f"<h2>Cost</h2><p>{html.escape(_note(card))}</p>"
            f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
