"""Fine-tune an encoder classifier on a task (`slm finetune`): the teacher side of distillation.

Training is scored on the validation split as it goes: the best-scoring weights are the ones saved
(and, with a patience, training stops once the score no longer improves), so neither the training
length nor the checkpoint is ever chosen by looking at the test split.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from smallmighty.data.classification import LabelledTexts, source_key
from smallmighty.metrics import classification_metrics, selection_metric
from smallmighty.models.encoder import (
    count_parameters,
    load_encoder_classifier,
    save_classifier,
)
from smallmighty.train.batching import Collator, encode_texts, make_examples
from smallmighty.train.loop import TrainConfig, TrainResult, is_main_process, train


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


def validation_scorer(classifier_of: Callable[[nn.Module], nn.Module], tokenizer, data: LabelledTexts,
                      max_length: int, batch_size: int = 64) -> Callable[[nn.Module], dict]:
    """An `evaluate` function for `train`: accuracy and macro-F1 of `classifier_of(module)` on `data`.

    Texts are tokenized once and scored in batches of similar length (little padding)."""
    ids = encode_texts(tokenizer, data.texts, max_length)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    collate = Collator(tokenizer.pad_token_id)
    batches = [collate(make_examples([ids[i] for i in order[s:s + batch_size]], [0] * len(order[s:s + batch_size])))
               for s in range(0, len(order), batch_size)]
    truth = [data.labels[i] for i in order]

    def score(module: nn.Module) -> dict:
        model = classifier_of(module)
        device = next(model.parameters()).device
        predicted = []
        for batch in batches:
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device)).logits
            predicted += logits.argmax(-1).tolist()
        metrics = classification_metrics(truth, predicted, data.label_names)
        return {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"]}

    return score


def selection_record(result: TrainResult, metric: str, validation: LabelledTexts, config: TrainConfig) -> dict:
    """What chose the saved weights, for the model's metadata and the report card."""
    return {"split": "validation", "validation_examples": len(validation), "metric": metric,
            "best_step": result.best["step"] if result.best else None,
            "best_validation": ({k: result.best[k] for k in ("accuracy", "macro_f1")} if result.best else None),
            "steps_run": result.history[-1]["step"] if result.history else None,
            "max_steps": config.max_steps or None, "stopped_early": result.stopped_early,
            "history": [{k: round(v, 5) if isinstance(v, float) else v for k, v in h.items()} for h in result.history]}


def finetune_classifier(model_name_or_path: str, train_data: LabelledTexts, out_dir: str | Path, *,
                        config: TrainConfig, validation: LabelledTexts, max_length: int = 64, windows: int = 1,
                        resume: bool = False) -> Path:
    """Fine-tune `model_name_or_path` on `train_data` and save a standard HF classifier in `out_dir`.

    Training reads the first `max_length` tokens of each text; the saved model reads up to `windows`
    windows of that length at inference (train.lengths). The weights saved are those that scored
    best on `validation` (macro-F1 when the training labels are imbalanced, else accuracy); the
    model's smallmighty.json records the settings and that choice.
    """
    torch.manual_seed(config.seed)  # the new classification head starts the same on every run and rank
    model, tokenizer = load_encoder_classifier(model_name_or_path, train_data.label_names)
    examples = make_examples(encode_texts(tokenizer, train_data.texts, max_length), train_data.labels)
    ckpt = checkpoint_dir_for(out_dir)
    metric = selection_metric(train_data.labels, len(train_data.label_names))
    result = train(ClassificationObjective(model), examples, Collator(tokenizer.pad_token_id), config,
                   checkpoint_dir=ckpt, resume=resume, desc=f"fine-tune {Path(str(model_name_or_path)).name}",
                   evaluate=validation_scorer(lambda m: m.model, tokenizer, validation, max_length), select=metric)
    if is_main_process():
        save_classifier(result.module.model, tokenizer, out_dir, max_length=max_length,
                        meta={"recipe": "finetune", "base_model": str(model_name_or_path), "windows": windows,
                              "params": count_parameters(result.module.model), "train_examples": len(train_data),
                              "data": source_key(train_data.source), "train": asdict(config),
                              "selection": selection_record(result, metric, validation, config)})
        shutil.rmtree(ckpt, ignore_errors=True)
    return Path(out_dir)
