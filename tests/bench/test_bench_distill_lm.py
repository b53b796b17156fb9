"""bench/distill_lm.py runs its three models (SmolLM2 teacher, scratch student, distilled student) on the
real tiny Shakespeare text and ends with the JSON line the issue asks for (--quick: a slice of the text,
a few steps; the real figures come from running the script itself)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_ends_with_the_json_line(shared_datasets, tmp_path) -> None:
    cmd = [sys.executable, str(REPO / "bench" / "distill_lm.py"), "--quick", "--out", str(tmp_path / "run"),
           "--data", str(shared_datasets / "tinyshakespeare" / "input.txt")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("teacher_ppl", "scratch_ppl", "distilled_ppl", "teacher_params", "student_params", "train_tokens"):
        assert figures[key] > 0, key
    assert figures["student_params"] <= figures["teacher_params"] / 2
    assert figures["scratch_train_tokens"] == figures["train_tokens"]
    assert figures["distilled_ppl"] < figures["scratch_ppl"]  # even a few steps of the teacher's logits help
    assert all(seconds > 0 for seconds in figures["timings_s"].values())
    assert (tmp_path / "run" / "report.html").is_file()
