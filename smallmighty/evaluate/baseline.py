"""A strong classical baseline: TF-IDF n-grams plus logistic regression.

Every report card carries this row so a distilled student has to beat something cheap and honest, not
only a teacher. Word 1-2 grams catch intent phrases ("top up", "card arrive"); character 2-5 grams
within word boundaries catch misspellings and morphology, which short user queries are full of.
Its regularisation is chosen on the validation split (`fit_on_validation`), as the neural models'
training length is, so it is configured at its best without looking at test.
On BANKING77 it reaches about 91% test accuracy in under a minute on two CPU cores.
"""

from __future__ import annotations

from typing import Callable, Hashable, Sequence

import numpy as np

from smallmighty.errors import SlmError

#: Inverse regularisation strengths tried on the validation split.
C_GRID = (1.0, 3.0, 10.0, 30.0, 100.0)


class TfidfBaseline:
    """TF-IDF (word 1-2 grams + char_wb 2-5 grams, sublinear tf) feeding a multinomial logistic regression.

    `C` (inverse regularisation) is best chosen per task with `fit_on_validation`; `C=10`, the default
    for a plain `fit`, suits intent data, whose sparse n-gram features are many but each weak.
    `min_df=2` drops n-grams seen once, which roughly halves the features without costing accuracy.
    """

    def __init__(self, *, C: float = 10.0, min_df: int = 2, max_iter: int = 2000) -> None:
        self.C, self.min_df, self.max_iter = C, min_df, max_iter
        self._features = None
        self._model = None

    def fit(self, texts: Sequence[str], labels: Sequence[Hashable]) -> "TfidfBaseline":
        """Fit on raw texts and their labels (ids or names; `predict` returns the same kind) at `self.C`."""
        matrix = self._fit_features(texts, labels)
        self._model = self._fit_model(matrix, labels)
        return self

    def fit_on_validation(self, texts: Sequence[str], labels: Sequence[Hashable], validation_texts: Sequence[str],
                          score: Callable[[np.ndarray], float], grid: Sequence[float] = C_GRID) -> dict:
        """Fit on the training texts once per `C` in `grid`, keep the one whose predictions on
        `validation_texts` `score` best (ties: the first, so list `grid` from strong to weak
        regularisation), and set `self.C` to it.

        Returns {"C": chosen, "scores": {C: validation score}}."""
        matrix = self._fit_features(texts, labels)
        held_out = self._features.transform(list(validation_texts))
        scores: dict[float, float] = {}
        best = None
        for C in grid:
            self.C = C
            model = self._fit_model(matrix, labels)
            scores[C] = float(score(model.predict(held_out)))
            if best is None or scores[C] > scores[best[0]]:
                best = (C, model)
        self.C, self._model = best
        return {"C": self.C, "scores": scores}

    def _fit_features(self, texts: Sequence[str], labels: Sequence[Hashable]):
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.pipeline import FeatureUnion

        if len(texts) != len(labels):
            raise SlmError(f"{len(texts)} texts but {len(labels)} labels; they must match one to one")
        if len(set(labels)) < 2:
            raise SlmError("the baseline needs at least two distinct labels in the training data")
        features = FeatureUnion([
            ("word", TfidfVectorizer(analyzer="word", ngram_range=(1, 2), sublinear_tf=True, min_df=self.min_df)),
            ("char", TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True,
                                     min_df=self.min_df)),
        ])
        try:
            matrix = features.fit_transform(list(texts))
        except ValueError as exc:  # raised when every n-gram falls under min_df
            raise SlmError(f"the baseline found no usable n-grams in {len(texts)} training texts: {exc}") from exc
        self._features = features
        return matrix

    def _fit_model(self, matrix, labels: Sequence[Hashable]):
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(C=self.C, max_iter=self.max_iter).fit(matrix, list(labels))

    def predict(self, texts: Sequence[str]) -> np.ndarray:
        """Predicted label for each raw text."""
        if self._model is None:
            raise SlmError("the TF-IDF baseline must be fitted before it can predict")
        return self._model.predict(self._features.transform(list(texts)))

    @property
    def num_features(self) -> int:
        """Size of the n-gram vocabulary the classifier weighs (the baseline's closest thing to a size)."""
        if self._features is None:
            raise SlmError("the TF-IDF baseline has no features before it is fitted")
        return sum(len(vec.vocabulary_) for _, vec in self._features.transformer_list)
