"""The training loop: learning, checkpoints, resume after a kill, and 2-process data parallelism."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from launch import assert_same_weights, kill_once_saved, run_on_two_ranks, subprocess_env

from smallmighty.data.classification import load_labelled_data, load_labelled_splits
from smallmighty.errors import SlmError
from smallmighty.models.encoder import load_encoder_classifier
from smallmighty.train.batching import Collator, encode_texts, make_examples
from smallmighty.train.finetune import ClassificationObjective, finetune_classifier
from smallmighty.train.loop import TrainConfig, train


def _finetune_cmd(encoder: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "smallmighty.cli", "finetune", "--model", str(encoder), "--data", str(data),
            "--out", str(out), "--epochs", "3", "--batch-size", "8", "--lr", "1e-3", "--max-length", "16",
            "--checkpoint-every", "2", *extra]


def test_finetune_learns_the_task(tiny_encoder_dir, topic_data_dir, tmp_path):
    from smallmighty.engine.classifier import load_classifier

    data = load_labelled_data(topic_data_dir)
    train, test = data.train, data.test
    out = finetune_classifier(str(tiny_encoder_dir), train, tmp_path / "model", validation=data.validation,
                              config=TrainConfig(epochs=4, batch_size=16, lr=2e-3, warmup_ratio=0.0), max_length=16)
    assert not (tmp_path / "model.checkpoint").exists()  # cleaned up after success
    predicted = load_classifier(str(out), "torch").predict(test.texts)
    accuracy = sum(p == test.label_names[y] for p, y in zip(predicted, test.labels)) / len(test)
    assert accuracy > 0.9  # chance is 1/3


def test_progress_bar_obeys_tqdm_disable(tiny_encoder_dir, topic_data_dir, tmp_path, monkeypatch, capsys):
    """TQDM_DISABLE=1 silences the training bar as it does tqdm's other bars (logs of long runs stay readable)."""
    data = load_labelled_data(topic_data_dir)
    config = TrainConfig(epochs=1, batch_size=16, lr=1e-3, warmup_ratio=0.0)
    bar = re.compile(r"\d+/\d+ \[[^\]]*step")  # our bar: "3/3 [00:01<00:00, 2.5step/s]" (transformers' count "it")
    monkeypatch.setenv("TQDM_DISABLE", "1")
    finetune_classifier(str(tiny_encoder_dir), data.train, tmp_path / "quiet", validation=data.validation,
                        config=config, max_length=16)
    assert not bar.search(capsys.readouterr().err)
    monkeypatch.delenv("TQDM_DISABLE")
    finetune_classifier(str(tiny_encoder_dir), data.train, tmp_path / "shown", validation=data.validation,
                        config=config, max_length=16)
    assert bar.search(capsys.readouterr().err)


def test_resume_after_kill_matches_an_uninterrupted_run(tiny_encoder_dir, topic_data_dir, tmp_path):
    straight = tmp_path / "straight"
    subprocess.run(_finetune_cmd(tiny_encoder_dir, topic_data_dir, straight), check=True, env=subprocess_env(),
                   capture_output=True)

    killed = tmp_path / "killed"
    step_at_kill = kill_once_saved(_finetune_cmd(tiny_encoder_dir, topic_data_dir, killed),
                                   killed.with_name("killed.checkpoint"), step=4, timeout=120)
    assert 0 < step_at_kill < 90 and not killed.exists()

    subprocess.run(_finetune_cmd(tiny_encoder_dir, topic_data_dir, killed, "--resume"), check=True,
                   env=subprocess_env(), capture_output=True)
    assert_same_weights(straight, killed)


def test_resume_without_checkpoint_or_with_other_settings_is_an_error(tiny_encoder_dir, topic_data_dir, tmp_path):
    train_data, held_out = load_labelled_splits(topic_data_dir, max_train=32)
    with pytest.raises(SlmError, match="no checkpoint"):
        finetune_classifier(str(tiny_encoder_dir), train_data, tmp_path / "m", config=TrainConfig(epochs=1),
                            validation=held_out, resume=True)
    model, tok = load_encoder_classifier(str(tiny_encoder_dir), train_data.label_names)
    examples = make_examples(encode_texts(tok, train_data.texts, 16), train_data.labels)
    ckpt = tmp_path / "ckpt"
    train(ClassificationObjective(model), examples, Collator(tok.pad_token_id),
          TrainConfig(epochs=1, batch_size=8), checkpoint_dir=ckpt)
    assert json.loads((ckpt / "state.json").read_text())["global_step"] == 4
    with pytest.raises(SlmError, match="other settings"):
        train(ClassificationObjective(model), examples, Collator(tok.pad_token_id),
              TrainConfig(epochs=1, batch_size=8, lr=1.0), checkpoint_dir=ckpt, resume=True)
    # A kill between the two renames of a checkpoint swap leaves it aside; --resume puts it back.
    ckpt.rename(ckpt.with_name(".ckpt.old"))
    train(ClassificationObjective(model), examples, Collator(tok.pad_token_id),
          TrainConfig(epochs=1, batch_size=8), checkpoint_dir=ckpt, resume=True)
    assert json.loads((ckpt / "state.json").read_text())["global_step"] == 4


def test_two_processes_under_torchrun_stay_in_sync(tiny_encoder_dir, topic_data_dir, tmp_path):
    """ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2: gloo DDP; each rank reports a checksum of
    its weights after training, and the two must be identical (gradients were averaged)."""
    ranks = run_on_two_ranks(f"""
import torch
from smallmighty.data.classification import load_labelled_splits
from smallmighty.train.finetune import ClassificationObjective
from smallmighty.train.loop import TrainConfig, train
from smallmighty.train.batching import Collator, encode_texts, make_examples
from smallmighty.models.encoder import load_encoder_classifier
torch.manual_seed(0)
data, _ = load_labelled_splits({str(topic_data_dir)!r})
model, tok = load_encoder_classifier({str(tiny_encoder_dir)!r}, data.label_names)
examples = make_examples(encode_texts(tok, data.texts, 16), data.labels)
module = train(ClassificationObjective(model), examples, Collator(tok.pad_token_id),
               TrainConfig(epochs=1, batch_size=8, lr=1e-3)).module
report = {{"first": torch.cat([p.detach().flatten() for p in module.parameters()])[:5].tolist()}}
""", tmp_path)
    assert ranks[0]["first"] == ranks[1]["first"]
