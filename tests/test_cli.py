"""The `slm` front door: every verb has teaching help, and user errors are one line."""

import subprocess
import sys

import pytest

from smallmighty.cli import build_parser, main

VERBS = ["finetune", "distill", "eval"]


def test_top_level_help_lists_the_verbs(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for verb in VERBS:
        assert verb in out


@pytest.mark.parametrize("verb", VERBS)
def test_each_verb_has_help_with_examples(verb, capsys):
    with pytest.raises(SystemExit):
        main([verb, "--help"])
    out = capsys.readouterr().out
    assert "examples:" in out and "--data" in out


def test_help_does_not_import_torch():
    """`slm --help` must stay fast: the command modules import nothing heavy."""
    code = "import sys; from smallmighty.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_eval_without_models_is_a_clear_error(capsys):
    assert main(["eval"]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err


def test_unknown_runtime_is_rejected_by_the_parser():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "--model", "x", "--runtime", "tpu"])


# ---- settings: command line over recipe over defaults; outputs checked first -----------------

def _capture_run(monkeypatch, module: str) -> dict:
    """Replace a command's handler (bound when `main` builds the parser) with one that records
    the settings it was given, after `main` has applied the recipe."""
    import importlib

    seen = {}
    monkeypatch.setattr(importlib.import_module(module), "run", lambda args: seen.update(vars(args)) or 0)
    return seen


def test_typed_flags_beat_the_recipe_even_at_their_default(tmp_path, monkeypatch):
    import json

    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"epochs": 4, "lr": 0.001, "layers": 4, "baseline": False,
                                  "runtime": "torch", "out": str(tmp_path / "from-recipe")}))
    seen = _capture_run(monkeypatch, "smallmighty.distill.commands")
    # 10 and onnx are distill's defaults: typed, they still win over the recipe.
    assert main(["distill", "--recipe", str(recipe), "--epochs", "10", "--runtime", "onnx"]) == 0
    assert (seen["epochs"], seen["runtime"]) == (10, "onnx")
    assert (seen["lr"], seen["layers"], seen["baseline"], seen["out"]) == (0.001, 4, False,
                                                                          str(tmp_path / "from-recipe"))


def test_eval_takes_a_distill_recipe(tmp_path, monkeypatch):
    # The shipped recipe describes a whole run: eval takes what it knows (data, out) and skips the rest.
    import json
    from pathlib import Path

    monkeypatch.chdir(tmp_path)
    shipped = Path(__file__).resolve().parents[1] / "recipes" / "banking77.json"
    seen = _capture_run(monkeypatch, "smallmighty.evaluate.commands")
    assert main(["eval", "--recipe", str(shipped), "--model", "student"]) == 0
    recipe = json.loads(shipped.read_text())
    assert (seen["data"], seen["out"], seen["model"]) == (recipe["data"], recipe["out"], ["student"])
    (tmp_path / "typo.json").write_text(json.dumps({"epochz": 3}))
    assert main(["eval", "--recipe", "typo.json", "--model", "student"]) == 2


@pytest.mark.parametrize("setting, value, message", [
    ("epochs", "ten", "setting 'epochs' must be an integer, got 'ten'"),
    ("lr", True, "setting 'lr' must be a number, got True"),
    ("baseline", "no", "setting 'baseline' must be true or false, got 'no'"),
    ("runtime", "tpu", "setting 'runtime' must be one of torch, onnx, onnx-int8, got 'tpu'"),
    ("data", 7, "setting 'data' must be a string, got 7"),
])
def test_a_recipe_value_of_the_wrong_type_names_the_key(tmp_path, monkeypatch, capsys, setting, value, message):
    import json

    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({setting: value}))
    seen = _capture_run(monkeypatch, "smallmighty.distill.commands")
    assert main(["distill", "--recipe", str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and str(recipe) in err[0], err
    assert not seen  # refused before the command ran


@pytest.mark.parametrize("verb", VERBS)
def test_an_unwritable_out_is_named_before_any_work(tmp_path, capsys, verb):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = blocker / "out"
    extra = ["--model", str(tmp_path)] if verb == "eval" else []
    assert main([verb, *extra, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: cannot write {out}: {blocker} is a file, not a folder"], err
