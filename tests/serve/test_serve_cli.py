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

    def stream(self, prompt: str, settings: object, stats=None) -> Iterator[str]:
        self.prompts.append(prompt)
        reply = ["reply ", str(prompt.count("<user>"))]
        if stats is not None:
            stats.prompt_tokens, stats.new_tokens = len(prompt), len("".join(reply))
            stats.decode_seconds, stats.finish_reason = 0.5, "stop"
        yield from reply


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
    assert out.count("tokens/s;") == 3
    assert "[7 tokens, 12.0 tokens/s;" in out  # "reply 1": 7 characters, one token each; 6 steps in 0.5 s


def test_chat_ends_at_end_of_input_and_skips_blank_lines() -> None:
    out, engine = chat("\n   \nHi\n")
    assert len(engine.prompts) == 1 and out.count("tokens/s;") == 1
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
        def stream(self, prompt: str, settings: object, stats=None) -> Iterator[str]:
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
    replies = [line for line in out.splitlines() if "tokens/s;" in line]
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


def _broken_copy(tiny_dir: Path, tmp_path: Path, name: str, content: str | bytes) -> Path:
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_dir, folder)
    target = folder / name
    if isinstance(content, str):
        target.write_text(content)
    else:
        target.write_bytes(content)
    return folder


def _config_with(tiny_dir: Path, **fields: object) -> str:
    import json

    return json.dumps(json.loads((tiny_dir / "config.json").read_text()) | fields)


def _tokenizer_config_with(tiny_dir: Path, **fields: object) -> str:
    import json

    return json.dumps(json.loads((tiny_dir / "tokenizer_config.json").read_text()) | fields)


@pytest.mark.parametrize("name, content, message", [
    ("tokenizer.json", "{not json", "tokenizer.json: not a valid tokenizers file"),
    ("model.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{}", "model.safetensors: not a readable safetensors file"),
    ("tokenizer_config.json", lambda d: _tokenizer_config_with(d, chat_template="{{ messages[3].content.x }}"),
     "chat template failed to render: UndefinedError"),
    ("config.json", lambda d: _config_with(d, rope_scaling={"rope_type": "llama3", "factor": 8.0}),
     "config.json, field 'rope_scaling': llama3 rope scaling needs a positive number 'low_freq_factor'"),
])
def test_broken_model_files_are_one_line_naming_the_file(tiny_dir: Path, tmp_path: Path, name: str, content,
                                                          message: str, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _broken_copy(tiny_dir, tmp_path, name, content(tiny_dir) if callable(content) else content)
    assert main(["generate", "--model", str(folder), "--precision", "fp32", "Hello"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    if name != "tokenizer_config.json":
        assert str(folder / name) in err[0]


def test_generate_into_a_closed_pipe_exits_quietly(tiny_dir: Path, engine) -> None:
    # `slm generate | head -1`: the reader leaves before the reply is written.
    proc = subprocess.Popen([sys.executable, "-m", "smallmighty.cli", "generate", "--model", str(tiny_dir),
                             "--precision", "fp32", "--max-new-tokens", "32", "Hello"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ | {"PYTHONPATH": str(REPO)})
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err, err


def test_generate_reports_new_tokens_and_decode_speed(tiny_dir: Path, engine,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    import re

    prompt = engine.apply_chat_template([{"role": "user", "content": "Hello there"}])
    new = engine.generate([engine.encode(prompt)], settings(max_new_tokens=20))[0]
    assert main(["generate", "--model", str(tiny_dir), "--precision", "fp32", "--max-new-tokens", "20",
                 "Hello there"]) == 0
    report = capsys.readouterr().err.strip().splitlines()[-1]
    found = re.fullmatch(r"\[(\d+) tokens, ([\d.]+) tokens/s; prompt (\d+) tokens in [\d.]+ s(.*), fp32\]", report)
    assert found, report
    assert int(found[1]) == len(new) and int(found[3]) == len(engine.encode(prompt))
    assert float(found[2]) > 0
    limit = "; stopped at the --max-new-tokens limit (20)"
    assert (found[4] == limit) == (len(new) == 20 and new[-1] not in engine.eos_token_ids)


def test_chat_says_when_a_reply_hit_the_token_limit(tiny_dir: Path, engine, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n"))
    assert main(["chat", "--model", str(tiny_dir), "--precision", "fp32", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "[3 tokens, " in out and "stopped at the --max-new-tokens limit (3)]" in out, out


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
