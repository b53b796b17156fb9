"""`slm distill` with no flags on a task nobody tuned for: a thousand banking77 texts, 77 intents.

Slow (about 15 minutes on two cores): the real MiniLM teacher and its student at the defaults. The
defaults must either bring the student within a point of the TF-IDF baseline or say, first thing in
the headline, that the baseline wins.
"""

from __future__ import annotations

import json
import shutil

import pytest

from smallmighty.cli import main
from smallmighty.data.classification import load_labelled_splits


@pytest.mark.slow
def test_defaults_on_a_thousand_banking77_texts(shared_datasets, tmp_path, capsys):
    train, _ = load_labelled_splits(shared_datasets / "banking77", max_train=1000)
    data = tmp_path / "banking77-1k"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps({"text": t, "label": train.label_names[y]}) + "\n"
                                              for t, y in zip(train.texts, train.labels)))
    shutil.copy(shared_datasets / "banking77" / "test.jsonl", data / "test.jsonl")
    shutil.copy(shared_datasets / "banking77" / "labels.json", data / "labels.json")

    assert main(["distill", "--data", str(data), "--out", str(tmp_path / "run")]) == 0
    card = json.loads((tmp_path / "run" / "report.json").read_text())
    models = {m["role"]: m for m in card["models"]}
    student, baseline = models["student"], models["baseline"]
    headline = card["summary"]["headline"]
    with capsys.disabled():
        print(f"\nteacher {models['teacher']['accuracy']:.4f} student {student['accuracy']:.4f} "
              f"baseline {baseline['accuracy']:.4f}\n{headline}")
    assert "of the 1000 training examples" in card["selection"]["validation_split"]
    assert student["accuracy"] >= baseline["accuracy"] - 0.01 or headline.startswith("The baseline")
