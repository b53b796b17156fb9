"""Augmented copies: perturbed, reproducible, traceable to their source text."""

from smallmighty.distill.augment import augment_texts

TEXTS = ["how do i top up my card", "my card was declined at the shop", "where is my refund"]


def test_copies_are_perturbed_variants_of_their_source():
    out = augment_texts(TEXTS, 5, mask_token="[MASK]", seed=1)
    assert 0 < len(out) <= 15
    corpus = {w for t in TEXTS for w in t.split()} | {"[MASK]"}
    for index, text in out:
        assert text != TEXTS[index]
        assert set(text.split()) <= corpus
        assert len(text.split()) <= len(TEXTS[index].split())
    assert any("[MASK]" in text for _, text in out)


def test_same_seed_same_copies_other_seed_other_copies():
    assert augment_texts(TEXTS, 3, mask_token="[MASK]", seed=0) == augment_texts(TEXTS, 3, mask_token="[MASK]", seed=0)
    assert augment_texts(TEXTS, 3, mask_token="[MASK]", seed=0) != augment_texts(TEXTS, 3, mask_token="[MASK]", seed=1)


def test_zero_copies_gives_nothing():
    assert augment_texts(TEXTS, 0, mask_token="[MASK]") == []
