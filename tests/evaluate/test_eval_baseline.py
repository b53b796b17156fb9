"""TfidfBaseline: learns a small synthetic intent set fast, and reaches its known level on BANKING77."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from smallmighty.errors import SlmError
from smallmighty.evaluate.baseline import TfidfBaseline

INTENTS = {
    "refund": ["i want a refund for {x}", "can i get my money back for {x}", "please refund {x}"],
    "delivery": ["where is my {x}", "when will {x} arrive", "my {x} has not been delivered yet"],
    "cancel": ["cancel my order of {x}", "i no longer want {x}, cancel it", "stop the order for {x}"],
}
ITEMS = ["card", "parcel", "phone", "laptop", "shoes", "book", "ticket", "jacket"]


def synthetic(items: list[str]) -> tuple[list[str], list[str]]:
    texts, labels = [], []
    for intent, templates in INTENTS.items():
        for template in templates:
            for item in items:
                texts.append(template.format(x=item))
                labels.append(intent)
    return texts, labels


def test_learns_synthetic_intents_and_generalises() -> None:
    texts, labels = synthetic(ITEMS[:6])
    model = TfidfBaseline().fit(texts, labels)
    # unseen items; misspellings; and lone unseen word forms that only character n-grams can match
    test_texts = ["please refund laptop", "when will jacket arrive", "cancel my order of jacket",
                  "can i get my mony back", "wher is my laptop", "i no longr want it",
                  "refunding", "deliveries", "cancelled"]
    pred = model.predict(test_texts)
    assert isinstance(pred, np.ndarray)
    assert list(pred) == ["refund", "delivery", "cancel"] * 3
    assert model.num_features > 100


def test_integer_labels_come_back_as_integers() -> None:
    texts, labels = synthetic(ITEMS)
    ids = {name: i for i, name in enumerate(INTENTS)}
    model = TfidfBaseline().fit(texts, [ids[name] for name in labels])
    assert model.predict(["please refund the shoes"]).tolist() == [ids["refund"]]


def test_misuse_is_a_user_error() -> None:
    with pytest.raises(SlmError, match="fitted"):
        TfidfBaseline().predict(["x"])
    with pytest.raises(SlmError, match="match"):
        TfidfBaseline().fit(["a", "b"], ["x"])
    with pytest.raises(SlmError, match="two distinct"):
        TfidfBaseline().fit(["a b", "a c"], ["x", "x"])
    with pytest.raises(SlmError, match="n-grams"):
        TfidfBaseline(min_df=5).fit(["alpha", "beta"], ["x", "y"])


def read_jsonl(path: Path) -> tuple[list[str], list[str]]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r["text"] for r in rows], [r["label"] for r in rows]


@pytest.mark.slow
def test_banking77_accuracy(shared_datasets: Path) -> None:
    """Measured 91.3% (train -> test); ENVIRONMENT.md reports 91.5% for the same recipe."""
    train_texts, train_labels = read_jsonl(shared_datasets / "banking77" / "train.jsonl")
    test_texts, test_labels = read_jsonl(shared_datasets / "banking77" / "test.jsonl")
    model = TfidfBaseline().fit(train_texts, train_labels)
    accuracy = float(np.mean(model.predict(test_texts) == np.array(test_labels)))
    assert accuracy > 0.88
