"""bench/train_parts.py times each training piece against what it replaced and ends with its JSON line
(--quick: a tiny model and a tiny stand-in for SmolLM2; the real figures come from running the script)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tiny_llama import write_tiny_llama

REPO = Path(__file__).resolve().parents[2]


def test_bench_ends_with_the_json_line(shared_datasets, tmp_path) -> None:
    cmd = [sys.executable, str(REPO / "bench" / "train_parts.py"), "--quick", "--threads", "1",
           "--data", str(shared_datasets / "tinyshakespeare" / "input.txt"),
           "--large-model", str(write_tiny_llama(tmp_path / "large"))]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
                                 "SLM_CACHE_DIR": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr[-3000:]
    parts = json.loads(result.stdout.strip().splitlines()[-1])["parts"]
    assert set(parts) == {"loss", "attention", "optimizer", "vocabulary"}
    for name, row in parts.items():
        assert row["ours_ms"] > 0 and row["theirs_ms"] > 0 and row["speedup"] > 0, name
