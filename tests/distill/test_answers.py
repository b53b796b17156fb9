"""The teacher's answers: generated with the engine (or transformers for other architectures), cached
as JSONL, reused, resumed after a kill, and started afresh when the teacher or a setting changes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_llama import write_tiny_llama

from smallmighty.distill import answers as answers_module
from smallmighty.distill.answers import Answer, TeacherSettings, answers_as_chat, teacher_answers
from smallmighty.errors import SlmError

PROMPTS = [[{"role": "user", "content": "What is the capital of France?"}],
           [{"role": "user", "content": "Hello there!"}],
           [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "A small model answers?"}]]
SETTINGS = TeacherSettings(precision="fp32", max_new_tokens=6, batch_size=2)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("teacher") / "tiny")


class Counting:
    """Wraps the engine generator to count the prompts it is asked to answer."""

    def __init__(self, monkeypatch) -> None:
        self.asked: list[list[dict]] = []
        real = answers_module._engine_generator

        def generator(model_dir, prompts, settings):
            self.asked += prompts
            yield from real(model_dir, prompts, settings)

        monkeypatch.setattr(answers_module, "_engine_generator", generator)


def test_answers_match_the_engine_and_are_cached_with_their_settings(teacher, tmp_path, monkeypatch) -> None:
    from smallmighty.engine.generate import Engine
    from smallmighty.engine.sampling import GenerationSettings

    counting = Counting(monkeypatch)
    cache = tmp_path / "answers.jsonl"
    got = teacher_answers(str(teacher), PROMPTS, cache, SETTINGS)
    engine = Engine.from_pretrained(teacher)
    for prompt, answer in zip(PROMPTS, got):
        ids = engine.generate([engine.encode(engine.apply_chat_template(prompt))], GenerationSettings(max_new_tokens=6))[0]
        assert answer.messages == prompt and answer.answer == engine.decode(ids)
        assert answer.finished == (ids[-1] in engine.eos_token_ids)
    lines = cache.read_text().splitlines()
    header = json.loads(lines[0])
    assert header["backend"] == "engine" and header["settings"]["max_new_tokens"] == 6 and len(header["fingerprint"]) == 16
    assert sorted(json.dumps(json.loads(line)["messages"]) for line in lines[1:]) == sorted(map(json.dumps, PROMPTS))
    assert len(counting.asked) == 3


def test_the_cache_is_reused_and_only_new_prompts_are_answered(teacher, tmp_path, monkeypatch) -> None:
    cache = tmp_path / "answers.jsonl"
    first = teacher_answers(str(teacher), PROMPTS[:2], cache, SETTINGS)
    counting = Counting(monkeypatch)
    again = teacher_answers(str(teacher), PROMPTS, cache, SETTINGS)
    assert counting.asked == [PROMPTS[2]] and again[:2] == first
    assert teacher_answers(str(teacher), PROMPTS[::-1], cache, SETTINGS) == again[::-1]
    assert len(counting.asked) == 1  # nothing new the third time


def test_a_line_cut_short_by_a_kill_is_answered_again(teacher, tmp_path, monkeypatch) -> None:
    cache = tmp_path / "answers.jsonl"
    whole = teacher_answers(str(teacher), PROMPTS, cache, SETTINGS)
    text = cache.read_text()
    cache.write_text(text[: text.rindex("\n", 0, len(text) - 1) + 12])  # the last line half written
    counting = Counting(monkeypatch)
    assert teacher_answers(str(teacher), PROMPTS, cache, SETTINGS) == whole
    assert len(counting.asked) == 1


@pytest.mark.parametrize("change", ["settings", "system prompt", "teacher"])
def test_another_teacher_or_setting_starts_afresh(teacher, tmp_path, monkeypatch, capsys, change) -> None:
    cache = tmp_path / "answers.jsonl"
    teacher_answers(str(teacher), PROMPTS, cache, SETTINGS)
    other_teacher, settings = teacher, SETTINGS
    if change == "settings":
        settings = TeacherSettings(precision="fp32", max_new_tokens=5, batch_size=2)
    elif change == "system prompt":
        settings = TeacherSettings(precision="fp32", max_new_tokens=6, batch_size=2, system_prompt="Think step by step.")
    else:
        other_teacher = write_tiny_llama(tmp_path / "other", seed=1)
    counting = Counting(monkeypatch)
    teacher_answers(str(other_teacher), PROMPTS, cache, settings)
    assert len(counting.asked) == 3
    expected = {"settings": "settings", "system prompt": "settings", "teacher": "teacher and fingerprint"}[change]
    assert f"the teacher's {expected} changed; generating afresh" in capsys.readouterr().err
    assert len(cache.read_text().splitlines()) == 4  # the old answers are gone


def test_prompt_erasure_the_teacher_sees_the_system_prompt_the_student_data_does_not(teacher, tmp_path,
                                                                                       monkeypatch) -> None:
    from smallmighty.engine.generate import Engine

    seen: list[list[dict]] = []
    real = Engine.apply_chat_template
    monkeypatch.setattr(Engine, "apply_chat_template", lambda self, m, **kw: seen.append(m) or real(self, m, **kw))
    settings = TeacherSettings(precision="fp32", max_new_tokens=4, system_prompt="Answer step by step.")
    got = teacher_answers(str(teacher), PROMPTS, tmp_path / "a.jsonl", settings)
    # The teacher's prompts carry the system prompt, before the conversation's own...
    assert [m[0]["content"] for m in sorted(seen, key=lambda m: m[1]["content"])] == [
        "Answer step by step.\n\nBe brief.", "Answer step by step.", "Answer step by step."]
    assert all(m[0]["role"] == "system" and len(m) == 2 for m in seen)
    # ...the student's conversations are the prompts as given, then the answer.
    chat = answers_as_chat(got, "a.jsonl")
    assert [c.messages[:-1] for c in chat.conversations] == PROMPTS
    assert all("step by step" not in json.dumps(c.messages) for c in chat.conversations)


def test_cut_off_answers_keep_their_text_but_not_the_end_marker(tmp_path) -> None:
    from transformers import AutoTokenizer

    from smallmighty.data.chat import tokenize_with_mask

    answers = [Answer(PROMPTS[0], "Paris.", True), Answer(PROMPTS[1], "Hello, how can I", False),
               Answer(PROMPTS[1], "  ", True)]
    chat = answers_as_chat(answers, "a.jsonl")
    assert [c.open_end for c in chat.conversations] == [False, True]
    assert chat.skip_report().startswith("skipped 1 conversation with an empty teacher answer")
    tokenizer = AutoTokenizer.from_pretrained(write_tiny_llama(tmp_path / "tok"))
    learned = []
    for conv in chat.conversations:
        ids, mask = tokenize_with_mask(tokenizer, conv.messages, open_end=conv.open_end)
        learned.append(tokenizer.decode([t for t, m in zip(ids, mask) if m]))
    assert learned == ["Paris.<|im_end|>\n", "Hello, how can I"]


def test_prompts_must_end_on_a_user_turn(teacher, tmp_path) -> None:
    with pytest.raises(SlmError, match="prompt 1 must end with a user turn"):
        teacher_answers(str(teacher), [PROMPTS[0], [{"role": "assistant", "content": "Hi"}]], tmp_path / "a.jsonl",
                        SETTINGS)


def test_an_architecture_the_engine_does_not_run_answers_through_transformers(teacher, tmp_path, capsys) -> None:
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(teacher)
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=128,
                                      eos_token_id=2, bos_token_id=1)).eval()
    folder = tmp_path / "gpt2"
    gpt2.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    got = teacher_answers(str(folder), PROMPTS[:2], tmp_path / "a.jsonl", SETTINGS)
    header = json.loads((tmp_path / "a.jsonl").read_text().splitlines()[0])
    assert header["backend"] == "transformers" and header["settings"]["precision"] == "fp32"  # what ran
    assert "answers through transformers" in capsys.readouterr().err
    text = tokenizer.apply_chat_template(PROMPTS[0], tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        new = gpt2.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=2)[0, ids.shape[1]:].tolist()
    ends = [p for p, t in enumerate(new) if t == 2]
    assert got[0].answer == tokenizer.decode(new[: ends[0]] if ends else new, skip_special_tokens=True)
