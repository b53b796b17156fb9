"""Chat data for instruction tuning: conversations read from common JSONL layouts, rendered with the
model's own chat template, with a mask that keeps the loss on the assistant's tokens only.

Why the model's own template: a chat model only answers well when it sees turns laid out exactly as
at inference (`slm chat` renders with the same template), so training renders with it too.

Why the loss covers assistant tokens only: the user's words and the template's markup are given at
inference, never generated; training on them spends capacity on text the model never has to write.

Layouts (one JSON object per line; blank lines are ignored), told apart by their keys:

- OpenAI `{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}`
- ShareGPT `{"conversations": [{"from": "human"|"gpt"|"system", "value": "..."}, ...]}`
- prompt/response pairs `{"prompt": "...", "response": "..."}` (or `"completion"`)
- alternating turns `{"turns": ["user text", "assistant text", ...]}` (the ChatterBot corpus)

Pairs, turns and ShareGPT records may carry a top-level `"system"` string.

What counts as bad input, and what happens to it:

- a line that is not a JSON object, a record in none of the layouts, an unknown role, a turn that is
  not a string or is empty: a `DataError` naming the file and line (the file needs fixing);
- a conversation without an assistant turn at its end (it ends on a user turn, or holds no answer),
  or one longer than the context: skipped, counted by reason in `ChatData.skipped` with the first
  place each reason was seen, and reported by the commands. `strict=True` makes these errors too.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smallmighty.errors import DataError, SlmError

ROLES = ("system", "user", "assistant")
#: ShareGPT speaker names, as the datasets in the wild spell them, mapped to roles.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "chatgpt": "assistant", "bard": "assistant", "model": "assistant"}
#: Reasons a conversation is skipped (see the module docstring).
ENDS_ON_USER = "ending on a user turn"
NO_ANSWER = "without an assistant turn"
TOO_LONG = "longer than the context"
#: Label of tokens the loss leaves out (transformers' and PyTorch's ignore index).
IGNORE_INDEX = -100


@dataclass
class Conversation:
    """Messages `[{"role", "content"}]` and where they were read (for error messages).

    `open_end`: the last answer was cut off (a teacher that hit its token limit), so its text is
    learned but not the end-of-turn marker after it: the model must not learn to stop mid-sentence.
    """

    messages: list[dict[str, str]]
    file: str
    line: int
    open_end: bool = False


@dataclass
class ChatData:
    """Conversations from one source, and the ones left out: `skipped[reason]` counts them and
    `first_skipped[reason]` says where the first one was."""

    conversations: list[Conversation]
    source: str
    skipped: Counter = field(default_factory=Counter)
    first_skipped: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.conversations)

    def skip(self, reason: str, conversation_file: str, line: int, strict: bool) -> None:
        if strict:
            raise DataError(f"a conversation {reason}", file=conversation_file, line=line)
        self.skipped[reason] += 1
        self.first_skipped.setdefault(reason, f"{conversation_file}, line {line}")

    def skip_report(self) -> str:
        """One line per reason, e.g. 'skipped 43 conversations ending on a user turn (first: f, line 7)'."""
        return "\n".join(f"skipped {n} conversation{'s' if n > 1 else ''} {reason} "
                         f"(first: {self.first_skipped[reason]})" for reason, n in sorted(self.skipped.items()))


def load_chat(path: str | Path, *, strict: bool = False) -> ChatData:
    """Read conversations from a JSONL file, or from a folder holding `train.jsonl` or exactly one
    `.jsonl` file. See the module docstring for the layouts and what happens to bad input."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = _pick_file(path)
    if not path.is_file():
        raise SlmError(f"{path}: no such file or folder")
    file = str(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise DataError(f"not valid UTF-8 (byte 0x{err.object[err.start]:02x}); save the file as UTF-8",
                        file=file, line=line) from None
    data = ChatData([], file)
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as err:
            raise DataError(f"not valid JSON ({err.msg}, column {err.colno})", file=file, line=number) from None
        messages = parse_record(record, file, number)
        if not any(m["role"] == "assistant" for m in messages):
            data.skip(NO_ANSWER, file, number, strict)
        elif messages[-1]["role"] != "assistant":
            data.skip(ENDS_ON_USER, file, number, strict)
        else:
            data.conversations.append(Conversation(messages, file, number))
    if not data.conversations and not data.skipped:
        raise DataError("no conversations in the file", file=file)
    return data


def parse_record(record: Any, file: str, line: int) -> list[dict[str, str]]:
    """The messages of one JSONL record in any of the layouts, checked; `DataError` otherwise."""

    def fail(message: str, where: str | None = None) -> DataError:
        return DataError(message, file=file, line=line, field=where)

    if not isinstance(record, dict):
        raise fail(f"expected a JSON object, got {type(record).__name__}")
    system = record.get("system")
    if system is not None and not isinstance(system, str):
        raise fail(f"must be a string, got {type(system).__name__}", "system")
    head = [{"role": "system", "content": system}] if system else []
    if "messages" in record:
        turns = _list_of(record["messages"], "messages", fail)
        messages = [_message(t, i, "role", "content", dict(zip(ROLES, ROLES)), "messages", fail)
                    for i, t in enumerate(turns)]
        if system and messages and messages[0]["role"] == "system":
            raise fail("a system prompt is given both as 'system' and as the first message", "system")
        messages = head + messages
    elif "conversations" in record:
        turns = _list_of(record["conversations"], "conversations", fail)
        speaker, text = ("role", "content") if turns and isinstance(turns[0], dict) and "role" in turns[0] \
            else ("from", "value")
        messages = head + [_message(t, i, speaker, text, SHAREGPT_ROLES, "conversations", fail)
                           for i, t in enumerate(turns)]
    elif "turns" in record:
        turns = _list_of(record["turns"], "turns", fail)
        messages = head + [{"role": ("user", "assistant")[i % 2], "content": _text(t, f"turns[{i}]", fail)}
                           for i, t in enumerate(turns)]
    elif "prompt" in record:
        answer_key = next((k for k in ("response", "completion") if k in record), None)
        if answer_key is None:
            raise fail("a prompt without a 'response' (or 'completion') field")
        messages = head + [{"role": "user", "content": _text(record["prompt"], "prompt", fail)},
                           {"role": "assistant", "content": _text(record[answer_key], answer_key, fail)}]
    else:
        keys = ", ".join(sorted(record)) or "none"
        raise fail(f"not a chat record (keys: {keys}); expected 'messages' (OpenAI), 'conversations' "
                   "(ShareGPT), 'turns', or 'prompt' with 'response'")
    return messages


def _list_of(value: Any, name: str, fail) -> list:
    if not isinstance(value, list) or not value:
        raise fail("must be a non-empty list of turns", name)
    return value


def _message(turn: Any, index: int, role_key: str, text_key: str, roles: dict[str, str], name: str,
             fail) -> dict[str, str]:
    where = f"{name}[{index}]"
    if not isinstance(turn, dict):
        raise fail(f"each turn must be an object with '{role_key}' and '{text_key}'", where)
    role = turn.get(role_key)
    if role not in roles:
        known = ", ".join(sorted(roles))
        raise fail(f"unknown role {role!r} (expected one of: {known})", f"{where}.{role_key}")
    return {"role": roles[role], "content": _text(turn.get(text_key), f"{where}.{text_key}", fail)}


def _text(value: Any, where: str, fail) -> str:
    if not isinstance(value, str):
        raise fail(f"must be a string, got {type(value).__name__}", where)
    if not value.strip():
        raise fail("empty turn", where)
    return value


def _pick_file(directory: Path) -> Path:
    if (directory / "train.jsonl").is_file():
        return directory / "train.jsonl"
    files = sorted(directory.glob("*.jsonl"))
    if len(files) == 1:
        return files[0]
    names = ", ".join(f.name for f in files) or "none"
    raise SlmError(f"{directory}: expected train.jsonl or exactly one .jsonl file (found: {names}); "
                   "name the file to use")


def split_conversations(data: ChatData, held_out: float | int, seed: int = 0) -> tuple[ChatData, ChatData]:
    """A seeded (train, held-out) split; `held_out` is a fraction in (0, 1) or a count."""
    count = round(len(data) * held_out) if isinstance(held_out, float) else held_out
    if not 0 < count < len(data):
        raise SlmError(f"cannot hold out {held_out} of {len(data)} conversations")
    order = list(range(len(data)))
    random.Random(seed).shuffle(order)
    pick = lambda idx: [data.conversations[i] for i in sorted(idx)]  # noqa: E731 - file order kept
    return (ChatData(pick(order[count:]), data.source, data.skipped, data.first_skipped),
            ChatData(pick(order[:count]), data.source + " (held out)"))


# ---- rendering ------------------------------------------------------------------------------------

def render(tokenizer: Any, messages: list[dict[str, str]], *, add_generation_prompt: bool,
           where: tuple[str, int] | None = None) -> str:
    """`messages` as text through the tokenizer's chat template; template errors name the record."""
    from jinja2 import TemplateError

    if not getattr(tokenizer, "chat_template", None):
        raise SlmError(f"the tokenizer of {getattr(tokenizer, 'name_or_path', 'this model')} has no chat "
                       "template; fine-tune a chat model, or set tokenizer.chat_template first")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except TemplateError as err:
        file, line = where or (None, None)
        raise DataError(f"the model's chat template refuses this conversation: {err}", file=file, line=line) from None


def tokenize_with_mask(tokenizer: Any, messages: list[dict[str, str]], where: tuple[str, int] | None = None,
                       open_end: bool = False) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and, per token, whether the loss covers it.

    Works for any template that renders a conversation prefix by prefix (every template we know):
    the text assistant turn i adds is what rendering turns 0..i adds to rendering turns 0..i-1 with
    the generation prompt, so it covers the answer and the end-of-turn marker (which the model must
    learn, to stop) but not the `<|im_start|>assistant` header given at inference. Character spans
    map to tokens through the tokenizer's offsets, so the ids are exactly those of tokenizing the
    whole text at once, as inference does. With `open_end`, the last answer's span stops where its
    text does (see `Conversation.open_end`).
    """
    full = render(tokenizer, messages, add_generation_prompt=False, where=where)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True, where=where)
        through = render(tokenizer, messages[: i + 1], add_generation_prompt=False, where=where)
        if not through.startswith(before) or not full.startswith(through):
            raise SlmError("this chat template renders earlier turns differently once later ones follow, so "
                           "assistant tokens cannot be located; fine-tune with a prefix-stable template")
        spans.append((len(before), len(through)))
    if open_end and spans:
        start, end = spans[-1]
        text = messages[-1]["content"].strip()
        found = full.rfind(text, start, end)
        spans[-1] = (start, found + len(text) if text and found >= 0 else end)
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    mask = [any(a < end and b > start for start, end in spans) for a, b in encoded["offset_mapping"]]
    return list(encoded["input_ids"]), mask


def encode_conversations(tokenizer: Any, data: ChatData, max_length: int, *, strict: bool = False) -> list[dict]:
    """One example per conversation: `input_ids`, and `labels` equal to them on assistant tokens and
    `IGNORE_INDEX` elsewhere. Conversations over `max_length` tokens are skipped and counted in `data`."""
    examples = []
    for conv in data.conversations:
        ids, mask = tokenize_with_mask(tokenizer, conv.messages, (conv.file, conv.line), conv.open_end)
        if len(ids) > max_length:
            data.skip(TOO_LONG, conv.file, conv.line, strict)
            continue
        examples.append({"input_ids": ids, "labels": [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]})
    if not examples:
        raise SlmError(f"{data.source}: no conversation fits in {max_length} tokens; raise --max-length")
    return examples


def pack_examples(examples: list[dict], max_length: int) -> list[dict]:
    """Conversations packed into rows of at most `max_length` tokens, first-fit by decreasing length.

    Why: chat turns are short (ChatterBot's average well under 100 tokens), so one conversation per
    row would spend most of a batch on padding. Each row carries `position_ids` that restart at 0 at
    every conversation: transformers then attends within each conversation only (a block-diagonal
    causal mask), so a packed row trains exactly as its conversations would one by one. A
    conversation is never split across rows.
    """
    rows: list[list[dict]] = []
    room: list[int] = []
    for example in sorted(examples, key=lambda e: -len(e["input_ids"])):
        n = len(example["input_ids"])
        slot = next((r for r, free in enumerate(room) if free >= n), None)
        if slot is None:
            rows.append([])
            room.append(max_length)
            slot = len(rows) - 1
        rows[slot].append(example)
        room[slot] -= n
    return [{"input_ids": [t for e in row for t in e["input_ids"]],
             "labels": [t for e in row for t in e["labels"]],
             "position_ids": [p for e in row for p in range(len(e["input_ids"]))]} for row in rows]


def prompts_of(data: ChatData) -> list[list[dict[str, str]]]:
    """Each conversation without its last answer, duplicates dropped (first kept, file order): the
    prompts a teacher answers when a student learns from its answers instead of the data's own."""
    seen: set[str] = set()
    prompts = []
    for conv in data.conversations:
        prompt = conv.messages[:-1]
        key = json.dumps(prompt, sort_keys=True)
        if key not in seen:
            seen.add(key)
            prompts.append(prompt)
    return prompts


def end_of_turn_ids(tokenizer: Any) -> set[int]:
    """The special token the chat template closes an assistant turn with (`<|im_end|>`, `<end_of_turn>`...),
    as a set of at most one id: a model may name only its end-of-text token as EOS, yet a chat turn
    ends at this one."""
    probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    text = render(tokenizer, probe, add_generation_prompt=False)
    ids = tokenizer(text[text.rindex("y") + 1:], add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return {ids[0]} if ids and ids[0] in special else set()
