"""Task metrics for classifiers: accuracy and macro-F1 over the full label set.

Macro-F1 is averaged over *every* label in `label_names`, not only those that happen to occur in the
predictions or the test split: a student that never predicts a rare intent must pay for it, and two
models evaluated on the same labels must be averaged over the same classes to be comparable.
"""

from __future__ import annotations

from typing import Sequence

from smallmighty.errors import SlmError


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], label_names: list[str]) -> dict:
    """Return {"accuracy", "macro_f1", "n"} for integer label ids indexing `label_names`.

    Classes with no true and no predicted examples score F1 = 0 (`zero_division=0`), which keeps the
    average over all labels rather than silently dropping them.
    """
    from sklearn.metrics import accuracy_score, f1_score

    if len(y_true) != len(y_pred):
        raise SlmError(f"{len(y_true)} true labels but {len(y_pred)} predictions; they must match one to one")
    if len(y_true) == 0:
        raise SlmError("no examples to score: the evaluation set is empty")
    if not label_names:
        raise SlmError("no label names given")
    num_labels = len(label_names)
    for which, values in (("true", y_true), ("predicted", y_pred)):
        bad = next((int(v) for v in values if not 0 <= int(v) < num_labels), None)
        if bad is not None:
            raise SlmError(f"{which} label id {bad} is outside the {num_labels} known labels (0..{num_labels - 1})")
    y_true = [int(v) for v in y_true]
    y_pred = [int(v) for v in y_pred]
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=list(range(num_labels)), average="macro",
                                   zero_division=0)),
        "n": len(y_true),
    }


#: Below this share of evenly spread classes (the exponential of the label entropy over the number of
#: labels), classes count as imbalanced: sms_spam (87% ham) is at 0.74, banking77 at 0.97, sst2 at 0.99.
BALANCED_SHARE = 0.9


def selection_metric(labels: Sequence[int], num_labels: int) -> str:
    """The metric that picks checkpoints and settings for data with these training labels.

    Accuracy on roughly balanced classes; macro-F1 when the classes are imbalanced, where accuracy
    rewards a model for neglecting the rare classes that often matter most (spam, fraud, a rare intent).
    """
    import math
    from collections import Counter

    counts = Counter(int(label) for label in labels)
    total = sum(counts.values())
    if num_labels < 2 or not total:
        return "accuracy"
    entropy = -sum(c / total * math.log(c / total) for c in counts.values())
    return "macro_f1" if math.exp(entropy) / num_labels < BALANCED_SHARE else "accuracy"


def _scores(truth, predicted, num_labels: int, metric: str):
    """`metric` ("accuracy" or "macro_f1") of each row of `predicted` [rows, n] against `truth` (same
    shape), vectorised over the rows."""
    import numpy as np

    correct = predicted == truth
    if metric == "accuracy":
        return correct.mean(axis=1)
    offsets = np.arange(len(truth))[:, None] * num_labels

    def per_class(labels, mask):  # [rows, num_labels] counts of `labels` where `mask`
        counts = np.bincount((offsets + labels)[mask], minlength=len(truth) * num_labels)
        return counts.reshape(len(truth), num_labels)

    tp, fp, fn = per_class(truth, correct), per_class(predicted, ~correct), per_class(truth, ~correct)
    denominator = 2 * tp + fp + fn
    return np.divide(2 * tp, denominator, out=np.zeros(tp.shape), where=denominator > 0).mean(axis=1)


def paired_margin(y_true: Sequence[int], first: Sequence[int], second: Sequence[int], num_labels: int, *,
                  metric: str = "accuracy", resamples: int = 1000, seed: int = 0) -> dict:
    """How much better `first`'s predictions score than `second`'s on the same examples, with a 95%
    paired bootstrap interval: both are scored on the same resamples of the examples, so what the
    two models get right together does not widen the interval.

    Returns {"metric", "margin", "ci95": [low, high], "resamples"}: the margin is first minus second
    in the metric's units (0.01 is one point)."""
    import numpy as np

    if metric not in ("accuracy", "macro_f1"):
        raise SlmError(f"unknown metric {metric!r}; use accuracy or macro_f1")
    truth, a, b = (np.asarray(v, dtype=np.int64) for v in (y_true, first, second))
    if not (len(truth) == len(a) == len(b)) or not len(truth):
        raise SlmError(f"paired predictions must cover the same examples ({len(truth)}, {len(a)}, {len(b)})")

    def difference(rows):  # first minus second on each row of example indices
        return _scores(truth[rows], a[rows], num_labels, metric) - _scores(truth[rows], b[rows], num_labels, metric)

    rng = np.random.default_rng(seed)
    spread = np.concatenate([difference(rng.integers(0, len(truth), size=(min(200, resamples - done), len(truth))))
                             for done in range(0, resamples, 200)])
    low, high = np.quantile(spread, [0.025, 0.975])
    return {"metric": metric, "margin": float(difference(np.arange(len(truth))[None])[0]),
            "ci95": [float(low), float(high)], "resamples": resamples}
