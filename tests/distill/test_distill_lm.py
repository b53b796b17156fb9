"""`slm distill` with a causal-LM teacher: the student runs everywhere, methods, tokenizers, resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from greedy import assert_engine_follows_transformers
from launch import assert_same_weights, kill_once_saved, run_on_two_ranks, subprocess_env

from smallmighty.cli import main
from smallmighty.distill.causal_lm import LMDistillConfig, distill_causal_lm
from smallmighty.distill.losses import DistillWeights
from smallmighty.errors import SlmError
from smallmighty.models.decoder_prune import DecoderCut
from smallmighty.train.loop import TrainConfig

PROMPT = "Once upon a time, there was a little"
CUT = DecoderCut(layers=1, hidden=48, heads=2, kv_heads=1, ffn=96)


@pytest.fixture(scope="module")
def teacher(stories, tmp_path_factory) -> Path:
    """A tiny Llama (2 layers, width 64, 512-token BPE) pretrained on the stories: a teacher worth copying."""
    from smallmighty.models.decoder import decoder_shape
    from smallmighty.train.pretrain import PretrainConfig, pretrain

    out = tmp_path_factory.mktemp("teacher") / "model"
    pretrain(str(stories), out, shape=decoder_shape("tiny"), config=TrainConfig(max_steps=150, batch_size=8, lr=1e-2),
             settings=PretrainConfig(seq_len=64, vocab_size=512, precision="fp32"))
    return out


def _config(**changes) -> LMDistillConfig:
    settings = dict(cut=CUT, seq_len=64, precision="fp32", top_k=16,
                    train=TrainConfig(max_steps=30, batch_size=8, lr=3e-3, eval_every=15, schedule="cosine"))
    settings.update(changes)
    return LMDistillConfig(**settings)


def _cli_args(teacher: Path, stories: Path, out: Path, *extra: str) -> list[str]:
    return ["distill", "--teacher", str(teacher), "--data", str(stories), "--out", str(out), "--layers", "1",
            "--hidden", "48", "--heads", "2", "--kv-heads", "1", "--ffn", "96", "--seq-len", "64", "--lr", "3e-3",
            "--precision", "fp32", "--top-k", "16", *extra]


@pytest.fixture(scope="module")
def distilled(teacher, stories, tmp_path_factory) -> Path:
    """The whole `slm distill` causal-LM job: student, scratch baseline, report card."""
    out = tmp_path_factory.mktemp("distill") / "run"
    assert main(_cli_args(teacher, stories, out, "--max-steps", "60", "--eval-every", "30", "--alpha-ce", "0.5")) == 0
    return out


def test_the_cli_distils_beside_a_scratch_baseline_and_writes_a_report(distilled, teacher):
    card = json.loads((distilled / "report.json").read_text())
    teacher_row, student, scratch = card["models"]
    assert [m["role"] for m in card["models"]] == ["teacher", "student", "baseline"]
    assert student["params"] < teacher_row["params"] / 2 and student["params"] == scratch["params"]
    for row in card["models"]:
        assert row["val_ppl"] > 1 and row["decode_tok_s_fp32"] > 0 and row["decode_tok_s_int8"] > 0
        assert row["peak_rss_mb"] > 0 and row["disk_mb"] > 0
    # Same shape, same tokens: the student starts from the teacher's units and learns from it.
    assert student["val_ppl"] < scratch["val_ppl"]
    assert len(student["curve"]) == len(scratch["curve"]) == 2
    assert card["summary"]["comparisons"][0]["ppl_ratio"] == pytest.approx(student["val_ppl"] / teacher_row["val_ppl"])
    html = (distilled / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 5 and "Validation perplexity during training" in html
    meta = json.loads((distilled / "student" / "smallmighty.json").read_text())
    assert meta["method"] == "kd" and meta["train_tokens"] == 60 * 8 * 64
    assert len(meta["blocks"]) == 1 and 0 <= meta["blocks"][0] < 2  # the teacher block the student was cut from
    scratch_meta = json.loads((distilled / "scratch" / "smallmighty.json").read_text())
    assert scratch_meta["train_tokens"] == meta["train_tokens"]
    assert not (distilled / "student.checkpoint").exists()


def test_the_trimmed_students_ids_map_back_to_the_teachers_text(distilled, teacher):
    from transformers import AutoTokenizer

    meta = json.loads((distilled / "student" / "smallmighty.json").read_text())
    student_tok, teacher_tok = AutoTokenizer.from_pretrained(distilled / "student"), AutoTokenizer.from_pretrained(teacher)
    assert len(student_tok) == len(meta["teacher_token_ids"]) <= len(teacher_tok)
    ids = student_tok(PROMPT + " Zebra!", add_special_tokens=False)["input_ids"]
    assert teacher_tok.decode([meta["teacher_token_ids"][i] for i in ids]) == PROMPT + " Zebra!"


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_the_student_gives_equal_greedy_tokens_in_our_engine_and_transformers(distilled, precision):
    texts = [PROMPT, "Tom and his mom went to the park.", "She said"]
    expected = assert_engine_follows_transformers(distilled / "student", texts, precision)
    assert len({tuple(e) for e in expected}) > 1  # the continuations depend on the prompt


def test_a_student_with_another_tokenizer_is_refused_naming_both(teacher, stories, tmp_path):
    from tiny_llama import write_tiny_llama

    other = write_tiny_llama(tmp_path / "other")
    with pytest.raises(SlmError) as refusal:
        distill_causal_lm(str(teacher), str(stories), tmp_path / "out", _config(student=str(other)))
    message = str(refusal.value)
    assert str(teacher) in message and str(other) in message
    assert "token-level distillation needs one vocabulary" in message and "--method sequence" in message


def test_sequence_level_kd_teaches_a_student_with_another_tokenizer(teacher, stories, tmp_path):
    from tiny_llama import write_tiny_llama

    other = write_tiny_llama(tmp_path / "other")
    config = _config(student=str(other), method="sequence", sequences=16, prompt_tokens=16,
                     train=TrainConfig(max_steps=4, batch_size=4, lr=3e-3, eval_every=2))
    info = distill_causal_lm(str(teacher), str(stories), tmp_path / "out", config)
    assert info["method"] == "sequence" and info["steps"] == 4
    # 16 continuations of 64 teacher tokens, re-tokenised by the student's tokenizer into 64-token rows.
    assert info["train_rows"] >= 16
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_padding_rows_past_the_tokenizer_are_the_same_vocabulary(teacher, stories, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(teacher)
    model = AutoModelForCausalLM.from_pretrained(teacher)
    model.resize_token_embeddings(len(tokenizer) + 64)  # one family, embedding rounded up
    padded = tmp_path / "padded"
    model.save_pretrained(padded)
    tokenizer.save_pretrained(padded)
    config = _config(student=str(padded), train=TrainConfig(max_steps=4, batch_size=4, lr=1e-3, eval_every=2))
    info = distill_causal_lm(str(teacher), str(stories), tmp_path / "out", config)
    assert info["vocab_size"] == len(tokenizer) + 64 and info["best"]["val_ppl"] > 1


@pytest.mark.parametrize("method", ["gkd", "kd-hidden"])
def test_on_policy_and_hidden_state_variants_train(teacher, stories, tmp_path, method):
    if method == "gkd":
        config = _config(method="gkd", on_policy_ratio=1.0, prompt_tokens=16, divergence="reverse_kl",
                         train=TrainConfig(max_steps=3, batch_size=2, lr=1e-3, eval_every=3))
    else:
        config = _config(divergence="jsd", beta=0.3, weights=DistillWeights(kd=1.0, ce=0.2, hidden=1.0, temperature=2.0),
                         train=TrainConfig(max_steps=3, batch_size=2, lr=1e-3, eval_every=3))
    info = distill_causal_lm(str(teacher), str(stories), tmp_path / "out", config)
    assert info["steps"] == 3 and torch.isfinite(torch.tensor(info["best"]["val_loss"]))


def test_resume_after_kill_matches_an_uninterrupted_run(teacher, stories, tmp_path):
    cmd = [sys.executable, "-m", "smallmighty.cli"]
    extra = ("--max-steps", "40", "--checkpoint-every", "2", "--eval-every", "10", "--no-baseline", "--alpha-ce", "0.3")
    straight = tmp_path / "straight"
    subprocess.run(cmd + _cli_args(teacher, stories, straight, *extra), check=True, env=subprocess_env(), capture_output=True)

    killed = tmp_path / "killed"
    step_at_kill = kill_once_saved(cmd + _cli_args(teacher, stories, killed, *extra),
                                   killed / "student.checkpoint" / "train", step=12, timeout=300)
    assert 10 < step_at_kill < 40 and not (killed / "student").exists()

    subprocess.run(cmd + _cli_args(teacher, stories, killed, *extra, "--resume"), check=True, env=subprocess_env(),
                   capture_output=True)
    assert_same_weights(straight / "student", killed / "student")
    history = [json.loads((d / "student" / "smallmighty.json").read_text())["history"] for d in (straight, killed)]
    assert history[0] == history[1]


def test_causal_lm_cli_errors_are_one_line(teacher, capsys):
    assert main(["distill", "--teacher", str(teacher)]) == 2
    assert "needs --data" in capsys.readouterr().err


def test_two_processes_under_torchrun_stay_in_sync(teacher, stories, tmp_path):
    """kd under torchrun: rank 0 builds the teacher cache, both ranks read it; every rank ends with the
    same student weights (each rank writes a checksum of what the training loop returned)."""
    ranks = run_on_two_ranks(f"""
import smallmighty.distill.causal_lm as lm
from smallmighty.distill.causal_lm import LMDistillConfig, distill_causal_lm
from smallmighty.models.decoder_prune import DecoderCut
from smallmighty.train.loop import TrainConfig
results = []
def spy(*args, **kwargs):
    results.append(train(*args, **kwargs))
    return results[-1]
train, lm.train = lm.train, spy
config = LMDistillConfig(cut=DecoderCut(layers=1, hidden=48, heads=2, kv_heads=1, ffn=96), seq_len=64,
                         precision="fp32", top_k=16, train=TrainConfig(max_steps=4, batch_size=2, lr=3e-3))
info = distill_causal_lm({str(teacher)!r}, {str(stories)!r}, {str(tmp_path / "out")!r}, config)
module, report = results[0].module, {{"history": info["history"], "train_tokens": info["train_tokens"]}}
""", tmp_path, timeout=600)
    assert ranks[0]["history"] == ranks[1]["history"] and ranks[0]["train_tokens"] == 4 * 2 * 2 * 64
    assert (tmp_path / "out" / "model.safetensors").is_file()
