"""`slm generate` and `slm chat`: the parser, the chat REPL, and both commands end to end.

The REPL logic runs against a small scripted engine (so /reset, /exit and history trimming are
checked exactly); the commands run against the real engine on a tiny random Llama folder.
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
from tiny_llama import write_tiny_llama

from smallmighty.cli import main
from smallmighty.errors import SlmError
from smallmighty.serve import commands
from smallmighty.serve.chat import ChatSession, run_chat

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("serve") / "tiny-llama")


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="slm")
    commands.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(list(argv))


# --- parser -----------------------------------------------------------------------------------

def test_generate_defaults_need_no_arguments() -> None:
    args = parse("generate")
    assert (args.prompt, args.model, args.precision, args.raw) == (None, None, "int8", False)
    assert args.handler is commands.run_generate


def test_flags_parse() -> None:
    args = parse("generate", "--stop", "\n", "--stop", "END", "--temperature", "0.7", "--top-p", "0.9",
                 "--seed", "3", "--precision", "int4", "--raw", "Hello")
    assert (args.stop, args.temperature, args.top_p, args.seed, args.precision, args.prompt) == (
        ["\n", "END"], 0.7, 0.9, 3, "int4", "Hello")
    assert parse("chat", "--system", "Be brief.").handler is commands.run_chat_command


@pytest.mark.parametrize("verb", ["generate", "chat"])
def test_help_teaches_with_examples(verb: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse(verb, "--help")
    text = capsys.readouterr().out
    assert "examples:" in text and f"slm {verb}" in text and "--precision {fp32,int8,int4}" in text


def test_command_module_imports_nothing_heavy() -> None:
    code = ("import sys, argparse; from smallmighty.serve import commands; "
            "commands.register(argparse.ArgumentParser().add_subparsers()); "
            "print([m for m in ('torch', 'transformers', 'numpy') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=os.environ | {"PYTHONPATH": str(REPO)})
    assert out.stdout.strip() == "[]"


# --- chat REPL, with a scripted engine --------------------------------------------------------

class ScriptedEngine:
    """Replies "reply N" to the N-th user message it sees in the prompt; one token per character."""

    max_seq_len = 200
    precision = "fp32"

    def __init__(self) -> None:
        self.prompts: list[str] = []

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + ("<assistant>" if add_generation_prompt else "")

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def stream(self, prompt: str, settings: object) -> Iterator[str]:
        self.prompts.append(prompt)
        yield from ["reply ", str(prompt.count("<user>"))]


class Settings:
    max_new_tokens = 50


def chat(lines: str, engine: ScriptedEngine | None = None, system: str | None = None) -> tuple[str, ScriptedEngine]:
    engine = engine or ScriptedEngine()
    out = io.StringIO()
    assert run_chat(ChatSession(engine, Settings(), system=system), io.StringIO(lines), out) == 0
    return out.getvalue(), engine


def test_chat_keeps_history_and_resets() -> None:
    out, engine = chat("Hi\nAnd you?\n/reset\nHello again\n/exit\nnever read\n", system="Be nice.")
    assert engine.prompts == [
        "<system>Be nice.<user>Hi<assistant>",
        "<system>Be nice.<user>Hi<assistant>reply 1<user>And you?<assistant>",
        "<system>Be nice.<user>Hello again<assistant>",
    ]
    assert "(history cleared)" in out
    assert out.count("tokens/s]") == 3
    assert "[7 tokens in" in out  # "reply 1" is 7 characters, one token each here


def test_chat_ends_at_end_of_input_and_skips_blank_lines() -> None:
    out, engine = chat("\n   \nHi\n")
    assert len(engine.prompts) == 1 and out.count("tokens/s]") == 1
    assert out.endswith("> \n")  # the last prompt, closed with a newline at end of input


def test_chat_unknown_command_is_explained() -> None:
    out, engine = chat("/help\n")
    assert "unknown command /help" in out and engine.prompts == []


def test_chat_drops_oldest_turns_to_fit_the_context() -> None:
    engine = ScriptedEngine()
    session = ChatSession(engine, Settings())  # room for 200 - 50 = 150 prompt characters
    for message in ["a" * 40, "b" * 40, "c" * 40]:
        "".join(session.reply(message))
    assert engine.prompts[-1] == f"<user>{'b' * 40}<assistant>reply 2<user>{'c' * 40}<assistant>"
    assert [m["content"][0] for m in session.history] == ["b", "r", "c", "r"]


def test_chat_too_long_message_is_an_error_not_an_exit() -> None:
    out, engine = chat("x" * 500 + "\nshort\n")
    assert "error: this message needs 517 prompt tokens, but the model has room for 150" in out
    assert engine.prompts == ["<user>short<assistant>"]


def test_interrupted_reply_is_not_kept() -> None:
    class Interrupted(ScriptedEngine):
        def stream(self, prompt: str, settings: object) -> Iterator[str]:
            self.prompts.append(prompt)
            yield "part"
            if len(self.prompts) == 1:
                raise KeyboardInterrupt

    out, engine = chat("first\nsecond\n", Interrupted())
    assert "reply interrupted" in out
    assert engine.prompts[1] == "<user>second<assistant>"


# --- end to end on a tiny random Llama, with the real engine ----------------------------------

@pytest.fixture(scope="module")
def engine(tiny_dir: Path):
    engine_module = pytest.importorskip("smallmighty.engine.generate")
    return engine_module.Engine.from_pretrained(tiny_dir, precision="fp32")


def settings(**overrides: object):
    from smallmighty.engine.sampling import GenerationSettings

    return GenerationSettings(**{"max_new_tokens": 12, **overrides})


def test_generate_streams_the_engines_reply(tiny_dir: Path, engine, capsys: pytest.CaptureFixture[str]) -> None:
    prompt = engine.apply_chat_template([{"role": "system", "content": "Be brief."},
                                         {"role": "user", "content": "Hello there"}])
    expected = engine.generate_text(prompt, settings())
    assert main(["generate", "--model", str(tiny_dir), "--precision", "fp32", "--max-new-tokens", "12",
                 "--system", "Be brief.", "Hello there"]) == 0
    captured = capsys.readouterr()
    assert captured.out == expected + "\n"
    assert "tokens/s" in captured.err


def test_generate_raw_from_stdin(tiny_dir: Path, engine, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    expected = engine.generate_text("The capital of France", settings(max_new_tokens=8))
    monkeypatch.setattr(sys, "stdin", io.StringIO("The capital of France"))
    assert main(["generate", "--model", str(tiny_dir), "--precision", "fp32", "--max-new-tokens", "8",
                 "--raw", "-"]) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_chat_end_to_end(tiny_dir: Path, engine, monkeypatch: pytest.MonkeyPatch,
                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n/reset\nHello\n/exit\n"))
    assert main(["chat", "--model", str(tiny_dir), "--precision", "int8", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert "Chatting with" in out and "(history cleared)" in out
    replies = [line for line in out.splitlines() if line.endswith("tokens/s]")]
    assert len(replies) == 2


@pytest.mark.parametrize("argv, message", [
    (["--model", "/no/such/model.gguf"], "/no/such/model.gguf: no such file"),
    (["--temperature", "-1"], "temperature"),
    (["--top-p", "1.5"], "top"),
    (["--raw", "word " * 400], "token"),  # longer than the tiny model's 256-token context
])
def test_errors_are_one_line_with_status_2(tiny_dir: Path, engine, argv: list[str], message: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    model = [] if "--model" in argv else ["--model", str(tiny_dir)]
    assert main(["generate", *model, *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_empty_prompt_is_refused(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("  \n"))
    with pytest.raises(SlmError, match="the prompt is empty"):
        commands._prompt_text(parse("generate", "-"))


@pytest.mark.slow
def test_generate_on_the_default_model() -> None:
    """`slm generate` with no arguments: the real SmolLM2 answers the demo question."""
    out = subprocess.run([sys.executable, "-m", "smallmighty.cli", "generate"], capture_output=True, text=True,
                         env=os.environ | {"PYTHONPATH": str(REPO)}, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout
