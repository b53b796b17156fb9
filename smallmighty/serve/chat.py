"""The terminal chat behind `slm chat`: a conversation history, a REPL, and nothing model-specific.

Kept apart from the command so it can be driven with fake stdin/stdout in tests, and so the engine
is only reached through the small `Engine` surface it uses (`encode`, `apply_chat_template`,
`stream`, `max_seq_len`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, TextIO

from smallmighty.errors import SlmError

HELP = "Type a message and press Enter. /reset clears the history, /exit (or Ctrl-D) quits."


@dataclass
class ChatSession:
    """One conversation: the turns so far, and how to turn them into the next reply.

    When the history grows past the model's context, the oldest turns are dropped (the system
    prompt stays), so a long chat keeps going instead of failing.
    """

    engine: Any
    settings: Any
    system: str | None = None
    history: list[dict[str, str]] = field(default_factory=list)

    def reset(self) -> None:
        self.history.clear()

    def reply(self, user_text: str, stats: Any = None) -> Iterator[str]:
        """Stream the assistant's reply to `user_text` as text deltas; record the turn once it completes.

        A reply cut short (Ctrl-C, an error) leaves the history as it was before the message.
        `stats` (a `GenerationStats`) is filled in as the reply runs.
        """
        prompt = self._prompt_with(user_text)
        parts: list[str] = []
        for delta in self.engine.stream(prompt, self.settings, stats):
            parts.append(delta)
            yield delta
        self.history += [{"role": "user", "content": user_text},
                         {"role": "assistant", "content": "".join(parts)}]

    def _prompt_with(self, user_text: str) -> str:
        budget = self.engine.max_seq_len - self.settings.max_new_tokens
        turn = [{"role": "user", "content": user_text}]
        while True:
            prompt = self.engine.apply_chat_template(self._system() + self.history + turn,
                                                     add_generation_prompt=True)
            length = len(self.engine.encode(prompt))
            if length <= budget:
                return prompt
            if not self.history:
                raise SlmError(f"this message needs {length} prompt tokens, but the model has room for "
                               f"{budget} ({self.engine.max_seq_len} context - {self.settings.max_new_tokens} "
                               "new tokens); shorten it or lower --max-new-tokens")
            del self.history[:2]  # the oldest user/assistant pair

    def _system(self) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.system}] if self.system else []


def run_chat(session: ChatSession, stdin: TextIO, stdout: TextIO, *, banner: str = "") -> int:
    """Read messages from `stdin` until /exit, end of input or Ctrl-C; stream replies to `stdout`.

    After each reply prints its length and speed. Ctrl-C during a reply stops only that reply.
    Returns the exit status (0).
    """
    if banner:
        print(banner, file=stdout)
    print(HELP, file=stdout)
    while True:
        try:
            line = _read_line(stdin, stdout, "\n> ")
        except (EOFError, KeyboardInterrupt):
            print(file=stdout)
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            session.reset()
            print("(history cleared)", file=stdout)
            continue
        if text.startswith("/"):
            print(f"unknown command {text.split()[0]}. {HELP}", file=stdout)
            continue
        _answer(session, text, stdout)


def _answer(session: ChatSession, text: str, stdout: TextIO) -> None:
    from smallmighty.engine.generate import GenerationStats

    stats = GenerationStats()
    try:
        for delta in session.reply(text, stats):
            stdout.write(delta)
            stdout.flush()
    except KeyboardInterrupt:
        print("\n(reply interrupted; not kept in the history)", file=stdout)
        return
    except SlmError as exc:
        print(f"error: {exc}", file=stdout)
        return
    print(f"\n[{speed_report(stats, session.settings, session.engine.max_seq_len)}]", file=stdout)


def speed_report(stats: Any, settings: Any, context: int) -> str:
    """One line on a reply (`GenerationStats`): its length, decode speed, prompt time, and whether
    a limit cut it short. Tokens/s counts the decode steps only, as llama.cpp's "eval" figure
    does: the prompt's pass (which also gives the first token) is reported on its own."""
    line = (f"{stats.new_tokens} tokens, {stats.decode_tokens_per_s:.1f} tokens/s; "
            f"prompt {stats.prompt_tokens} tokens in {stats.prefill_seconds:.2f} s")
    if stats.finish_reason == "length":
        if stats.new_tokens >= settings.max_new_tokens:
            line += f"; stopped at the --max-new-tokens limit ({settings.max_new_tokens})"
        else:
            line += f"; stopped at the end of the model's {context}-token context"
    return line


def _read_line(stdin: TextIO, stdout: TextIO, prompt: str) -> str:
    """`input()` on a terminal (line editing, history); plain reads from pipes and test streams."""
    if stdin.isatty() and stdout.isatty():
        return input(prompt)
    stdout.write(prompt)
    stdout.flush()
    line = stdin.readline()
    if not line:
        raise EOFError
    return line
