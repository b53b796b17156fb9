"""One training loop for fine-tuning and distillation, run through Hugging Face Accelerate.

The same code runs in one process on a laptop or on many processes and machines
(`ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 ...` on CPUs, `accelerate launch` on GPUs):
Accelerate shards the batches and averages gradients, so every rank holds the same weights.

Determinism and resume: each epoch's example order comes from `seed + epoch`, and the random state
is re-seeded before every step from `(seed, global_step, rank)`, so a run resumed from a checkpoint
takes exactly the steps the uninterrupted run would have taken.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from smallmighty.errors import SlmError
from smallmighty.train.batching import length_grouped_order
from smallmighty.train.checkpoint import (
    TrainState,
    checkpoint_extra,
    load_checkpoint,
    save_checkpoint,
)


@dataclass
class TrainConfig:
    """Optimisation settings shared by every recipe."""

    epochs: int = 3
    batch_size: int = 32
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    max_grad_norm: float = 1.0
    seed: int = 0
    checkpoint_every: int = 200  # optimizer steps between checkpoints; epochs always end with one

    def validate(self) -> None:
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise SlmError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise SlmError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise SlmError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")


def is_main_process() -> bool:
    """True on the one process that writes outputs (always true outside distributed runs)."""
    from accelerate import PartialState

    return PartialState().is_main_process


def _accelerator():
    from accelerate import Accelerator, DistributedDataParallelKwargs

    # Some recipes leave parts of a model out of the loss (a classifier head while matching hidden
    # states); DDP must then be told, or it waits forever for their gradients.
    return Accelerator(cpu=not torch.cuda.is_available(),
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])


def train(module: nn.Module, examples: Sequence[dict], collate: Callable, config: TrainConfig,
          *, checkpoint_dir: Path | None = None, resume: bool = False, desc: str = "train") -> nn.Module:
    """Train the parameters of `module` that require grad on `examples`.

    Each example holds "input_ids" (batches group texts of similar length, see
    `length_grouped_order`). `module(batch)` returns `(loss, parts)`, `parts` a dict of floats shown
    on the progress bar; the loss is computed inside `forward` so that DDP sees it and averages
    gradients across ranks.
    Returns the trained module (unwrapped). With `checkpoint_dir`, a checkpoint is written every
    `config.checkpoint_every` steps and at each epoch end; `resume=True` continues from it.
    """
    config.validate()
    accelerator = _accelerator()
    params = [p for p in module.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.lr)
    state = TrainState()
    if resume:
        if checkpoint_dir is None or not (checkpoint_dir / "state.json").exists():
            raise SlmError(f"--resume given but there is no checkpoint in '{checkpoint_dir}'")
        saved = checkpoint_extra(checkpoint_dir).get("config")
        if saved and saved != asdict(config):
            raise SlmError(f"the checkpoint in '{checkpoint_dir}' was made with other settings ({saved}); "
                           "resume with the same ones or start afresh without --resume")
        state = load_checkpoint(checkpoint_dir, module, optimizer)
    model, optimizer = accelerator.prepare(module, optimizer)

    lengths = [len(e["input_ids"]) for e in examples]
    steps_per_epoch = math.ceil(len(examples) / (config.batch_size * accelerator.num_processes))
    total_steps = steps_per_epoch * config.epochs
    warmup = int(total_steps * config.warmup_ratio)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    progress = tqdm(total=total_steps, initial=state.global_step, desc=desc, unit="step",
                    disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    model.train()
    for epoch in range(state.epoch, config.epochs):
        order = length_grouped_order(lengths, config.batch_size * accelerator.num_processes,
                                     torch.Generator().manual_seed(config.seed + epoch))
        loader = accelerator.prepare(DataLoader([examples[i] for i in order], batch_size=config.batch_size,
                                                shuffle=False, collate_fn=collate))
        start = state.step_in_epoch if epoch == state.epoch else 0
        if start:
            loader = accelerator.skip_first_batches(loader, start)
        for step_in_epoch, batch in enumerate(loader, start=start):
            torch.manual_seed((config.seed * 1_000_003 + state.global_step) * accelerator.num_processes
                              + accelerator.process_index)
            for group in optimizer.param_groups:
                group["lr"] = config.lr * lr_at(state.global_step)
            loss, parts = model(batch)
            if not torch.isfinite(loss):
                raise SlmError(f"the loss became {loss.item()} at step {state.global_step}; lower the learning rate")
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            if config.max_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            state = TrainState(epoch, step_in_epoch + 1, state.global_step + 1)
            progress.update(1)
            progress.set_postfix({k: f"{v:.4f}" for k, v in {"loss": loss.item(), **parts}.items()})
            if checkpoint_dir and config.checkpoint_every and state.global_step % config.checkpoint_every == 0:
                _checkpoint(accelerator, model, optimizer, state, checkpoint_dir, config)
        state = TrainState(epoch + 1, 0, state.global_step)
        if checkpoint_dir:
            _checkpoint(accelerator, model, optimizer, state, checkpoint_dir, config)
    progress.close()
    model.eval()
    return accelerator.unwrap_model(model)


def _checkpoint(accelerator, model, optimizer, state: TrainState, path: Path, config: TrainConfig) -> None:
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_checkpoint(path, accelerator.unwrap_model(model), optimizer, state, {"config": asdict(config)})
    accelerator.wait_for_everyone()
