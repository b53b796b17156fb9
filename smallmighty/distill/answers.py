"""A teacher's answers to prompts, generated once and kept as JSONL beside the run (Orca 2 style).

Learning from a teacher's answers needs no shared vocabulary: the answers are text, so any causal LM
we can load teaches any student. The teacher answers with our engine (batched, int8 by default);
a model the engine cannot run (another architecture, such as Gemma 3) answers through transformers,
batched too, and the backend is recorded.

Prompt erasure (Orca 2): `system_prompt` is shown to the teacher only, for example one that asks
for careful step-by-step answers. The student's training conversations leave it out, so the student
learns to answer that way without being told to.

The cache: the first line records the teacher (its path and a fingerprint of its files' bytes), the
backend and every generation setting; each further line holds one prompt and its answer. A later
run with the same teacher and settings reuses the answers it finds and generates only the missing
ones (a killed run resumes where it stopped: answers are appended batch by batch); a different
teacher or setting starts the file afresh.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from tqdm.auto import tqdm

from smallmighty.cache import content_fingerprint
from smallmighty.data.chat import ChatData, Conversation, end_of_turn_ids
from smallmighty.errors import DataError, SlmError
from smallmighty.io import atomic_path
from smallmighty.train.loop import is_main_process, wait_for_everyone

#: A system prompt in the spirit of Orca 2's "cautious reasoning" instructions.
CAREFUL_SYSTEM_PROMPT = ("You are a careful assistant. Think the question through step by step, then give a "
                         "clear, correct and complete answer.")
T = TypeVar("T")
_MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@dataclass
class TeacherSettings:
    """How the teacher answers; all of it is recorded in the cache and invalidates it when changed."""

    precision: str = "int8"
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0
    batch_size: int = 16
    system_prompt: str | None = None
    #: A jinja chat template to use instead of the teacher's own (a base model may ship none).
    chat_template: str | None = None


@dataclass
class Answer:
    """One prompt (the conversation before the answer, as the student sees it), the teacher's answer,
    and whether the teacher finished it (ended with its end-of-turn token, not the token limit)."""

    messages: list[dict[str, str]]
    answer: str
    finished: bool


def teacher_fingerprint(model_dir: Path) -> str:
    """A key for the teacher's bytes: weights, config, tokenizer and chat template."""
    files = sorted(model_dir.glob("*.safetensors")) + [model_dir / n for n in _MODEL_FILES if (model_dir / n).is_file()]
    return content_fingerprint(files)


def teacher_answers(teacher: str | None, prompts: list[list[dict[str, str]]], cache_path: str | Path,
                    settings: TeacherSettings) -> list[Answer]:
    """The teacher's answer to each prompt (a conversation ending on a user turn), in prompt order,
    from the cache at `cache_path` where it holds them (see the module docstring)."""
    from smallmighty.models.causal_lm import resolve_causal_lm

    if not prompts:
        raise SlmError("no prompts for the teacher to answer")
    for i, messages in enumerate(prompts):
        if not messages or messages[-1].get("role") != "user":
            raise SlmError(f"prompt {i} must end with a user turn for the teacher to answer it")
    model_dir = resolve_causal_lm(teacher)
    backend = _backend(model_dir)
    if backend != "engine":  # transformers runs the teacher in fp32: the cache records what ran
        settings = replace(settings, precision="fp32")
    header = {"teacher": str(teacher or model_dir), "fingerprint": teacher_fingerprint(model_dir),
              "backend": backend, "settings": asdict(settings)}
    cache_path = Path(cache_path)
    # Under torchrun the first process answers and writes the cache; the others then read it.
    if is_main_process():
        known = _read_cache(cache_path, header)
        missing = [m for m in prompts if _key(m) not in known]
        if missing:
            print(f"{header['teacher']} answers {len(missing)} prompts ({header['backend']}, "
                  f"{settings.precision}, batches of "
                  f"{settings.batch_size}); {len(prompts) - len(missing)} come from {cache_path}", file=sys.stderr)
            generate = _engine_generator if header["backend"] == "engine" else _transformers_generator
            with open(cache_path, "a", encoding="utf-8") as out:
                for answer in generate(model_dir, missing, settings):
                    known[_key(answer.messages)] = answer
                    out.write(json.dumps(asdict(answer), ensure_ascii=False) + "\n")
                    out.flush()
    wait_for_everyone()
    if not is_main_process():
        known = _read_cache(cache_path, header)
    return [known[_key(m)] for m in prompts]


def answers_as_chat(answers: list[Answer], source: str) -> ChatData:
    """The student's conversations: each prompt followed by the teacher's answer (without the
    teacher's system prompt). An answer the token limit cut off is kept with `open_end`, so its text
    is learned but not the end-of-turn marker; empty answers are skipped and counted."""
    data = ChatData([], source)
    for line, a in enumerate(answers, start=2):
        if not a.answer.strip():
            data.skip("with an empty teacher answer", source, line, strict=False)
        else:
            data.conversations.append(Conversation(a.messages + [{"role": "assistant", "content": a.answer.strip()}],
                                                   source, line, open_end=not a.finished))
    if not data.conversations:
        raise SlmError(f"{source}: the teacher gave no usable answer ({data.skip_report()}); raise the token limit")
    return data


def _key(messages: list[dict[str, str]]) -> str:
    return json.dumps(messages, sort_keys=True, ensure_ascii=False)


def _read_cache(path: Path, header: dict) -> dict[str, Answer]:
    """The cached answers when the file was made by this teacher with these settings, else none."""
    return {_key(a.messages): a for a in read_jsonl_cache(path, header, lambda record: Answer(**record))}


