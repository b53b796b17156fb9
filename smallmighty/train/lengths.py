"""How many tokens of each text an encoder reads, chosen from the training texts when not given.

A fixed 64 tokens suits short queries (banking77: 95% of texts fit in 34) but reads a tenth of a
news article, and an encoder that read 64 tokens then loses to a TF-IDF model that read all of
them. So the default is the smallest of `LENGTH_STEPS` that holds 95% of the training texts whole.
Training cost grows with the length, so the steps stop at 128; longer texts are then read at
inference as up to `MAX_WINDOWS` consecutive windows whose logits are averaged (engine.classifier).
On BBC News (median article 416 tokens) that took a MiniLM teacher trained on first windows from
about 95% to about 97.5% validation accuracy (bench/README.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from smallmighty.train.batching import encode_texts

#: The lengths the automatic choice picks from (tokens, special tokens included).
LENGTH_STEPS = (64, 128)
#: At most this many windows of a long text are read at inference.
MAX_WINDOWS = 4
#: Share of training texts that must fit whole.
COVERAGE = 0.95
#: Texts measured for the choice: a seeded sample is as good as all of them and takes a second.
SAMPLE = 4000


@dataclass
class TextLengths:
    """The tokens read per window (`max_length`), the windows read per text at inference, and the
    mean tokens a training text (its first window) costs."""

    max_length: int
    windows: int
    mean_tokens: float
    chosen: bool  # True when picked from the data rather than given


def text_lengths(tokenizer, texts: Sequence[str], max_length: int | None = None) -> TextLengths:
    """`max_length` (one window) if given, else the automatic choice and the windows that then cover
    95% of the texts (at most `MAX_WINDOWS`); and the mean truncated length."""
    sample = list(texts)
    if len(sample) > SAMPLE:
        rng = np.random.default_rng(0)
        sample = [sample[i] for i in sorted(rng.choice(len(sample), SAMPLE, replace=False))]
    lengths = np.array([len(ids) for ids in encode_texts(tokenizer, sample, LENGTH_STEPS[-1] * 8)])
    chosen = max_length is None
    needed = float(np.quantile(lengths, COVERAGE))
    if chosen:
        max_length = next((step for step in LENGTH_STEPS if step >= needed), LENGTH_STEPS[-1])
    # A length typed by the user is taken at its word: the first max_length tokens, one window.
    windows = max(1, min(MAX_WINDOWS, math.ceil(needed / max_length))) if chosen else 1
    return TextLengths(max_length, windows, float(np.minimum(lengths, max_length).mean()), chosen)
