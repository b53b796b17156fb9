"""Perplexity of a causal language model on a text, with the standard sliding-window recipe.

Windows of `context` tokens start every `stride` tokens; each window scores only the tokens the
previous windows did not, using the ones before them as context. `stride == context` scores every
token once with no overlap (fastest); a smaller stride gives each token more context (lower, fairer
perplexity, slower). This is the recipe transformers documents, so figures compare with theirs.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from tqdm import tqdm

from smallmighty.errors import SlmError

if TYPE_CHECKING:
    from smallmighty.engine.generate import Engine
    from smallmighty.engine.model import LlamaModel


@torch.inference_mode()
def perplexity(engine_or_model: "Engine | LlamaModel", text_or_ids: str | list[int], *,
               context: int = 512, stride: int | None = None, max_tokens: int | None = None,
               progress: bool = True) -> float:
    """exp(mean negative log-likelihood) of the tokens after the first, scored left to right.

    `text_or_ids` is raw text (needs an Engine, for its tokenizer) or token ids. `stride` defaults
    to `context`. `max_tokens` keeps only the first tokens, for a quicker estimate on a subset.
    """
    from smallmighty.engine.model import LlamaModel

    if isinstance(engine_or_model, LlamaModel):
        model = engine_or_model
        if isinstance(text_or_ids, str):
            raise SlmError("perplexity of raw text needs an Engine (for its tokenizer); "
                           "give token ids to score a bare model")
        ids = list(text_or_ids)
    else:
        model = engine_or_model.model
        ids = engine_or_model.encode(text_or_ids) if isinstance(text_or_ids, str) else list(text_or_ids)
    stride = context if stride is None else stride
    if not isinstance(context, int) or context < 2:
        raise SlmError(f"context must be an integer >= 2, got {context!r}")
    if not isinstance(stride, int) or not 1 <= stride <= context:
        raise SlmError(f"stride must be an integer in [1, context={context}], got {stride!r}")
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise SlmError(f"perplexity needs at least 2 tokens, got {len(ids)}")
    if context > model.config.context_limit:
        raise SlmError(f"context {context} exceeds the model's {model.config.context_limit} positions")
    tokens = torch.tensor(ids)
    rope = model.rope(context)[None, :, None]
    total_nll, scored, prev_end = 0.0, 0, 0
    starts = range(0, len(ids), stride)
    for begin in tqdm(starts, desc="perplexity", unit="window", disable=not progress, leave=False):
        end = min(begin + context, len(ids))
        window = tokens[begin:end]
        logits = model(window[None], model.new_cache(1, len(window)), 0, rope[:, : len(window)],
                       last_only=False)[0]
        # Score targets in (prev_end, end): position p predicts token p + 1.
        first = max(prev_end, begin + 1) - begin
        nll = F.cross_entropy(logits[first - 1:-1].float(), window[first:], reduction="sum")
        total_nll += nll.item()
        scored += len(window) - first
        prev_end = end
        if end == len(ids):
            break
    return math.exp(total_nll / scored)