def read_jsonl_cache(path: Path, header: dict, make: Callable[[dict], T]) -> list[T]:
    """The records of a JSONL cache (`make` applied to each) when its first line equals `header`;
    otherwise start a new file holding only `header` (saying why) and return none.

    A last line cut short by a kill is dropped (it is generated again); any other broken line is an
    error naming the file and line. Shared by the teacher's answers and sequence-level KD's
    continuations (`distill.causal_lm`).
    """
    if path.is_file():
        lines = path.read_text(encoding="utf-8").splitlines()
        try:
            old = json.loads(lines[0]) if lines else {}
        except json.JSONDecodeError:
            old = {}
        if old == header:
            records: list[T] = []
            for number, raw in enumerate(lines[1:], start=2):
                try:
                    records.append(make(json.loads(raw)))
                except (json.JSONDecodeError, TypeError, KeyError) as err:
                    if number == len(lines):  # a line cut short by a kill: generated again
                        break
                    raise DataError(f"broken cache entry ({err}); delete the file to start afresh",
                                    file=str(path), line=number) from None
            return records
        changed = [k for k in header if old.get(k) != header[k]]
        print(f"{path}: the teacher's {' and '.join(changed) or 'header'} changed; generating afresh", file=sys.stderr)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(header, ensure_ascii=False) + "\n", encoding="utf-8")
    return []


def generate_in_batches(engine, ids: list[list[int]], generation, batch_size: int,
                        desc: str) -> Iterator[tuple[int, list[int]]]:
    """(index, new token ids) for each prompt, generated by `engine` in batches of prompts of similar
    length (less padding); batches come in order of length. When sampling with a seed, batch n samples
    with seed + n, so batches do not repeat one another's random draws."""
    batches = _batches(ids, [len(i) for i in ids], batch_size)
    for number, batch in enumerate(tqdm(batches, desc=desc, unit="batch", leave=False)):
        settings = generation if generation.seed is None else replace(generation, seed=generation.seed + number)
        for i, out in zip(batch, engine.generate([ids[i] for i in batch], settings)):
            yield i, out


def _backend(model_dir: Path) -> str:
    """'engine' for the architectures our engine runs, 'transformers' for the rest."""
    from smallmighty.engine.model import SUPPORTED_MODEL_TYPES
    from smallmighty.io import read_json

    config = read_json(model_dir / "config.json", default={})
    return "engine" if config.get("model_type") in SUPPORTED_MODEL_TYPES else "transformers"


def _with_system(messages: list[dict[str, str]], system: str | None) -> list[dict[str, str]]:
    """The teacher's view of a prompt: its system prompt first, before the conversation's own."""
    if not system:
        return messages
    if messages[0]["role"] == "system":
        return [{"role": "system", "content": f"{system}\n\n{messages[0]['content']}"}] + messages[1:]
    return [{"role": "system", "content": system}] + messages


def _batches(items: list, lengths: list[int], size: int) -> list[list[int]]:
    """Indices in batches of similar prompt length (less padding), each batch in order."""
    order = sorted(range(len(items)), key=lambda i: lengths[i])
    return [order[i:i + size] for i in range(0, len(order), size)]


def _engine_generator(model_dir: Path, prompts: list[list[dict[str, str]]], settings: TeacherSettings):
    from smallmighty.engine.generate import Engine
    from smallmighty.engine.sampling import GenerationSettings

    engine = Engine.from_pretrained(model_dir, precision=settings.precision)
    if settings.chat_template:
        engine.chat_template = settings.chat_template
    generation = GenerationSettings(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                                    top_p=settings.top_p, repetition_penalty=settings.repetition_penalty,
                                    seed=settings.seed)
    ids = [engine.encode(engine.apply_chat_template(_with_system(m, settings.system_prompt))) for m in prompts]
    for i, out in generate_in_batches(engine, ids, generation, settings.batch_size, "teacher answers"):
        finished = bool(out) and out[-1] in engine.eos_token_ids
        yield Answer(prompts[i], engine.decode(out), finished)


def _transformers_generator(model_dir: Path, prompts: list[list[dict[str, str]]], settings: TeacherSettings):
    """The same through transformers' `generate` (fp32; left-padded batches) for models our engine does
    not run."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"our engine does not run this architecture; the teacher answers through transformers (fp32)",
          file=sys.stderr)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.chat_template = settings.chat_template or tokenizer.chat_template
    if not tokenizer.chat_template:
        raise SlmError(f"the teacher {model_dir} has no chat template to put the prompts in; give one "
                       "(a jinja file, e.g. recipes/chat_templates/gemma.jinja)")
    texts = [tokenizer.apply_chat_template(_with_system(m, settings.system_prompt), tokenize=False,
                                           add_generation_prompt=True) for m in prompts]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    configured = model.generation_config.eos_token_id
    eos = set(configured if isinstance(configured, list) else [configured]) | {tokenizer.eos_token_id}
    eos = (eos | end_of_turn_ids(tokenizer)) - {None}
    torch.manual_seed(settings.seed)
    for batch in tqdm(_batches(prompts, [len(i) for i in ids], settings.batch_size), desc="teacher answers",
                      unit="batch", leave=False):
        enc = tokenizer([texts[i] for i in batch], add_special_tokens=False, padding=True, return_tensors="pt")
        sampling = {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p} \
            if settings.temperature > 0 else {"do_sample": False}
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=settings.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=sorted(eos), repetition_penalty=settings.repetition_penalty, **sampling)
        for row, i in enumerate(batch):
            new = out[row, enc["input_ids"].shape[1]:].tolist()
            ends = [p for p, t in enumerate(new) if t in eos]
            finished = bool(ends)
            yield Answer(prompts[i], tokenizer.decode(new[: ends[0]] if ends else new, skip_special_tokens=True),
                         finished)
