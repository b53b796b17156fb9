"""bench/chat_student.py runs unchanged on the real ChatterBot prompts (tiny stand-in models and --quick
here; the real figures come from running the script itself)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tiny_llama import write_tiny_llama

REPO = Path(__file__).resolve().parents[2]


def test_bench_ends_with_the_json_line(shared_datasets, tmp_path) -> None:
    teacher, student = write_tiny_llama(tmp_path / "teacher", seed=0), write_tiny_llama(tmp_path / "student", seed=1)
    cmd = [sys.executable, str(REPO / "bench" / "chat_student.py"), "--quick", "--teacher", str(teacher),
           "--student", str(student), "--data", str(shared_datasets / "chatterbot_corpus_en" / "pairs.jsonl"),
           "--out", str(tmp_path / "run"), "--max-length", "256", "--warm-up-data",
           str(shared_datasets / "chatterbot_corpus_en" / "conversations.jsonl")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "TQDM_DISABLE": "1",
                                 "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("rouge_l_before", "rouge_l_after", "answer_ppl_before", "answer_ppl_after", "teacher_params",
                "student_params", "tune_seconds", "rouge_l_after_full", "answer_ppl_after_full", "tune_seconds_full"):
        assert isinstance(figures[key], (int, float)), key
    assert (figures["train_prompts"], figures["val_prompts"], figures["test_prompts"]) == (32, 8, 16)
    assert figures["student_params"] > 0 and figures["warm_up_seconds"] > 0
    for row in ("lora", "full"):
        assert (tmp_path / "run" / row / "report.html").is_file()
