"""The `slm` command line: one verb per step of the small-model path.

Each capability folder owns a `commands.py` with a `register(subparsers)` function. Those modules
import nothing heavy at import time, so `slm --help` and start-up stay fast; torch and transformers
load inside the handlers.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from smallmighty import __version__
from smallmighty.errors import SlmError

# Capability modules that contribute verbs, in the order `slm --help` lists them.
COMMAND_MODULES = [
    "smallmighty.data.commands",
    "smallmighty.train.commands",
    "smallmighty.distill.commands",
    "smallmighty.evaluate.commands",
    "smallmighty.compress.commands",
    "smallmighty.serve.commands",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slm",
        description="smallmighty: train, distill, compress, evaluate and serve small language models.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `slm <command> --help` for the options of one command.",
    )
    parser.add_argument("--version", action="version", version=f"smallmighty {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="<command>")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # capability not built yet
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 0
    try:
        return int(args.handler(args) or 0)
    except SlmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
