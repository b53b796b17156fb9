"""ONNX export folders: outputs equal torch's, and classify.py runs where torch cannot be imported."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from tiny_classifier import LABELS, TEXTS

from smallmighty.compress.classifier_export import export_classifier_onnx
from smallmighty.compress.runtime_env import dependency_closure, minimal_python
from smallmighty.engine.classifier import load_classifier
from smallmighty.errors import SlmError


def load_example(folder: Path):
    """The exported classify.py as a module (it imports only numpy, tokenizers and the runtime)."""
    spec = importlib.util.spec_from_file_location(f"classify_{folder.name}", folder / "classify.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def exported(classifier_dir, tmp_path_factory) -> Path:
    return export_classifier_onnx(classifier_dir, tmp_path_factory.mktemp("exports") / "onnx", int8=True)


def test_the_folder_holds_everything_classify_py_needs(exported):
    assert {p.name for p in exported.iterdir()} == {"model.onnx", "model.int8.onnx", "tokenizer.json", "labels.json",
                                                    "classify.py", "export.json"}
    assert json.loads((exported / "labels.json").read_text()) == LABELS
    info = json.loads((exported / "export.json").read_text())
    assert info["fp32_max_logit_diff_vs_torch"] <= info["tolerance"]


@pytest.mark.parametrize("batch", [1, 3, 6])
def test_onnx_logits_equal_torch_at_several_batch_sizes_and_lengths(classifier_dir, exported, batch):
    torch_clf = load_classifier(str(classifier_dir), "torch")
    texts = TEXTS[-batch:]  # lengths from 1 word to past the 40-token limit
    expected = torch_clf.predict_logits(texts)
    assert np.abs(expected).max() > 0.1
    fp32 = load_example(exported).Classifier(exported, "model.onnx")
    np.testing.assert_allclose(fp32.logits(texts), expected, atol=1e-4)
    assert fp32.predict(texts) == torch_clf.predict(texts)
    int8 = load_example(exported).Classifier(exported, "model.int8.onnx")
    assert np.abs(int8.logits(texts) - expected).max() < 0.25  # dynamic int8: close, not equal


def test_dependency_closure_is_what_pip_would_install_and_has_no_torch():
    names = {d.metadata["Name"].lower() for d in dependency_closure(["onnxruntime", "tokenizers", "numpy"])}
    assert {"onnxruntime", "tokenizers", "numpy"} <= names
    assert "torch" not in names and "smallmighty" not in names and "transformers" not in names


def test_classify_py_runs_in_a_python_that_cannot_import_torch(classifier_dir, exported, tmp_path):
    python = minimal_python(env_dir=tmp_path / "ort-only")
    blocked = subprocess.run([str(python), "-I", "-c", "import torch"], capture_output=True, text=True, cwd=tmp_path)
    assert blocked.returncode != 0 and "No module named 'torch'" in blocked.stderr
    blocked = subprocess.run([str(python), "-I", "-c", "import smallmighty"], capture_output=True, text=True,
                             cwd=tmp_path)
    assert "No module named 'smallmighty'" in blocked.stderr
    done = subprocess.run([str(python), "-I", str(exported / "classify.py"), "--model", "model.onnx", *TEXTS],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:-1] == load_classifier(str(classifier_dir), "torch").predict(TEXTS)
    piped = subprocess.run([str(python), "-I", str(exported / "classify.py"), "--json"], input="hi\nrefund please\n",
                           capture_output=True, text=True, cwd=tmp_path, timeout=120)
    rows = [json.loads(line) for line in piped.stdout.splitlines()]
    assert [r["text"] for r in rows] == ["hi", "refund please"] and set(rows[0]["scores"]) == set(LABELS)


def test_export_is_refused_for_other_models_in_one_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    with pytest.raises(SlmError, match="is a causal language model; --format onnx exports classifiers"):
        export_classifier_onnx(tmp_path, tmp_path / "out")
    with pytest.raises(SlmError, match="config.json is missing"):
        export_classifier_onnx(tmp_path / "nothing", tmp_path / "out")
    assert not (tmp_path / "out").exists()
