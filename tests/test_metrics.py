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


def test_selection_metric_turns_to_macro_f1_on_imbalanced_labels() -> None:
    from smallmighty.metrics import selection_metric

    assert selection_metric([0] * 50 + [1] * 50, 2) == "accuracy"
    assert selection_metric([0] * 87 + [1] * 13, 2) == "macro_f1"  # sms_spam's share of spam
    assert selection_metric([k for k in range(77) for _ in range(100 + k)], 77) == "accuracy"


def test_paired_margin_is_the_metric_difference_with_an_interval_around_it() -> None:
    import numpy as np

    from smallmighty.metrics import paired_margin

    rng = np.random.default_rng(0)
    truth = rng.integers(0, 4, 400)
    better = np.where(rng.random(400) < 0.9, truth, (truth + 1) % 4)
    worse = np.where(rng.random(400) < 0.7, truth, (truth + 1) % 4)
    names = list("abcd")
    for metric in ("accuracy", "macro_f1"):
        result = paired_margin(truth, better, worse, 4, metric=metric)
        expected = (classification_metrics(truth, better, names)[metric]
                    - classification_metrics(truth, worse, names)[metric])
        assert result["margin"] == pytest.approx(expected)
        low, high = result["ci95"]
        assert 0 < low < expected < high < 0.4  # a 20-point gap on 400 examples: clearly positive
    same = paired_margin(truth, better, better, 4)
    assert same["margin"] == 0 and same["ci95"] == [0, 0]  # paired: identical predictions have no spread
    with pytest.raises(SlmError, match="same examples"):
        paired_margin(truth, better[:10], worse, 4)
