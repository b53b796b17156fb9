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
