"""Next-token prediction for the training loop: loss, batches and validation perplexity.

Shared by pretraining (packed rows, every token a target), chat fine-tuning (labels set to
`IGNORE_INDEX` outside the assistant's turns) and causal-LM distillation (the hard-label term).
The loss is computed inside the objective's `forward`, as the loop requires, so DDP sees it.

Speed on CPU (30M parameters, 256 tokens, batch 8, 2 cores with avx512_bf16; bench/README.md):
`precision="bf16"` runs the forward and backward under bf16 autocast (matrix products in bf16 where the
CPU has native bf16 instructions; weights and optimizer state stay fp32): 1.8x fp32. Attention runs
as `train.attention.TRAINING_ATTENTION` while training (transformers' eager attention, two batched
matrix products and a softmax, with the scores kept in bf16): eager is 8% faster per step than the
SDPA kernel at these lengths, whose CPU backward is slow, and keeping its scores in bf16 gains 13-21%
more (the saved model keeps SDPA for inference; the choice is not part of its config). For
architectures whose logits are a plain `lm_head` (`PLAIN_HEAD_ARCHITECTURES`), the loss comes from
the last hidden state through `train.linear_cross_entropy`, which never makes the full fp32 logits.
`compile=True` hands the forward and loss to `torch.compile`: measured, it gained little after a
40 s compile, so it is off by default. The loop's AdamW is the fused one. Figures: bench/train_parts.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from smallmighty.data.chat import IGNORE_INDEX  # a position that is not a target (padding, a chat prompt)
from smallmighty.errors import SlmError
from smallmighty.train.attention import TRAINING_ATTENTION, register_training_attention
from smallmighty.train.linear_cross_entropy import linear_cross_entropy

PRECISIONS = ("auto", "bf16", "fp32")
# Architectures whose logits are exactly `lm_head(decoder(...).last_hidden_state)`: no soft-capping,
# scaling or bias (Gemma's soft-capping, for one, would make the fused loss wrong), so their loss can
# be computed by `linear_cross_entropy` from the last hidden state.
PLAIN_HEAD_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each position's prediction of the next label, in fp32.

    `logits` [B, T, V] at positions 0..T-1 predict `labels` at 1..T; labels equal to `IGNORE_INDEX`
    are not targets. (The same shift and mean as transformers' `labels=` loss.)
    """
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                           ignore_index=IGNORE_INDEX)


