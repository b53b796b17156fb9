"""Generation settings validation and the next-token chooser, on hand-made logits."""

from __future__ import annotations

import math

import pytest
import torch

from smallmighty.engine.sampling import GenerationSettings, TokenChooser
from smallmighty.errors import SlmError


@pytest.mark.parametrize("field,value", [
    ("max_new_tokens", 0), ("max_new_tokens", 2.5), ("max_new_tokens", True),
    ("temperature", -0.1), ("temperature", math.nan), ("temperature", "hot"),
    ("top_k", -1), ("top_k", 1.5),
    ("top_p", 0.0), ("top_p", 1.01),
    ("repetition_penalty", 0.0), ("repetition_penalty", math.inf),
    ("stop", "###"), ("stop", ("",)), ("stop", (3,)),
    ("seed", -1), ("seed", 1.0),
])
def test_invalid_settings_name_the_field(field, value):
    settings = GenerationSettings(**{field: value})
    with pytest.raises(SlmError, match=f"'{field}'"):
        settings.validate()


def test_valid_settings_pass():
    GenerationSettings().validate()
    GenerationSettings(max_new_tokens=1, temperature=0.7, top_k=40, top_p=0.9,
                       repetition_penalty=1.2, stop=("\n\n", "User:"), seed=0).validate()


LOGITS = torch.tensor([[1.0, 3.0, 2.0, 0.5, -1.0],
                       [0.0, -2.0, 4.0, 3.9, 1.0]])


def test_greedy_is_argmax_and_top_k_1_is_greedy_at_any_temperature():
    assert TokenChooser(GenerationSettings(), [[0], [0]], 5)(LOGITS).tolist() == [1, 2]
    chooser = TokenChooser(GenerationSettings(temperature=5.0, top_k=1, seed=0), [[0], [0]], 5)
    for _ in range(20):
        assert chooser(LOGITS).tolist() == [1, 2]


def test_seeded_sampling_repeats_and_follows_softmax():
    def draws(seed: int) -> list[int]:
        chooser = TokenChooser(GenerationSettings(temperature=1.0, seed=seed), [[0]], 5)
        return [chooser(LOGITS[:1]).item() for _ in range(4000)]

    first = draws(11)
    assert draws(11) == first and draws(12) != first
    freq = torch.bincount(torch.tensor(first), minlength=5).float() / len(first)
    torch.testing.assert_close(freq, LOGITS[0].softmax(-1), atol=0.03, rtol=0)


def test_top_k_and_top_p_keep_only_the_likely_tokens():
    chooser = TokenChooser(GenerationSettings(temperature=2.0, top_k=2, seed=0), [[0]], 5)
    assert {chooser(LOGITS[:1]).item() for _ in range(300)} == {1, 2}
    # Row 1: token 2 holds 0.51 of the mass and token 3 0.46; top_p 0.6 keeps token 2 and the
    # one that crosses 0.6 (token 3), never the rest.
    chooser = TokenChooser(GenerationSettings(temperature=1.0, top_p=0.6, seed=0), [[0]], 5)
    assert {chooser(LOGITS[1:]).item() for _ in range(300)} == {2, 3}


def test_repetition_penalty_demotes_seen_tokens_from_prompt_and_output():
    settings = GenerationSettings(repetition_penalty=2.0)
    chooser = TokenChooser(settings, [[1], [4]], 5)
    # Row 0: token 1 (3.0) is in the prompt and drops to 1.5, so token 2 (2.0) wins.
    # Row 1: token 4 was seen but row 1's best (token 2) was not, so it still wins.
    assert chooser(LOGITS).tolist() == [2, 2]
    # Now token 2 is seen in both rows: row 0 compares 3.0 / 2 with 2.0 / 2 and 1.0 and keeps
    # token 1; row 1 compares 4.0 / 2 with 3.9 and picks token 3.
    assert chooser(LOGITS).tolist() == [1, 3]
