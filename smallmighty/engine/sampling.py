"""Generation settings and the next-token chooser: greedy, temperature, top-k, top-p, repetition penalty.

The order of logit transforms follows transformers (penalty, temperature, top-k, top-p) so that a
setting means the same thing here as there. Sampling draws from a `torch.Generator` seeded from
`seed`, so the same prompts and settings give the same tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from smallmighty.errors import SlmError


@dataclass
class GenerationSettings:
    """How to pick new tokens and when to stop.

    `temperature` 0 means greedy (always the most likely token; top-k/top-p are then unused).
    `top_k` 0 and `top_p` 1.0 switch those filters off. `repetition_penalty` > 1 makes tokens that
    already occur in the prompt or output less likely. Generation stops at an end-of-sequence
    token, at any string of `stop` (which is cut from the text), or after `max_new_tokens`.
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def validate(self) -> None:
        """Raise `SlmError` naming the first invalid field."""

        def bad(field: str, rule: str, value: object) -> SlmError:
            return SlmError(f"generation setting '{field}' {rule}, got {value!r}")

        def is_int(value: object) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def is_number(value: object) -> bool:
            return (isinstance(value, (int, float)) and not isinstance(value, bool)
                    and math.isfinite(value))

        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise bad("max_new_tokens", "must be an integer >= 1", self.max_new_tokens)
        if not is_number(self.temperature) or self.temperature < 0:
            raise bad("temperature", "must be a finite number >= 0 (0 = greedy)", self.temperature)
        if not is_int(self.top_k) or self.top_k < 0:
            raise bad("top_k", "must be an integer >= 0 (0 = off)", self.top_k)
        if not is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1] (1 = off)", self.top_p)
        if not is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "must be a finite number > 0 (1 = off)",
                      self.repetition_penalty)
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "must be a list of non-empty strings", self.stop)
        if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise bad("seed", "must be an integer in [0, 2**63) or None", self.seed)


class TokenChooser:
    """Picks one next token per row from logits, keeping the per-row state penalties need."""

    def __init__(self, settings: GenerationSettings, prompts: list[list[int]], vocab_size: int) -> None:
        self.settings = settings
        self.generator: torch.Generator | None = None
        if settings.temperature > 0:
            self.generator = torch.Generator()
            if settings.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(settings.seed)
        self.seen: torch.Tensor | None = None
        if settings.repetition_penalty != 1.0:
            self.seen = torch.zeros(len(prompts), vocab_size, dtype=torch.bool)
            for row, prompt in enumerate(prompts):
                self.seen[row, prompt] = True

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Next token ids [B] for logits [B, V]; also records them for the repetition penalty."""
        s = self.settings
        logits = logits.float()
        if self.seen is not None:
            penalized = torch.where(logits < 0, logits * s.repetition_penalty,
                                    logits / s.repetition_penalty)
            logits = torch.where(self.seen, penalized, logits)
        if self.generator is None:
            chosen = logits.argmax(dim=-1)
        else:
            chosen = self._sample(logits / s.temperature)
        if self.seen is not None:
            self.seen[torch.arange(len(chosen)), chosen] = True
        return chosen

    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        s = self.settings
        if 0 < s.top_k < logits.shape[-1]:
            kth = torch.topk(logits, s.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, -math.inf)
        if s.top_p < 1.0:
            ordered, order = torch.sort(logits, dim=-1, descending=True)
            probs = ordered.softmax(dim=-1)
            # Drop a token when the tokens ranked above it already hold top_p of the mass; the
            # most likely token always stays.
            drop = (probs.cumsum(dim=-1) - probs) > s.top_p
            logits = logits.scatter(-1, order, ordered.masked_fill(drop, -math.inf))
        probs = logits.softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)
