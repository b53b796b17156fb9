"""Text augmentation for distillation: more inputs for the teacher to label.

A small student trained on a few thousand examples sees too little of the input space to copy its
teacher well; the teacher can label any text, so we show the student perturbed copies of the
training texts labelled by the teacher's soft targets (Tang et al. 2019, "Distilling Task-Specific
Knowledge from BERT into Simple Neural Networks"). Per word: mask it, or swap in a random word of
the training corpus; per copy, sometimes keep only a random n-gram. The copies carry no hard label.
"""

from __future__ import annotations

import random

P_MASK = 0.1
P_SWAP = 0.1
P_NGRAM = 0.25
MAX_NGRAM = 5


def augment_texts(texts: list[str], copies: int, *, mask_token: str, seed: int = 0) -> list[tuple[int, str]]:
    """`copies` perturbed variants of every text, as (index of the source text, variant).

    Variants identical to their source are dropped, so the result can hold fewer than
    `copies * len(texts)` items.
    """
    rng = random.Random(seed)
    corpus = [word for text in texts for word in text.split()]
    out: list[tuple[int, str]] = []
    for index, text in enumerate(texts):
        words = text.split()
        if not words:
            continue
        for _ in range(copies):
            variant = []
            for word in words:
                roll = rng.random()
                if roll < P_MASK:
                    variant.append(mask_token)
                elif roll < P_MASK + P_SWAP:
                    variant.append(rng.choice(corpus))
                else:
                    variant.append(word)
            if len(variant) > 1 and rng.random() < P_NGRAM:
                n = rng.randint(1, min(MAX_NGRAM, len(variant)))
                start = rng.randrange(len(variant) - n + 1)
                variant = variant[start:start + n]
            joined = " ".join(variant)
            if joined != text:
                out.append((index, joined))
    return out
