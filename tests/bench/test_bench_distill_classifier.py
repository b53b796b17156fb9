"""bench/distill_classifier.py runs unchanged on each real classification dataset (small settings and
a tiny stand-in teacher here; the real figures come from running the script itself): one teacher,
a student per seed, means and standard deviations over the seeds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("dataset", ["banking77", "sst2", "sms_spam"])
def test_bench_runs_on_dataset_and_ends_with_json(dataset, shared_datasets, tiny_encoder_dir, tmp_path):
    cmd = [sys.executable, str(REPO / "bench" / "distill_classifier.py"), "--data", str(shared_datasets / dataset),
           "--teacher", str(tiny_encoder_dir), "--out", str(tmp_path / "run"), "--max-train", "400",
           "--max-test", "100", "--teacher-epochs", "1", "--epochs", "1", "--intermediate-epochs", "0",
           "--layers", "1", "--hidden", "32", "--heads", "2", "--ffn", "64", "--max-length", "32", "--seeds", "0,1"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "TQDM_DISABLE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("teacher_accuracy", "student_accuracy", "baseline_accuracy", "retained", "teacher_params",
                "student_params", "teacher_latency_ms_p50", "student_latency_ms_p50", "speedup"):
        assert isinstance(figures[key], (int, float)), key
    assert figures["student_params"] < figures["teacher_params"]
    assert 0 <= figures["student_accuracy"] <= 1 and figures["speedup"] > 0
    assert figures["seeds"] == [0, 1] and len(figures["student_accuracy_by_seed"]) == 2
    by_seed = figures["student_accuracy_by_seed"]
    assert figures["student_accuracy"] == pytest.approx(sum(by_seed) / 2)
    assert figures["student_accuracy_std"] == pytest.approx(abs(by_seed[0] - by_seed[1]) / 2 ** 0.5)
    if dataset == "sst2":
        assert figures["selection_split"].startswith("the data's own split 'validation'")
    else:
        assert figures["selection_split"].endswith("of the 400 training examples (stratified, seed 0)")
    margin = figures["student_beats_baseline"]
    assert margin["margin"] == pytest.approx(figures[f"student_{margin['metric']}"]
                                             - figures[f"baseline_{margin['metric']}"])
    assert len(margin["ci95_by_seed"]) == 2 and margin["beyond_std"] == (margin["margin"] > margin["student_std"])
    assert (tmp_path / "run" / "report.html").exists() and (tmp_path / "run" / "student-seed1").is_dir()
