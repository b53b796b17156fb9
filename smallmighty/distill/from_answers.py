"""Learning from a teacher's answers (Orca 2 style), start to finish: what `slm distill --method
answers` runs.

1. the teacher answers the training and held-out prompts (`distill.answers`, cached beside the run);
2. the student, before tuning, answers the held-out prompts and is scored on the teacher's answers;
3. the student is tuned on the training prompts and the teacher's answers (`train.chat`, full or LoRA,
   merged on save into `out/student`);
4. the tuned student is scored the same way, and the report shows the answers side by side.

No vocabulary is shared: answers travel as text, so any teacher we load teaches any student.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from smallmighty.data.chat import encode_conversations
from smallmighty.distill.answers import Answer, TeacherSettings, answers_as_chat, teacher_answers
from smallmighty.evaluate.answers import answers_card, write_answers_report
from smallmighty.models.causal_lm import count_parameters_on_disk, load_hf_causal_lm, resolve_causal_lm
from smallmighty.models.lora import LoraSettings
from smallmighty.train.chat import answer_perplexity, finetune_chat
from smallmighty.train.loop import TrainConfig, is_main_process

Prompt = list[dict[str, str]]


def score_student(model: str | Path | None, prompts: list[Prompt], references: list[Answer], cache_path: Path,
                  settings: TeacherSettings, max_length: int) -> dict[str, Any]:
    """The model's greedy answers to `prompts` (cached like the teacher's), how many of them end (with
    an end-of-turn token, not the token limit) and its perplexity on the reference answers' tokens."""
    directory = resolve_causal_lm(model)
    answers = teacher_answers(str(directory), prompts, cache_path, settings)
    hf_model, tokenizer = load_hf_causal_lm(directory)
    held = encode_conversations(tokenizer, answers_as_chat(references, "held-out teacher answers"), max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return {"answers": [a.answer for a in answers], "ended": sum(a.finished for a in answers),
            "answer_ppl": answer_perplexity(hf_model, held, pad),
            "params": count_parameters_on_disk(directory)}


def learn_from_answers(teacher: str | None, student: str | None, train_prompts: list[Prompt],
                       test_prompts: list[Prompt], out_dir: str | Path, *, teacher_settings: TeacherSettings,
                       config: TrainConfig, lora: LoraSettings | None = None, max_length: int = 512,
                       validation_prompts: list[Prompt] | None = None, resume: bool = False,
                       student_settings: TeacherSettings | None = None, title: str | None = None,
                       answers_dir: str | Path | None = None) -> dict:
    """Run steps 1-4 (module docstring) in `out_dir`; returns the report card (also written there).

    The answer caches (teacher's, untuned student's) live in `answers_dir`, by default `out_dir`;
    runs that tune the same student differently share them by naming one folder.
    """
    from smallmighty.evaluate.speed import hardware_info

    out_dir = Path(out_dir)
    answers_dir = Path(answers_dir or out_dir)
    for folder in (out_dir, answers_dir):
        folder.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    validation_prompts = validation_prompts or []
    everything = train_prompts + validation_prompts + test_prompts
    answers = teacher_answers(teacher, everything, answers_dir / "teacher_answers.jsonl", teacher_settings)
    timings["teacher_answers_s"] = time.perf_counter() - start
    n_train, n_val = len(train_prompts), len(validation_prompts)
    train_answers, val_answers = answers[:n_train], answers[n_train:n_train + n_val]
    test_answers = answers[n_train + n_val:]
    # The student answers greedily, without the teacher's system prompt (prompt erasure).
    student_settings = student_settings or TeacherSettings(
        precision=teacher_settings.precision, max_new_tokens=teacher_settings.max_new_tokens,
        batch_size=teacher_settings.batch_size)
    start = time.perf_counter()
    before = score_student(student, test_prompts, test_answers, answers_dir / "student_before_answers.jsonl",
                           student_settings, max_length)
    timings["score_before_s"] = time.perf_counter() - start
    start = time.perf_counter()
    tuned = finetune_chat(student, answers_as_chat(train_answers, str(answers_dir / "teacher_answers.jsonl")),
                          out_dir / "student", config=config, lora=lora, max_length=max_length,
                          validation=answers_as_chat(val_answers, "validation answers") if val_answers else None,
                          resume=resume, meta={"teacher": str(teacher), "teacher_settings": asdict(teacher_settings)})
    timings["tune_s"] = time.perf_counter() - start
    start = time.perf_counter()
    after = score_student(tuned, test_prompts, test_answers, out_dir / "student_answers.jsonl", student_settings,
                          max_length)
    timings["score_after_s"] = time.perf_counter() - start
    method = "LoRA" if lora else "full"
    card = answers_card(
        title=title or "Learning from a teacher's answers",
        prompts=[p[-1]["content"] for p in test_prompts],
        teacher={"name": str(teacher or "SmolLM2-135M-Instruct"), "params": count_parameters_on_disk(
            resolve_causal_lm(teacher)), "answers": [a.answer for a in test_answers],
            "ended": sum(a.finished for a in test_answers)},
        students=[{"name": "student before", **before},
                  {"name": f"student after ({method})", **after}],
        training={"train_prompts": n_train, "validation_prompts": n_val, "teacher_settings": asdict(teacher_settings),
                  "student_settings": asdict(student_settings), "train": asdict(config),
                  "lora": lora.as_dict() if lora else None, "max_length": max_length, "timings_s": timings},
        hardware=hardware_info())
    if is_main_process():
        write_answers_report(out_dir, card)
    return card
