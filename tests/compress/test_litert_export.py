"""LiteRT export: the .tflite file's outputs equal torch's, run through classify.py with ai-edge-litert.

The converter lives in an environment of its own (about 2 GB, see litert_export). These tests use
the one `slm export --format litert` or bench/export.py installed in the user's cache, and skip with
the reason where there is none; installing it here would take minutes of a test run.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from tiny_classifier import LABELS, TEXTS

from smallmighty.compress.litert_export import LITERT_TORCH_VERSION, export_classifier_litert, signature_lengths
from smallmighty.engine.classifier import load_classifier

# The user's cache, not the per-run one conftest sets up (which never holds a 2 GB environment).
USER_ENV = (Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "smallmighty" / "envs"
            / f"litert-torch-{LITERT_TORCH_VERSION}")
ENV = Path(os.environ.get("SLM_LITERT_ENV", USER_ENV))
needs_env = pytest.mark.skipif(not (ENV / ".slm-complete").is_file(),
                               reason=f"no LiteRT converter environment at {ENV} (`slm export --format litert` or "
                                      "bench/export.py installs it, about 2 GB)")


def test_signature_lengths_cover_every_length_once():
    assert signature_lengths(64) == [16, 32, 64]
    assert signature_lengths(40) == [16, 32, 40]
    assert signature_lengths(8) == [8]


@pytest.fixture(scope="module")
def exported(classifier_dir, tmp_path_factory) -> Path:
    return export_classifier_litert(classifier_dir, tmp_path_factory.mktemp("exports") / "litert", env_dir=ENV)


@needs_env
def test_litert_logits_equal_torch_at_several_batch_sizes_and_lengths(classifier_dir, exported):
    assert {p.name for p in exported.iterdir()} == {"model.tflite", "tokenizer.json", "labels.json", "classify.py",
                                                    "export.json"}
    info = json.loads((exported / "export.json").read_text())
    assert info["signatures"] == ["len16", "len32", "len40"] and info["max_logit_diff_vs_torch"] <= 1e-4
    # Run classify.py's own Classifier inside the converter environment (it has ai-edge-litert), on
    # batches of 1, 3 and 6 texts from 3 to 40+ tokens, and compare with torch here.
    script = ("import json, sys; sys.path.insert(0, sys.argv[1]); from classify import Classifier; "
              "clf = Classifier(sys.argv[1]); texts = json.loads(sys.argv[2]); "
              "print(json.dumps([clf.logits(texts[-b:]).tolist() for b in (1, 3, 6)]))")
    done = subprocess.run([str(ENV / "bin" / "python"), "-c", script, str(exported), json.dumps(TEXTS)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    torch_clf = load_classifier(str(classifier_dir), "torch")
    for batch, got in zip((1, 3, 6), json.loads(done.stdout.strip().splitlines()[-1])):
        np.testing.assert_allclose(np.array(got), torch_clf.predict_logits(TEXTS[-batch:]), atol=1e-4)


@needs_env
def test_litert_classify_py_command_prints_labels(exported):
    done = subprocess.run([str(ENV / "bin" / "python"), str(exported / "classify.py"), "refund please", "hi"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert all(line in LABELS for line in done.stdout.split())