def plain_output_layer(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """`(decoder, output layer)` of a model of a `PLAIN_HEAD_ARCHITECTURES` class (plain, or wrapped
    with LoRA, whose adapters sit inside the decoder's layers) whose output layer is a bias-free
    `nn.Linear`; None for any other model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if type(base).__name__ not in PLAIN_HEAD_ARCHITECTURES:
        return None
    head = base.get_output_embeddings()
    return (base.model, head) if type(head) is nn.Linear and head.bias is None else None


def cpu_has_bf16() -> bool:
    """True when this CPU multiplies bf16 natively (AVX512-BF16 or AMX), where bf16 autocast pays."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            flags = next((line for line in handle if line.startswith("flags")), "")
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def resolve_precision(precision: str) -> str:
    """"auto" becomes "bf16" on CPUs with native bf16 (or a CUDA GPU that has it), else "fp32"."""
    if precision not in PRECISIONS:
        raise SlmError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_bf16() else "fp32"


@dataclass
class CausalLMCollator:
    """Stacks examples (`{"input_ids"}`, optionally `{"labels"}` and `{"position_ids"}`) into a batch.

    Rows of equal length (packed pretraining data) stack as they are and need no attention mask, so
    attention takes its fast causal path. Ragged rows (chat turns) are right-padded with
    `pad_token_id`, labelled `IGNORE_INDEX` there, and get an attention mask. Rows that carry
    `position_ids` (conversations packed by `data.chat.pack_examples`, positions restarting at each
    one) get none: their padding continues as a block of its own (positions from 0 again), and
    transformers reads the restarts as separate sequences only when no attention mask is given.
    """

    pad_token_id: int

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        ids = [torch.as_tensor(e["input_ids"], dtype=torch.long) for e in examples]
        labels = [torch.as_tensor(e["labels"], dtype=torch.long) if "labels" in e else i
                  for e, i in zip(examples, ids)]
        positions = None
        if any("position_ids" in e for e in examples):
            positions = [torch.as_tensor(e["position_ids"], dtype=torch.long) if "position_ids" in e
                         else torch.arange(len(i)) for e, i in zip(examples, ids)]
        width = max(len(i) for i in ids)
        if all(len(i) == width for i in ids):
            batch = {"input_ids": torch.stack(ids), "labels": torch.stack(labels)}
            if positions is not None:
                batch["position_ids"] = torch.stack(positions)
            return batch
        batch = {"input_ids": torch.full((len(ids), width), self.pad_token_id, dtype=torch.long),
                 "labels": torch.full((len(ids), width), IGNORE_INDEX, dtype=torch.long)}
        if positions is None:
            batch["attention_mask"] = torch.zeros((len(ids), width), dtype=torch.long)
        else:
            batch["position_ids"] = torch.arange(width).repeat(len(ids), 1)
        for row, (i, y) in enumerate(zip(ids, labels)):
            batch["input_ids"][row, :len(i)] = i
            batch["labels"][row, :len(y)] = y
            if positions is None:
                batch["attention_mask"][row, :len(i)] = 1
            else:
                batch["position_ids"][row, :len(i)] = positions[row]
                batch["position_ids"][row, len(i):] = torch.arange(width - len(i))
        return batch


class CausalLMObjective(nn.Module):
    """Wraps a causal LM (`model(input_ids, attention_mask).logits`) so `forward(batch)` returns the
    loop's `(loss, parts)`; the wrapped model is `.model`."""

    def __init__(self, model: nn.Module, *, precision: str = "fp32", compile: bool = False,
                 attention: str | None = TRAINING_ATTENTION) -> None:
        super().__init__()
        self.model = model
        self.precision = resolve_precision(precision)
        if attention == TRAINING_ATTENTION:
            register_training_attention()
        if attention is not None:  # None: keep the model's own
            model.set_attn_implementation(attention)
        self._plain = plain_output_layer(model)  # (decoder, output layer) for the blocked loss, or None
        self._loss = torch.compile(self.batch_loss) if compile else self.batch_loss

    def batch_loss(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   position_ids: torch.Tensor | None = None) -> torch.Tensor:
        device = input_ids.device.type
        # No KV cache while training; without one, transformers also reads restarting
        # `position_ids` as packed sequences, each attending to itself only.
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
                  "use_cache": False}
        bf16 = self.precision == "bf16"
        plain = self._plain
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            out = (self.model if plain is None else plain[0])(**inputs)
        if plain is None:
            return causal_lm_loss(out.logits, labels)
        hidden = out.last_hidden_state
        return linear_cross_entropy(hidden[:, :-1].flatten(0, 1), plain[1].weight, labels[:, 1:].flatten(),
                                    ignore_index=IGNORE_INDEX, dtype=torch.bfloat16 if bf16 else hidden.dtype)

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        return self._loss(batch["input_ids"], batch["labels"], batch.get("attention_mask"),
                          batch.get("position_ids")), {}


def targets_in(labels: torch.Tensor) -> int:
    """How many positions of a batch's `labels` are scored by `causal_lm_loss`."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def perplexity_evaluator(rows: Sequence[dict] | torch.Tensor, collate: Callable, batch_size: int = 8,
                         ) -> Callable[[CausalLMObjective], dict[str, float]]:
    """An `evaluate` function for `train`: the objective's token-weighted mean loss over `rows`
    (validation examples, or a tensor of packed rows) as `val_loss` and its `val_ppl`."""
    if isinstance(rows, torch.Tensor):
        rows = [{"input_ids": row} for row in rows]
    if not rows:
        raise SlmError("validation perplexity needs at least one validation row")
    batches = [collate(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]

    def evaluate(objective: CausalLMObjective) -> dict[str, float]:
        device = next(objective.parameters()).device
        total, count = 0.0, 0
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            n = targets_in(batch["labels"])
            loss, _ = objective(batch)
            total += loss.item() * n
            count += n
        mean = total / max(1, count)
        return {"val_loss": mean, "val_ppl": math.exp(min(mean, 50.0))}

    return evaluate
