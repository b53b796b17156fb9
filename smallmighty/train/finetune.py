"""Fine-tune an encoder classifier on a task (`slm finetune`): the teacher side of distillation."""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from smallmighty.data.classification import LabelledTexts
from smallmighty.models.encoder import (
    count_parameters,
    load_encoder_classifier,
    save_classifier,
)
from smallmighty.train.batching import Collator, encode_texts, make_examples
from smallmighty.train.loop import TrainConfig, is_main_process, train


class ClassificationObjective(nn.Module):
    """Cross-entropy on the labels; wraps the model so the loss runs inside DDP's forward."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict) -> tuple:
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return F.cross_entropy(logits, batch["labels"]), {}


def checkpoint_dir_for(out_dir: str | Path) -> Path:
    """Checkpoints live beside the output, so replacing the output never touches them."""
    out_dir = Path(out_dir)
    return out_dir.with_name(out_dir.name + ".checkpoint")


def finetune_classifier(model_name_or_path: str, train_data: LabelledTexts, out_dir: str | Path, *,
                        config: TrainConfig, max_length: int = 64, resume: bool = False) -> Path:
    """Fine-tune `model_name_or_path` on `train_data` and save a standard HF classifier in `out_dir`."""
    torch.manual_seed(config.seed)  # the new classification head starts the same on every run and rank
    model, tokenizer = load_encoder_classifier(model_name_or_path, train_data.label_names)
    examples = make_examples(encode_texts(tokenizer, train_data.texts, max_length), train_data.labels)
    ckpt = checkpoint_dir_for(out_dir)
    objective = train(ClassificationObjective(model), examples, Collator(tokenizer.pad_token_id), config,
                      checkpoint_dir=ckpt, resume=resume, desc=f"fine-tune {Path(str(model_name_or_path)).name}").module
    if is_main_process():
        save_classifier(objective.model, tokenizer, out_dir, max_length=max_length,
                        meta={"recipe": "finetune", "base_model": str(model_name_or_path),
                              "params": count_parameters(objective.model), "train_examples": len(train_data),
                              "data": train_data.source, "train": asdict(config)})
        shutil.rmtree(ckpt, ignore_errors=True)
    return Path(out_dir)
