"""`slm distill` end to end: teacher fine-tuned first, student distilled, report card written."""

from __future__ import annotations

import json

import pytest

from smallmighty.cli import main


def test_distill_command_writes_student_and_report(tiny_encoder_dir, topic_data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    # A 1L-64 student: at width 32 (16k weights) whether it separates all three topics depends on the seed.
    code = main(["distill", "--teacher", str(tiny_encoder_dir), "--data", str(topic_data_dir), "--out", str(out),
                 "--layers", "1", "--hidden", "64", "--heads", "4", "--ffn", "128", "--epochs", "6", "--lr", "3e-3",
                 "--batch-size", "16", "--teacher-epochs", "4", "--teacher-lr", "2e-3", "--max-length", "16"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "fine-tuning the teacher" in printed and str(out / "report.html") in printed
    card = json.loads((out / "report.json").read_text())
    roles = [m["role"] for m in card["models"]]
    assert roles == ["teacher", "student", "baseline"]
    teacher, student, _ = card["models"]
    assert student["runtime"] == teacher["runtime"] == "onnx"
    assert student["params"] < teacher["params"] / 8
    assert student["accuracy"] > 0.85 and teacher["accuracy"] > 0.85
    assert student["latency_ms_p50"] > 0 and student["peak_rss_mb"] > 0
    assert card["task"]["n_test"] == 60 and card["task"]["num_labels"] == 3
    comparison = card["summary"]["comparisons"][0]
    assert comparison["retained"] == pytest.approx(student["accuracy"] / teacher["accuracy"])
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "student" in html
    assert (out / "student" / "model.safetensors").exists() and (out / "teacher" / "config.json").exists()
    # The teacher records how it was trained, so a later run reusing it can tell other settings apart.
    assert json.loads((out / "teacher" / "smallmighty.json").read_text())["train"]["epochs"] == 4


def test_recipe_file_sets_defaults_and_flags_win(tmp_path, topic_data_dir, capsys):
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"layers": 0, "data": str(topic_data_dir)}))
    assert main(["distill", "--recipe", str(recipe), "--teacher", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    recipe.write_text(json.dumps({"no_such_setting": 1}))
    assert main(["distill", "--recipe", str(recipe)]) == 2
    assert "unknown setting(s) no_such_setting" in capsys.readouterr().err


def test_bad_data_path_is_one_line_error(tmp_path, capsys):
    assert main(["distill", "--data", str(tmp_path / "nope.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nope.jsonl" in err and "Traceback" not in err


def test_eval_command_rebuilds_the_card_on_another_runtime(tiny_encoder_dir, topic_data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["distill", "--teacher", str(tiny_encoder_dir), "--data", str(topic_data_dir), "--out", str(out),
                 "--layers", "1", "--hidden", "32", "--heads", "2", "--ffn", "64", "--epochs", "2",
                 "--teacher-epochs", "1", "--max-length", "16", "--no-baseline", "--runtime", "torch"]) == 0
    capsys.readouterr()
    assert main(["eval", "--teacher", str(out / "teacher"), "--model", str(out / "student"), "--data",
                 str(topic_data_dir), "--out", str(tmp_path / "eval"), "--runtime", "onnx-int8", "--no-baseline"]) == 0
    card = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert [(m["name"], m["role"], m["runtime"]) for m in card["models"]] == [
        ("teacher", "teacher", "onnx-int8"), ("student", "student", "onnx-int8")]
    from smallmighty.engine.classifier import runtime_file

    assert runtime_file(out / "student", "onnx-int8").is_file()
    assert not list(out.rglob("*.onnx"))  # exports live in the cache, not in the user's folders
    assert "report:" in capsys.readouterr().out


def test_max_steps_is_the_students_and_the_teacher_keeps_its_budget(tiny_encoder_dir, topic_data_dir):
    from smallmighty.cli import build_parser
    from smallmighty.data.arguments import load_data_from_args
    from smallmighty.distill.commands import configs_from_args

    args = build_parser().parse_args(["distill", "--teacher", str(tiny_encoder_dir), "--data", str(topic_data_dir),
                                      "--max-steps", "7"])
    _, config, teacher_train, choices = configs_from_args(args, load_data_from_args(args))
    assert config.train.max_steps == 7 and "student_length" not in choices
    assert teacher_train.max_steps >= 600 and "teacher_length" in choices  # the teacher's own data-size budget
