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

import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from smallmighty.data.chat import IGNORE_INDEX, ChatData, encode_conversations, pack_examples
from smallmighty.models.causal_lm import load_hf_causal_lm
from smallmighty.models.decoder import save_decoder
from smallmighty.models.encoder import count_parameters
from smallmighty.models.lora import LoraSettings, add_lora, merge_lora, trainable_parameters
from smallmighty.train.causal_lm import CausalLMCollator, CausalLMObjective, perplexity_evaluator
from smallmighty.train.finetune import checkpoint_dir_for
from smallmighty.train.loop import TrainConfig, is_main_process, train


def answer_perplexity(model: nn.Module, examples: list[dict], pad_token_id: int) -> float:
    """exp(mean negative log-likelihood) of the labelled (assistant) tokens of `examples`, in fp32."""
    objective = CausalLMObjective(model, precision="fp32")
    was_training = model.training
    model.eval()
    with torch.no_grad():
        scores = perplexity_evaluator(examples, CausalLMCollator(pad_token_id))(objective)
    model.train(was_training)
    return scores["val_ppl"]


def finetune_chat(model_name_or_path: str | None, train_data: ChatData, out_dir: str | Path, *,
                  config: TrainConfig, lora: LoraSettings | None = None, max_length: int = 512,
                  pack: bool = True, validation: ChatData | None = None, resume: bool = False,
                  strict: bool = False, precision: str = "auto", meta: dict[str, Any] | None = None) -> Path:
    """Fine-tune a causal LM on conversations and save a plain HF folder in `out_dir`.

    `lora` None trains every weight; otherwise adapters with those settings train and are merged
    on save. `validation` conversations, when given, are scored every `config.eval_every` steps (or
    each epoch) and the best weights are kept. `precision` is the objective's (`train.causal_lm`):
    "auto" trains under bf16 autocast where the CPU has native bf16.
    """
    torch.manual_seed(config.seed)  # LoRA's random A matrices start the same on every run and rank
    model, tokenizer = load_hf_causal_lm(model_name_or_path)
    examples = encode_conversations(tokenizer, train_data, max_length, strict=strict)
    rows = pack_examples(examples, max_length) if pack else examples
    if train_data.skipped:
        print(train_data.skip_report())
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    params = count_parameters(model)
    if lora is not None:
        model = add_lora(model, lora)
    collate = CausalLMCollator(pad)
    evaluate = None
    if validation is not None:
        evaluate = perplexity_evaluator(encode_conversations(tokenizer, validation, max_length, strict=strict), collate)
    tokens = sum(int(sum(1 for t in r["labels"] if t != IGNORE_INDEX)) for r in rows)
    print(f"chat fine-tuning: {len(examples)} conversations ({tokens} assistant tokens) in {len(rows)} rows of "
          f"<= {max_length} tokens; {'LoRA' if lora else 'all'} weights, "
          f"{trainable_parameters(model):,} of {params:,} parameters train")
    ckpt = checkpoint_dir_for(out_dir)
    result = train(CausalLMObjective(model, precision=precision), rows, collate, config, checkpoint_dir=ckpt,
                   resume=resume, desc=f"chat fine-tune ({'LoRA' if lora else 'full'})", evaluate=evaluate,
                   select="val_loss" if evaluate else None, higher_is_better=False)
    tuned = result.module.model
    if is_main_process():
        if lora is not None:
            tuned = merge_lora(tuned)
        save_decoder(tuned, tokenizer, out_dir, meta={
            "recipe": "chat-finetune", "base_model": str(model_name_or_path), "params": params,
            "method": "lora" if lora else "full", "lora": lora.as_dict() if lora else None,
            "train_conversations": len(examples), "train_assistant_tokens": tokens, "max_length": max_length,
            "packed": pack, "precision": result.module.precision, "data": train_data.source,
            "skipped": dict(train_data.skipped), "train": asdict(config), "history": result.history,
            "best": result.best, **(meta or {})})
        shutil.rmtree(ckpt, ignore_errors=True)
    return Path(out_dir)
