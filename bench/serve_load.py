"""`slm serve` under load, against llama.cpp's own `llama-server` on the same model, in one run.

    PYTHONPATH=. python bench/serve_load.py                   # 1, 4, 8, 16 clients, both servers
    PYTHONPATH=. python bench/serve_load.py --skip-llamacpp   # ours only (no build, no download)
    PYTHONPATH=. python bench/serve_load.py --overload        # also: 64 clients against a queue of 16
    PYTHONPATH=. python bench/serve_load.py --classifier runs/distill/student   # also: /v1/classify

Closed loop on loopback: each of N clients sends its next chat request as soon as the last one
ended, cycling through a fixed set of different questions; every request streams 128 new tokens
with end-of-sequence ignored (`ignore_eos`, which both servers take), greedy. A level stops after
`--requests` requests per client or `--seconds`, whichever comes first; one untimed request per
client warms it up. Measured per level: aggregate output tokens/s (tokens of the timed requests /
wall time from the first timed request's start to the last one's end), time to first token (from
sending to the first content chunk) and total latency, p50 and p95.

Ours: `slm serve` at int8 with `--max-batch 16`. llama.cpp: `llama-server` built with cmake from the
source that the llama-cpp-python 0.3.36 sdist vendors (server target only, web UI off; built once into
the cache, about 8 minutes on one core), on a q8_0 GGUF made from the same converted folder with
the converter that sdist ships, restarted per level with `--parallel N` slots (continuous batching is
on by default; each slot 512 tokens of context; its prompt cache stays on, its default). Both
servers get 2 threads; the clients are one asyncio process (a hand-written HTTP/1.1 client so their
cost is small and the same for both) sharing the same 2 cores.

Ends with ONE JSON line: {"1": {...}, "4": ..., "8": ..., "16": ...} with ours_tok_s, llamacpp_tok_s,
ours_ttft_p95_ms, llamacpp_ttft_p95_ms, ours_latency_p95_ms (and more), plus "overload" and
"classify" entries when asked for.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from decode import converted_gguf, llama_cpp_sdist  # noqa: E402

from smallmighty.cache import cache_dir  # noqa: E402

THREADS = 2
NEW_TOKENS = 128
SLOT_CONTEXT = 512
QUESTIONS = [
    "What are the three primary colours, and why are they called primary?",
    "Explain photosynthesis to a ten-year-old.", "Write a short poem about the sea.",
    "What is the capital of Australia?", "Give me three tips for learning to cook.",
    "Why is the sky blue?", "How does a bicycle stay upright?", "Summarise the plot of Romeo and Juliet.",
    "What causes the seasons on Earth?", "Describe how a rainbow forms.",
    "Give me a recipe for pancakes.", "What is the difference between weather and climate?",
    "How do vaccines work?", "Write a limerick about a cat.", "Why do leaves change colour in autumn?",
    "Explain what a computer program is.",
]


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the client ------------------------------------------------------------------------------

@dataclass
class Result:
    status: int
    ttft: float = 0.0
    latency: float = 0.0
    tokens: int = 0
    retry_after: str | None = None


async def chat_request(port: int, body: dict) -> Result:
    """POST /v1/chat/completions and read its event stream; one HTTP/1.1 connection per request."""
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    payload = json.dumps(body).encode()
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(payload), payload))
    await writer.drain()
    status = int((await reader.readline()).split()[1])
    headers = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    result = Result(status, retry_after=headers.get("retry-after"))
    if status != 200:
        await reader.read()
        writer.close()
        result.latency = time.perf_counter() - start
        return result
    chunked = "chunked" in headers.get("transfer-encoding", "")
    buffer = b""
    while True:
        if chunked:
            size = int((await reader.readline()).strip() or b"0", 16)
            data = await reader.readexactly(size + 2) if size else b""
            if not size:
                break
            buffer += data[:-2]
        else:
            data = await reader.read(65536)
            if not data:
                break
            buffer += data
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            for line in event.split(b"\n"):
                if not line.startswith(b"data:") or line[5:].strip() == b"[DONE]":
                    continue
                chunk = json.loads(line[5:])
                for choice in chunk.get("choices") or []:
                    if (choice.get("delta") or {}).get("content"):
                        if not result.ttft:
                            result.ttft = time.perf_counter() - start
                if chunk.get("usage"):
                    result.tokens = chunk["usage"]["completion_tokens"]
    writer.close()
    result.latency = time.perf_counter() - start
    return result


def request_body(question: str) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": question}], "max_tokens": NEW_TOKENS,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}


@dataclass
class Level:
    results: list[Result] = field(default_factory=list)
    wall: float = 0.0

    def figures(self) -> dict[str, float]:
        ok = [r for r in self.results if r.status == 200]
        tokens = sum(r.tokens for r in ok)
        ttft = sorted(r.ttft for r in ok)
        latency = sorted(r.latency for r in ok)
        return {"requests": len(ok), "failed": len(self.results) - len(ok), "tokens": tokens,
                "tok_s": tokens / self.wall, "ttft_p50_ms": 1000 * pct(ttft, 50),
                "ttft_p95_ms": 1000 * pct(ttft, 95), "latency_p50_ms": 1000 * pct(latency, 50),
                "latency_p95_ms": 1000 * pct(latency, 95)}


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


async def closed_loop(port: int, clients: int, requests: int, seconds: float) -> Level:
    """`clients` clients, each sending `requests` requests back to back (or until `seconds`)."""
    await asyncio.gather(*(chat_request(port, request_body(QUESTIONS[c % len(QUESTIONS)]))
                           for c in range(clients)))  # warm-up, untimed
    level = Level()
    start = time.perf_counter()

    async def client(c: int) -> None:
        for i in range(requests):
            if time.perf_counter() - start > seconds:
                return
            question = QUESTIONS[(c * requests + i + 1) % len(QUESTIONS)]
            level.results.append(await chat_request(port, request_body(question)))

    await asyncio.gather(*(client(c) for c in range(clients)))
    level.wall = time.perf_counter() - start
    return level


# ---- servers ---------------------------------------------------------------------------------

class Server:
    """A server subprocess, stopped with SIGTERM on exit."""

    def __init__(self, command: list[str], port: int, env: dict[str, str] | None = None) -> None:
        self.port = port
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 600
        while not self._healthy():
            if self.process.poll() is not None:
                raise RuntimeError(f"{command[0]} exited: {self.process.stderr.read().decode()[-2000:]}")
            if time.time() > deadline:
                raise RuntimeError(f"{command[0]} did not become healthy")
            time.sleep(0.25)

    def _healthy(self) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as answer:
                return answer.status == 200
        except OSError:
            return False

    def rss_mb(self) -> tuple[float, float]:
        """(current, peak) resident memory of the server process in MB."""
        fields = {}
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            fields[name] = value
        return (int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024)

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def ours(port: int, max_queue: int = 64, model: str | None = None, extra: tuple[str, ...] = ()) -> Server:
    command = [sys.executable, "-m", "smallmighty.cli", "serve", "--port", str(port), "--max-batch", "16",
               "--max-queue", str(max_queue), *extra]
    if model is not None:
        command.append(model)
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(THREADS)}
    return Server(command, port, env)


def llama_server_binary(cache: Path) -> Path:
    """llama-server built (once) from the llama.cpp sources the llama-cpp-python sdist vendors."""
    source = llama_cpp_sdist(cache) / "vendor" / "llama.cpp"
    build = cache / "llama-server-build"
    binary = build / "bin" / "llama-server"
    if not binary.is_file():
        log("building llama-server with cmake (once; about 8 minutes on one core)")
        subprocess.run(["cmake", "-S", str(source), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                        "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                        "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_OPENSSL=OFF",
                        "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF"], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["cmake", "--build", str(build), "--target", "llama-server", "-j", str(os.cpu_count())],
                       check=True, stdout=subprocess.DEVNULL)
    return binary


def llama_server(binary: Path, gguf: Path, port: int, parallel: int, extra: list[str]) -> Server:
    return Server([str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
                   "-t", str(THREADS), "-tb", str(THREADS), "--parallel", str(parallel),
                   "-c", str(SLOT_CONTEXT * parallel), "--cont-batching", "--no-webui", *extra], port)


# ---- runs ------------------------------------------------------------------------------------

def load_levels(port_of: "callable", levels: list[int], args: argparse.Namespace, name: str) -> dict[int, dict]:
    out = {}
    for clients in levels:
        with port_of(clients) as server:
            level = asyncio.run(closed_loop(server.port, clients, args.requests or max(3, 32 // clients),
                                            args.seconds))
        out[clients] = level.figures()
        f = out[clients]
        log(f"{name} {clients:>2} clients: {f['tok_s']:.1f} tok/s, TTFT p50/p95 {f['ttft_p50_ms']:.0f}/"
            f"{f['ttft_p95_ms']:.0f} ms, latency p50/p95 {f['latency_p50_ms']:.0f}/{f['latency_p95_ms']:.0f} ms "
            f"({f['requests']} requests, {f['failed']} failed)")
    return out


def overload(args: argparse.Namespace, clients: int = 64, queue: int = 16, seconds: float = 30.0) -> dict:
    """`clients` clients against a server with 16 rows and a queue of `queue`; rejected clients wait
    Retry-After (as a polite client does) and try again."""
    with ours(free_port(), max_queue=queue) as server:
        start_rss = server.rss_mb()[0]
        results: list[Result] = []
        samples: list[float] = []

        async def client(c: int, start: float) -> None:
            i = 0
            while time.perf_counter() - start < seconds:
                result = await chat_request(server.port, request_body(QUESTIONS[(c + i) % len(QUESTIONS)]))
                results.append(result)
                i += 1
                if result.status == 429:
                    await asyncio.sleep(float(result.retry_after or 1))

        async def sampler(start: float) -> None:
            while time.perf_counter() - start < seconds + 5:
                samples.append(server.rss_mb()[0])
                await asyncio.sleep(0.5)

        async def run() -> None:
            start = time.perf_counter()
            await asyncio.gather(sampler(start), *(client(c, start) for c in range(clients)))

        asyncio.run(run())
        peak = server.rss_mb()[1]
    accepted = [r for r in results if r.status == 200]
    rejected = [r for r in results if r.status == 429]
    figures = {
        "clients": clients, "queue": queue, "accepted": len(accepted), "rejected_429": len(rejected),
        "other_status": len(results) - len(accepted) - len(rejected),
        "accepted_complete": all(r.tokens == NEW_TOKENS for r in accepted),
        "rejects_with_retry_after": all(r.retry_after for r in rejected),
        "reject_latency_p50_ms": 1000 * pct(sorted(r.latency for r in rejected), 50),
        "reject_latency_p95_ms": 1000 * pct(sorted(r.latency for r in rejected), 95),
        "rss_start_mb": start_rss, "rss_max_sampled_mb": max(samples), "rss_peak_mb": peak,
    }
    log(f"overload: {figures}")
    return figures


def classify(model: str, clients: int = 8, seconds: float = 15.0) -> dict:
    """/v1/classify requests/s with `clients` concurrent clients (one text each), against the same
    classifier called in this process one text at a time."""
    from smallmighty.engine.classifier import load_classifier

    texts = [q for q in QUESTIONS]
    classifier = load_classifier(model, runtime="onnx")
    classifier.predict(texts[:1])
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        classifier.predict([texts[done % len(texts)]])
        done += 1
    alone = done / (time.perf_counter() - start)
    del classifier

    async def post(connection: tuple[asyncio.StreamReader, asyncio.StreamWriter], text: str) -> None:
        """One request on a kept-alive connection (as HTTP client libraries do)."""
        reader, writer = connection
        payload = json.dumps({"input": text}).encode()
        writer.write(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(head[:300])
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        await reader.readexactly(length)

    with ours(free_port(), model=model) as server:
        count = 0

        async def client(connection, c: int, start: float) -> None:
            nonlocal count
            while time.perf_counter() - start < seconds:
                await post(connection, texts[(c + count) % len(texts)])
                count += 1

        async def run() -> float:
            connections = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(clients)]
            await asyncio.gather(*(post(conn, texts[c]) for c, conn in enumerate(connections)))  # warm-up
            start = time.perf_counter()
            await asyncio.gather(*(client(conn, c, start) for c, conn in enumerate(connections)))
            elapsed = time.perf_counter() - start
            for _, writer in connections:
                writer.close()
            return elapsed

        elapsed = asyncio.run(run())  # (before reading `count`, which the clients advance)
        served = count / elapsed
    figures = {"clients": clients, "served_req_s": served, "one_at_a_time_req_s": alone,
               "ratio": served / alone}
    log(f"classify: {figures}")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="1,4,8,16", help="concurrency levels (default: %(default)s)")
    parser.add_argument("--requests", type=int, default=0,
                        help="timed requests per client (default: max(3, 32 / clients))")
    parser.add_argument("--seconds", type=float, default=90.0, help="time bound per level (default: %(default)s)")
    parser.add_argument("--skip-llamacpp", action="store_true", help="leave out llama-server (no build, no download)")
    parser.add_argument("--overload", action="store_true", help="also run 64 clients against a queue of 16")
    parser.add_argument("--classifier", default=None, metavar="DIR",
                        help="also measure /v1/classify on this classifier folder (from `slm distill`)")
    parser.add_argument("--skip-load", action="store_true", help="leave out the 1/4/8/16-client levels")
    parser.add_argument("--ours-args", default="", metavar="FLAGS",
                        help="extra `slm serve` flags, e.g. '--prefill-chunk 64' (default: none)")
    parser.add_argument("--llama-args", default="", metavar="FLAGS",
                        help="extra llama-server flags, e.g. '-fa on' (default: none)")
    parser.add_argument("--skip-ours", action="store_true", help="leave out our server (llama-server only)")
    args = parser.parse_args()
    levels = [int(c) for c in args.clients.split(",")]

    from smallmighty.models.causal_lm import resolve_causal_lm

    model_dir = resolve_causal_lm(None)
    results: dict[str, dict] = {}
    if not args.skip_load:
        mine: dict[int, dict] = {}
        if not args.skip_ours:
            with ours(free_port(), extra=tuple(args.ours_args.split())) as server:
                mine = load_levels(lambda clients: _Keep(server), levels, args, "ours")
        theirs: dict[int, dict] = {}
        if not args.skip_llamacpp:
            cache = cache_dir("bench")
            binary = llama_server_binary(cache)
            if importlib.util.find_spec("sentencepiece") is None:  # llama.cpp's converter imports it
                subprocess.run([sys.executable, "-m", "pip", "install", "-q", "sentencepiece"], check=True)
            gguf = converted_gguf(model_dir, llama_cpp_sdist(cache), cache, "q8_0")
            extra = args.llama_args.split()
            theirs = load_levels(lambda clients: llama_server(binary, gguf, free_port(), clients, extra), levels,
                                 args, "llama-server")
        for clients in levels:
            row = {f"ours_{k}": v for k, v in mine.get(clients, {}).items()}
            row |= {f"llamacpp_{k}": v for k, v in theirs.get(clients, {}).items()}
            if theirs and mine:
                row["tok_s_ratio"] = row["ours_tok_s"] / row["llamacpp_tok_s"]
            results[str(clients)] = row
        report(results, levels)
    if args.overload:
        results["overload"] = overload(args)
    if args.classifier:
        results["classify"] = classify(args.classifier)
    print(json.dumps(results))


class _Keep:
    """A context around an already running server that leaves it running (ours serves every level)."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.port = server.port

    def __enter__(self) -> Server:
        return self.server

    def __exit__(self, *exc: object) -> None:
        pass


