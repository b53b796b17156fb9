"""The pipeline around distillation: a finished teacher is reused (also on --resume) and the report
records the settings it was actually trained with; the card records which split chose what."""

from __future__ import annotations

import json
import os
from pathlib import Path

from smallmighty.cli import main

SMALL = ["--layers", "1", "--hidden", "32", "--heads", "2", "--ffn", "64", "--epochs", "2", "--lr", "3e-3",
         "--batch-size", "16", "--teacher-lr", "2e-3", "--max-length", "16", "--no-baseline", "--runtime", "torch"]


def test_resume_after_a_finished_teacher_does_not_fine_tune_it_again(tiny_encoder_dir, topic_data_dir, tmp_path,
                                                                    capsys, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.chdir(topic_data_dir.parent)  # the data named relative to this directory
    common = ["distill", "--teacher", str(tiny_encoder_dir), "--data", topic_data_dir.name, "--out", str(out), *SMALL]
    assert main([*common, "--teacher-epochs", "3"]) == 0
    assert "fine-tuning the teacher" in capsys.readouterr().out
    weights = (out / "teacher" / "model.safetensors").read_bytes()
    recorded = json.loads((out / "teacher" / "smallmighty.json").read_text())["data"]
    assert Path(recorded).is_absolute() and Path(recorded).resolve().is_relative_to(topic_data_dir.resolve())

    # Run from another directory, the same data named by another relative path is not "other data".
    monkeypatch.chdir(tmp_path)
    common[common.index(topic_data_dir.name)] = os.path.relpath(topic_data_dir, tmp_path)
    assert main([*common, "--teacher-epochs", "5", "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "fine-tuning the teacher" not in printed
    assert "reusing the fine-tuned teacher" in printed and "other settings" in printed
    assert "other data" not in printed
    assert (out / "teacher" / "model.safetensors").read_bytes() == weights
    card = json.loads((out / "report.json").read_text())
    assert card["training"]["teacher_train"]["epochs"] == 3  # the reused teacher's own settings, not the 5 asked
    selection = card["selection"]
    assert selection["teacher"]["split"] == selection["student"]["split"] == "validation"
    assert "of the 240 training examples" in selection["validation_split"]
    assert "scored once" in selection["test_split"]
    assert card["task"]["n_train"] + int(selection["validation_split"].split()[0]) == 240
