"""A strong classical baseline: TF-IDF n-grams plus logistic regression.

Every report card carries this row so a distilled student has to beat something cheap and honest, not
only a teacher. Word 1-2 grams catch intent phrases ("top up", "card arrive"); character 2-5 grams
within word boundaries catch misspellings and morphology, which short user queries are full of.
On BANKING77 it reaches about 91% test accuracy in under a minute on two CPU cores.
"""

from __future__ import annotations

from typing import Hashable, Sequence

import numpy as np

from smallmighty.errors import SlmError


class TfidfBaseline:
    """TF-IDF (word 1-2 grams + char_wb 2-5 grams, sublinear tf) feeding a multinomial logistic regression.

    `C=10` regularises lightly: the sparse n-gram features are many but each is weak, and on intent
    data a weaker penalty measured better than scikit-learn's default `C=1`. `min_df=2` drops n-grams
    seen once, which roughly halves the features without costing accuracy.
    """

    def __init__(self, *, C: float = 10.0, min_df: int = 2, max_iter: int = 2000) -> None:
        self.C, self.min_df, self.max_iter = C, min_df, max_iter
        self._features = None
        self._model = None

    def fit(self, texts: Sequence[str], labels: Sequence[Hashable]) -> "TfidfBaseline":
        """Fit on raw texts and their labels (ids or names; `predict` returns the same kind)."""
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
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
        model = LogisticRegression(C=self.C, max_iter=self.max_iter)
        model.fit(matrix, list(labels))
        self._features, self._model = features, model
        return self

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
