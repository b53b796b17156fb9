"""Chat fine-tuning of a causal LM (`slm finetune` on conversations): full or LoRA, merged on save.

The conversations are rendered with the model's own chat template, the loss covers the assistant's
tokens only, and short conversations are packed into full rows (`smallmighty.data.chat`). Training
runs in the shared loop (`train.loop.train`): checkpoints, `resume`, several processes. With held-out
conversations, the model is scored on them (perplexity of the assistant tokens) during training and
the best-scoring weights are kept.

The output is always a plain Hugging Face folder: LoRA adapters are merged into the weights on save
(`models.lora`), so `slm chat --model <out>`, our engine and transformers load it as they load the
base model.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from smallmighty.data.chat import IGNORE, ChatData, encode_conversations, pack_examples
from smallmighty.models.causal_lm import load_hf_causal_lm, save_causal_lm
from smallmighty.models.encoder import count_parameters
from smallmighty.models.lora import LoraSettings, add_lora, merge_lora, trainable_parameters
from smallmighty.train.finetune import checkpoint_dir_for
from smallmighty.train.loop import TrainConfig, is_main_process, train


class CausalLMObjective(nn.Module):
    """Next-token cross-entropy on the tokens whose label is not `IGNORE` (transformers shifts the
    labels); `position_ids` keep packed conversations apart."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict) -> tuple:
        out = self.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"],
                         use_cache=False)
        return out.loss, {}


@dataclass
class ChatCollator:
    """Pads rows to the longest in the batch: ids with `pad_token_id`, labels with `IGNORE`, and
    positions counting from 0 again, so padding forms its own block that no real token attends to
    (no attention mask needed, which is what lets transformers see the packed blocks)."""

    pad_token_id: int

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        positions = torch.arange(width).repeat(len(rows), 1)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            labels[i, :n] = torch.tensor(r["labels"])
            positions[i, :n] = torch.tensor(r.get("position_ids") or list(range(n)))
            positions[i, n:] = torch.arange(width - n)
        return {"input_ids": ids, "labels": labels, "position_ids": positions}


@torch.no_grad()
def answer_perplexity(model: nn.Module, examples: list[dict], pad_token_id: int, batch_size: int = 16) -> float:
    """exp(mean negative log-likelihood) of the labelled (assistant) tokens of `examples`."""
    collate = ChatCollator(pad_token_id)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start:start + batch_size])
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        targets = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(),
                                                ignore_index=IGNORE, reduction="sum")
        total += nll.item()
        count += int((targets != IGNORE).sum())
    model.train(was_training)
    return math.exp(total / max(count, 1))


def finetune_chat(model_name_or_path: str | None, train_data: ChatData, out_dir: str | Path, *,
                  config: TrainConfig, lora: LoraSettings | None = None, max_length: int = 512,
                  pack: bool = True, validation: ChatData | None = None, resume: bool = False,
                  strict: bool = False, meta: dict[str, Any] | None = None) -> Path:
    """Fine-tune a causal LM on conversations and save a plain HF folder in `out_dir`.

    `lora` None trains every weight; otherwise adapters with those settings train and are merged
    on save. `validation` conversations, when given, are scored every `config.eval_every` steps (or
    each epoch) and the best weights are kept.
    """
    torch.manual_seed(config.seed)  # LoRA's random A matrices start the same on every run and rank
    model, tokenizer = load_hf_causal_lm(model_name_or_path)
    examples = encode_conversations(tokenizer, train_data, max_length, strict=strict)
    rows = pack_examples(examples, max_length) if pack else examples
    for line in filter(None, [train_data.skip_report()]):
        print(line)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    params = count_parameters(model)
    if lora is not None:
        model = add_lora(model, lora)
    evaluate = None
    if validation is not None:
        held = encode_conversations(tokenizer, validation, max_length, strict=strict)
        evaluate = lambda objective: {"answer_ppl": answer_perplexity(objective.model, held, pad)}  # noqa: E731
    tokens = sum(int(sum(1 for t in r["labels"] if t != IGNORE)) for r in rows)
    print(f"chat fine-tuning: {len(examples)} conversations ({tokens} assistant tokens) in {len(rows)} rows of "
          f"<= {max_length} tokens; {'LoRA' if lora else 'all'} weights, "
          f"{trainable_parameters(model):,} of {params:,} parameters train")
    ckpt = checkpoint_dir_for(out_dir)
    result = train(CausalLMObjective(model), rows, ChatCollator(pad), config, checkpoint_dir=ckpt, resume=resume,
                   desc=f"chat fine-tune ({'LoRA' if lora else 'full'})", evaluate=evaluate,
                   select="answer_ppl" if evaluate else None, higher_is_better=False)
    tuned = result.module.model
    if is_main_process():
        if lora is not None:
            tuned = merge_lora(tuned)
        save_causal_lm(tuned, tokenizer, out_dir, meta={
            "recipe": "chat-finetune", "base_model": str(model_name_or_path), "params": params,
            "method": "lora" if lora else "full", "lora": lora.as_dict() if lora else None,
            "train_conversations": len(examples), "train_assistant_tokens": tokens, "max_length": max_length,
            "packed": pack, "data": train_data.source, "skipped": dict(train_data.skipped), "train": asdict(config),
            "history": result.history, "best": result.best, **(meta or {})})
        shutil.rmtree(ckpt, ignore_errors=True)
    return Path(out_dir)
