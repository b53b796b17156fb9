"""Tokenized examples and padded batches for encoder training and evaluation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


def encode_texts(tokenizer, texts: Sequence[str], max_length: int, batch: int = 2048) -> list[list[int]]:
    """Token ids for each text, truncated to `max_length` (no padding: batches pad on the fly)."""
    ids: list[list[int]] = []
    for i in range(0, len(texts), batch):
        ids.extend(tokenizer(list(texts[i:i + batch]), truncation=True, max_length=max_length)["input_ids"])
    return ids


@dataclass
class Collator:
    """Pads a list of examples ({"input_ids", "label", "index"}) to the longest one in the batch."""

    pad_token_id: int

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(e["input_ids"]) for e in examples)
        input_ids = torch.full((len(examples), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for row, e in enumerate(examples):
            input_ids[row, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
            mask[row, : len(e["input_ids"])] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": mask,
            "labels": torch.tensor([e["label"] for e in examples]),
            "index": torch.tensor([e["index"] for e in examples]),
        }


def make_examples(token_ids: list[list[int]], labels: Sequence[int]) -> list[dict]:
    return [{"input_ids": ids, "label": int(y), "index": i} for i, (ids, y) in enumerate(zip(token_ids, labels))]