def report(results: dict[str, dict], levels: list[int]) -> None:
    print("| clients | ours tok/s | llama-server tok/s | ratio | ours TTFT p50/p95 ms | llama-server TTFT "
          "p50/p95 ms | ours latency p50/p95 ms | llama-server latency p50/p95 ms |")
    print("|---|---|---|---|---|---|---|---|")
    for clients in levels:
        r = results[str(clients)]

        def cell(prefix: str, a: str, b: str | None = None) -> str:
            if f"{prefix}_{a}" not in r:
                return "-"
            return f"{r[f'{prefix}_{a}']:.0f}" + (f" / {r[f'{prefix}_{b}']:.0f}" if b else "")

        ratio = f"{r['tok_s_ratio']:.2f}x" if "tok_s_ratio" in r else "-"
        print(f"| {clients} | {cell('ours', 'tok_s')} | {cell('llamacpp', 'tok_s')} | {ratio} | "
              f"{cell('ours', 'ttft_p50_ms', 'ttft_p95_ms')} | {cell('llamacpp', 'ttft_p50_ms', 'ttft_p95_ms')} | "
              f"{cell('ours', 'latency_p50_ms', 'latency_p95_ms')} | "
              f"{cell('llamacpp', 'latency_p50_ms', 'latency_p95_ms')} |")


if __name__ == "__main__":
    main()
