"""Speed measurement: latency percentiles, throughput, and the fresh-process profiler."""

from __future__ import annotations

import importlib.util
import os
import textwrap
import time
from pathlib import Path

import pytest

from smallmighty.errors import SlmError
from smallmighty.evaluate import speed


def test_latency_of_a_sleep_lands_in_a_sane_band() -> None:
    calls: list[int] = []

    def fn(x: int) -> None:
        calls.append(x)
        time.sleep(0.005)

    result = speed.latency_ms(fn, list(range(40)), warmup=3, max_items=25)
    assert len(calls) == 3 + 25  # warm-up calls, then only max_items timed calls
    assert calls[3:] == list(range(25))
    assert 5.0 <= result["p50"] < 50.0  # a sleep never returns early; the shared machine may add lag
    assert result["p95"] >= result["p50"]
    assert result["mean"] >= 5.0


def test_latency_percentiles_follow_the_slow_calls() -> None:
    # 10 fast calls and 10 slow ones: p50 sits between them, p95 among the slow ones.
    result = speed.latency_ms(lambda x: time.sleep(x), [0.0] * 10 + [0.03] * 10, warmup=0)
    assert result["p95"] >= 30.0
    assert result["p95"] > result["p50"]


def test_throughput_counts_items_per_second_through_batches() -> None:
    batches: list[int] = []

    def fn_batch(items: list) -> None:
        batches.append(len(items))
        time.sleep(0.01)

    value = speed.throughput_per_s(fn_batch, list(range(70)), batch_size=16)
    assert batches == [16, 16, 16, 16, 16, 6]  # one untimed warm-up batch, then 70 items in 5 batches
    assert 70 / 0.25 < value <= 70 / 0.05  # 5 sleeps of 10 ms take at least 50 ms


def test_empty_inputs_are_a_user_error() -> None:
    with pytest.raises(SlmError):
        speed.latency_ms(print, [])
    with pytest.raises(SlmError):
        speed.throughput_per_s(print, [])
    with pytest.raises(SlmError, match="batch size"):
        speed.throughput_per_s(print, [1], batch_size=0)


FAKE_LOADER = textwrap.dedent('''
    """A stand-in classifier for the profiler tests: it sleeps, holds memory and records its threads."""
    from pathlib import Path

    import numpy as np

    from smallmighty.errors import SlmError


    class Sleepy:
        def __init__(self, model_dir):
            self.dir = Path(model_dir)
            self.ballast = np.ones(150 * 2**20, dtype=np.uint8)  # 150 MiB, every page touched

        def predict_logits(self, texts):
            import time, torch
            (self.dir / "threads.txt").write_text(str(torch.get_num_threads()))
            time.sleep(0.002)
            return np.zeros((len(texts), 3), dtype=np.float32)


    def load(model_dir, runtime):
        if runtime == "bad":
            raise SlmError(f"unknown runtime {runtime!r}")
        if runtime == "crash":
            raise ZeroDivisionError("bug")
        if runtime == "killed":  # as the kernel's out-of-memory killer would
            import os, signal
            os.kill(os.getpid(), signal.SIGKILL)
        import torch  # loaded like a torch classifier would, so the child pins its threads
        return Sleepy(model_dir)
''')


@pytest.fixture
def fake_loader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "fake_clf.py").write_text(FAKE_LOADER)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p))
    return "fake_clf:load"


def test_profile_runs_in_a_fresh_process(tmp_path: Path, fake_loader: str) -> None:
    model = tmp_path / "model"
    model.mkdir()
    result = speed.profile_classifier(str(model), "torch", ["a", "b", "c"] * 10, batch_size=8,
                                      max_latency_items=20, threads=1, loader=fake_loader)
    assert set(result) == {"latency_ms_p50", "latency_ms_p95", "throughput_per_s", "peak_rss_mb", "load_s",
                           "cpu_s_per_1k", "rapl_j_per_1k"}
    # 2 ms of sleep per request is wall time, not CPU time: the cost counts only the little CPU used.
    assert 0 < result["cpu_s_per_1k"] < 1.5
    assert 2.0 <= result["latency_ms_p50"] <= result["latency_ms_p95"]
    assert 0 < result["throughput_per_s"] <= 8 / 0.002
    assert result["peak_rss_mb"] > 150  # the child's own ballast shows up in its peak
    assert result["load_s"] > 0
    assert (model / "threads.txt").read_text() == "1"  # torch pinned to the requested thread count


