"""bench/train_lm.py runs both loops on the real tiny Shakespeare text and ends with its JSON line
(--quick: a tiny model and three timed steps; the real figures come from running the script itself)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_ends_with_the_json_line(shared_datasets, tmp_path) -> None:
    cmd = [sys.executable, str(REPO / "bench" / "train_lm.py"), "--quick",
           "--data", str(shared_datasets / "tinyshakespeare" / "input.txt")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
                                 "SLM_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("ours_tok_s", "hf_trainer_tok_s", "ours_mfu", "matmul_peak_gflops", "speedup"):
        assert isinstance(figures[key], float) and figures[key] > 0, key
    assert figures["rounds"] == 1 and len(figures["round_speedups"]) == 1
