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