def test_profile_reports_loader_errors(tmp_path: Path, fake_loader: str) -> None:
    with pytest.raises(SlmError, match="unknown runtime 'bad'"):
        speed.profile_classifier(str(tmp_path), "bad", ["a"], loader=fake_loader)
    with pytest.raises(SlmError, match="exited with status 1: ZeroDivisionError: bug$"):
        speed.profile_classifier(str(tmp_path), "crash", ["a"], loader=fake_loader)
    with pytest.raises(SlmError, match="was killed by SIGKILL"):
        speed.profile_classifier(str(tmp_path), "killed", ["a"], loader=fake_loader)
    with pytest.raises(SlmError, match="not found"):
        speed.profile_classifier(str(tmp_path / "missing"), "torch", ["a"], loader=fake_loader)


def test_slm_eval_reports_a_profiling_child_that_dies_in_one_line(tmp_path: Path, fake_loader: str,
                                                                   tiny_encoder_dir: Path, topic_data_dir: Path,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture) -> None:
    # A real classifier is scored in this process; its profiling child is then killed (as the
    # out-of-memory killer would), which `slm eval` must report as one line, not a traceback.
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from smallmighty.cli import main

    labels = ["food", "sport", "weather"]  # the topic data's labels, in its order
    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_encoder_dir, num_labels=3, id2label=dict(enumerate(labels)))
    model.save_pretrained(tmp_path / "clf")
    AutoTokenizer.from_pretrained(tiny_encoder_dir).save_pretrained(tmp_path / "clf")
    # fake_loader put tmp_path on the child's PYTHONPATH.
    (tmp_path / "killer.py").write_text("import os, signal\n\n\ndef load(model_dir, runtime):\n"
                                        "    os.kill(os.getpid(), signal.SIGKILL)\n")
    monkeypatch.setattr(speed, "DEFAULT_LOADER", "killer:load")
    capsys.readouterr()  # what the set-up printed
    assert main(["eval", "--model", str(tmp_path / "clf"), "--data", str(topic_data_dir), "--runtime", "torch",
                 "--no-baseline", "--out", str(tmp_path / "eval")]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines()
           if not line.startswith("Loading weights")]  # transformers' progress bar while the model loads
    assert len(err) == 1 and "failed: the child process was killed by SIGKILL" in err[0], err


def test_child_rejects_a_bad_loader(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    texts = tmp_path / "texts.json"
    texts.write_text('["a"]')
    assert speed.main(["--model", str(tmp_path), "--texts", str(texts), "--loader", "no_such_module:f"]) == 2
    assert "cannot import the classifier loader" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("smallmighty.engine.classifier") is None,
                    reason="smallmighty.engine.classifier is not merged yet")
def test_profile_with_the_real_loader_rejects_an_empty_model_dir(tmp_path: Path) -> None:
    with pytest.raises(SlmError):
        speed.profile_classifier(str(tmp_path), "torch", ["a"])


def test_hardware_info_describes_this_machine() -> None:
    info = speed.hardware_info()
    assert info["cores"] == os.cpu_count()
    assert info["torch_threads"] >= 1
    assert info["platform"] and info["cpu"]


def test_child_peak_rss_does_not_inherit_the_parents():
    """A fresh child reports its own peak, not the size of the (large) process that started it."""
    import subprocess
    import sys

    ballast = b"x" * (600 * 2**20)  # make this process large (pages written) before starting the child
    code = "from smallmighty.evaluate.speed import peak_rss_mb; print(peak_rss_mb())"
    child = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert len(ballast) and child < 300
