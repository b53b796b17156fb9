"""The `slm` command line: one verb per step of the small-model path.

Each capability folder owns a `commands.py` with a `register(subparsers)` function. Those modules
import nothing heavy at import time, so `slm --help` and start-up stay fast; torch and transformers
load inside the handlers.
"""

from __future__ import annotations

import argparse
import importlib
import os
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


def typed_settings(argv: list[str]) -> set[str]:
    """Names of the settings typed on the command line `argv` (defaults left out), so that a
    recipe never overrides a typed flag, even one typed with its default value: `argv` is parsed
    a second time by a parser whose every default is suppressed."""
    quiet = build_parser()
    parsers = [quiet]
    while parsers:
        parser = parsers.pop()
        parser._defaults.clear()
        for action in parser._actions:
            action.default = argparse.SUPPRESS
            if isinstance(action, argparse._SubParsersAction):
                parsers.extend(action.choices.values())
    return set(vars(quiet.parse_args(argv))) - {"command"}


def _prepare(args: argparse.Namespace, parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """Settings from the command line over a recipe over the defaults; outputs checked writable."""
    from smallmighty.io import check_writable

    if getattr(args, "recipe", None):
        from smallmighty.train.arguments import apply_recipe

        args.typed_on_command_line = typed_settings(argv)
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
        every_setting = {a.dest for sub in commands.values() for a in sub._actions}
        apply_recipe(args, commands[args.command], other_settings=every_setting)
    if getattr(args, "out", None):
        check_writable(args.out)


def _silence_stdout() -> None:
    """Point stdout at /dev/null: its reader is gone (`slm generate | head`), and Python's final
    flush would otherwise print a BrokenPipeError at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a real file (a test's capture)
        pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 0
    try:
        _prepare(args, parser, argv)
        return int(args.handler(args) or 0)
    except SlmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        _silence_stdout()
        return 0
    except OSError as exc:
        if exc.filename is None:  # not about a path the user gave: a bug, keep the traceback
            raise
        print(f"error: {exc.filename}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
