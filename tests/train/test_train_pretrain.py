"""`slm pretrain`: a model made on real text runs everywhere; resume after a kill; two processes in sync."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from greedy import assert_engine_follows_transformers
from launch import assert_same_weights, kill_once_saved, run_on_two_ranks, subprocess_env

from smallmighty.cli import main

PROMPT = "Once upon a time, there was a little"


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["pretrain", "--data", str(data), "--out", str(out), "--preset", "tiny", "--seq-len", "64",
            "--vocab-size", "512", "--batch-size", "8", "--lr", "3e-3", "--warmup-ratio", "0.1", *extra]


@pytest.fixture(scope="module")
def pretrained(stories, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pretrain") / "model"
    assert main(_args(stories, out, "--max-steps", "300", "--eval-every", "100", "--lr", "1e-2",
                      "--precision", "fp32")) == 0
    return out


def test_pretrained_model_learns_and_records_how_it_was_made(pretrained):
    meta = json.loads((pretrained / "smallmighty.json").read_text())
    ppl = [h["val_ppl"] for h in meta["history"]]
    assert len(ppl) == 3 and ppl[-1] < ppl[0] and ppl[-1] < 100  # a uniform guess over 512 tokens is 512
    assert meta["best"]["val_ppl"] == min(ppl)
    assert meta["recipe"] == "pretrain" and meta["shape"]["layers"] == 2
    assert not pretrained.with_name("model.checkpoint").exists()


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_engine_and_transformers_give_the_same_greedy_tokens(pretrained, precision):
    (expected,) = assert_engine_follows_transformers(pretrained, [PROMPT], precision, max_new_tokens=24)
    assert len(set(expected)) > 3  # a trained model, not a stuck one


def test_slm_generate_runs_the_pretrained_model(pretrained):
    result = subprocess.run([sys.executable, "-m", "smallmighty.cli", "generate", "--model", str(pretrained),
                             "--raw", "--max-new-tokens", "8", PROMPT], env=subprocess_env(), capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() and "8 tokens" in result.stderr


def test_resume_after_kill_matches_an_uninterrupted_run(stories, tmp_path):
    cmd = [sys.executable, "-m", "smallmighty.cli"]
    extra = ("--max-steps", "40", "--checkpoint-every", "2", "--eval-every", "10", "--precision", "bf16")
    straight = tmp_path / "straight"
    subprocess.run(cmd + _args(stories, straight, *extra), check=True, env=subprocess_env(), capture_output=True)

    killed = tmp_path / "killed"
    step_at_kill = kill_once_saved(cmd + _args(stories, killed, *extra), killed.with_name("killed.checkpoint"),
                                   step=12, timeout=180)
    assert 10 < step_at_kill < 40 and not killed.exists()

    subprocess.run(cmd + _args(stories, killed, *extra, "--resume"), check=True, env=subprocess_env(),
                   capture_output=True)
    assert_same_weights(straight, killed)
    history = [json.loads((d / "smallmighty.json").read_text())["history"] for d in (straight, killed)]
    assert history[0] == history[1]


def test_two_processes_under_torchrun_stay_in_sync(stories, tmp_path):
    """Each rank writes a checksum of its weights after training; gradients averaged, so they agree."""
    ranks = run_on_two_ranks(f"""
from smallmighty.models.decoder import decoder_shape
from smallmighty.train.loop import TrainConfig
from smallmighty.train.pretrain import PretrainConfig, pretrain
result = pretrain({str(stories)!r}, {str(tmp_path / "model")!r}, shape=decoder_shape("tiny"),
                  config=TrainConfig(max_steps=6, batch_size=4, lr=3e-3),
                  settings=PretrainConfig(seq_len=64, vocab_size=512, precision="fp32"))
module, report = result.module, {{"history": result.history}}
""", tmp_path)
    assert ranks[0]["history"] == ranks[1]["history"]
    assert (tmp_path / "model" / "model.safetensors").is_file()


def test_pretrain_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["pretrain", "--out", str(tmp_path / "m")]) == 2
    assert "--data is required" in capsys.readouterr().err
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("a short story " * 30)
    assert main(_args(tiny, tmp_path / "m", "--seq-len", "512")) == 2
    assert "corpus too small" in capsys.readouterr().err
    assert main(_args(tiny, tmp_path / "m", "--heads", "3")) == 2
    assert "not a multiple of heads 3" in capsys.readouterr().err
