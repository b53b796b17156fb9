"""The attention used while training causal LMs: transformers' eager attention, its scores kept in the
dtype the matrix products give (bf16 under autocast) instead of going through fp32.

Eager attention adds the fp32 causal mask to the bf16 scores, which makes an fp32 copy of every
[batch, heads, tokens, tokens] score tensor, takes the softmax in fp32 and casts it back; the backward
pays the same casts again. Here the mask is cast once to the scores' dtype and the softmax reads and
writes that dtype (the CPU kernel still accumulates in fp32; its output is rounded to bf16 as eager's
is). On 2 cores, 30M parameters, 256 tokens, batch 8: a training step 1.13-1.21x faster than with
eager (bench/train_parts.py), which is itself faster there than SDPA, whose CPU backward is slow. In fp32 it computes
exactly what eager does. Registered with transformers' attention and mask interfaces under
`TRAINING_ATTENTION`, so `model.set_attn_implementation(TRAINING_ATTENTION)` selects it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

TRAINING_ATTENTION = "slm_eager"


def eager_in_scores_dtype(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                          **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' attention-function signature: `query` [B, H, T, D], `key`/`value` [B, KV, S, D]
    (KV divides H: grouped-query heads share theirs), an additive mask [B, 1, T, S] or None."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = (t.repeat_interleave(groups, dim=1) for t in (key, value))
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask.to(scores.dtype)
    weights = F.dropout(F.softmax(scores, dim=-1), p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def register_training_attention() -> str:
    """Make `TRAINING_ATTENTION` known to transformers (idempotent); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(TRAINING_ATTENTION, eager_in_scores_dtype)
    ALL_MASK_ATTENTION_FUNCTIONS.register(TRAINING_ATTENTION, eager_mask)
    return TRAINING_ATTENTION
