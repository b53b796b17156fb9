"""classification_metrics against values worked out by hand."""

from __future__ import annotations

import pytest

from smallmighty.errors import SlmError
from smallmighty.metrics import classification_metrics

LABELS = ["a", "b", "c", "d"]  # "d" never occurs: macro-F1 must still average over it


def test_hand_computed_accuracy_and_macro_f1() -> None:
    y_true = [0, 0, 1, 1, 2, 2]
    y_pred = [0, 1, 1, 1, 2, 0]
    # per class F1: a: P=1/2 R=1/2 -> 0.5; b: P=2/3 R=1 -> 0.8; c: P=1 R=1/2 -> 2/3; d: 0 (zero_division)
    m = classification_metrics(y_true, y_pred, LABELS)
    assert m["n"] == 6
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3 + 0.0) / 4)


def test_perfect_predictions_over_labels_present() -> None:
    m = classification_metrics([0, 1, 2], [0, 1, 2], ["x", "y", "z"])
    assert m == {"accuracy": 1.0, "macro_f1": 1.0, "n": 3}


@pytest.mark.parametrize(
    ("y_true", "y_pred", "match"),
    [([0, 1], [0], "must match"), ([], [], "empty"), ([0, 4], [0, 1], "outside"), ([0, 1], [0, -1], "outside")],
)
def test_bad_input_is_a_user_error(y_true: list[int], y_pred: list[int], match: str) -> None:
    with pytest.raises(SlmError, match=match):
        classification_metrics(y_true, y_pred, LABELS)
