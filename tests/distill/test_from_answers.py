"""`slm distill --method answers` end to end on tiny Llamas: the teacher answers, the student is
tuned on the answers and scored before and after, and the report holds the answers side by side."""

from __future__ import annotations

import json

from tiny_llama import write_tiny_llama

from smallmighty.cli import main


def test_distill_from_answers_writes_student_cache_and_report(tmp_path, capsys) -> None:
    teacher = write_tiny_llama(tmp_path / "teacher", seed=0)
    student = write_tiny_llama(tmp_path / "student", seed=1)
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Question {i}: what is the capital of France?",
                                        "response": "(ignored)"}) + "\n" for i in range(20)))
    out = tmp_path / "run"
    argv = ["distill", "--method", "answers", "--teacher", str(teacher), "--student", str(student), "--data", str(data),
            "--max-new-tokens", "8", "--teacher-precision", "fp32", "--epochs", "2", "--lora", "--lr", "0.01",
            "--test-fraction", "0.25", "--teacher-system", "Think step by step.", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "prompts: 15 train / 0 validation / 5 held out" in printed and "student after (LoRA): ROUGE-L" in printed
    report = json.loads((out / "report.json").read_text())
    assert [m["role"] for m in report["models"]] == ["teacher", "student", "student"]
    assert report["training"]["teacher_settings"]["system_prompt"] == "Think step by step."
    assert len(report["answers"]) == 5 and set(report["answers"][0]) == {
        "prompt", "teacher", "student before", "student after (LoRA)"}
    # Each row counts its held-out answers that end with an end-of-turn token (the caches' flags).
    student_lines = [json.loads(line) for line in (out / "student_answers.jsonl").read_text().splitlines()[1:]]
    assert len(student_lines) == 5
    assert report["models"][2]["ended"] == sum(line["finished"] for line in student_lines)
    teacher_lines = [json.loads(line) for line in (out / "teacher_answers.jsonl").read_text().splitlines()[1:]]
    held_out = {json.dumps(line["messages"]) for line in student_lines}
    assert report["models"][0]["ended"] == sum(line["finished"] for line in teacher_lines
                                               if json.dumps(line["messages"]) in held_out)
    header = json.loads((out / "teacher_answers.jsonl").read_text().splitlines()[0])
    assert header["backend"] == "engine" and header["settings"]["max_new_tokens"] == 8
    meta = json.loads((out / "student" / "smallmighty.json").read_text())
    assert meta["method"] == "lora" and meta["teacher"] == str(teacher)
    assert "student after (LoRA)" in (out / "report.html").read_text()
    # A second run reuses every cached answer of the teacher and of the untuned student.
    assert main(argv) == 0
    assert "answers 20 prompts" not in capsys.readouterr().err
