"""`slm export`: writes where asked, and every user mistake is one line on stderr with exit status 2."""

from __future__ import annotations

import pytest
from tiny_llama import write_tiny_llama

from smallmighty.cli import main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_gguf_export_writes_the_file(tiny, tmp_path, capsys):
    out = tmp_path / "deep" / "tiny.q8_0.gguf"
    assert main(["export", str(tiny), "--format", "gguf", "--type", "q8_0", "--out", str(out)]) == 0
    assert out.is_file() and out.read_bytes()[:4] == b"GGUF"
    assert "llama-cli -m" in capsys.readouterr().err


def test_wrong_model_kind_for_the_format(tiny, classifier_dir, tmp_path, capsys):
    err = one_line_error(capsys, ["export", str(tiny), "--format", "onnx", "--out", str(tmp_path / "o")])
    assert "is a causal language model; --format onnx exports classifiers" in err
    err = one_line_error(capsys, ["export", str(tiny), "--format", "litert", "--out", str(tmp_path / "o")])
    assert "--format litert exports classifiers" in err
    err = one_line_error(capsys, ["export", str(classifier_dir), "--format", "gguf", "--out", str(tmp_path / "c.gguf")])
    assert "is a sequence classifier; --format gguf exports causal language models" in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "c.gguf").exists()


def test_unwritable_out_is_caught_before_any_work(tiny, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    err = one_line_error(capsys, ["export", str(tiny), "--format", "gguf", "--out", str(blocker / "x.gguf")])
    assert err == f"error: cannot write {blocker / 'x.gguf'}: {blocker} is a file, not a folder"
    err = one_line_error(capsys, ["export", str(tiny), "--format", "gguf", "--out", str(tmp_path)])
    assert "is a folder; give the .gguf file to write" in err
    err = one_line_error(capsys, ["export", str(tiny), "--format", "onnx", "--out", str(blocker)])
    assert "is a file; --format onnx writes a folder" in err


def test_flag_mistakes(tiny, tmp_path, capsys):
    assert "name the classifier folder" in one_line_error(capsys, ["export", "--format", "onnx"])
    err = one_line_error(capsys, ["export", str(tiny), "--format", "gguf", "--int8", "--out", str(tmp_path / "x.gguf")])
    assert "--int8 applies to --format onnx only" in err
    err = one_line_error(capsys, ["export", str(tmp_path / "missing"), "--format", "gguf",
                                  "--out", str(tmp_path / "x.gguf")])
    assert "no such file or folder" in err


def test_help_teaches_with_examples(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    text = capsys.readouterr().out
    assert "slm export runs/distill/student --format onnx --int8" in text and "classify.py" in text
