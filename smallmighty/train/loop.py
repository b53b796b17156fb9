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
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from smallmighty.errors import SlmError
from smallmighty.io import restore_interrupted
from smallmighty.train.batching import length_grouped_order
from smallmighty.train.checkpoint import (
    TrainState,
    checkpoint_extra,
    load_best_weights,
    load_checkpoint,
    save_checkpoint,
)


@dataclass
class TrainConfig:
    """Optimisation settings shared by every recipe.

    Training length is `epochs` passes over the data, or exactly `max_steps` optimizer steps when
    that is set (the data then repeats as often as needed). With an `evaluate` function (see
    `train`), the model is scored every `eval_every` steps (0: at each epoch's end); the best-scoring
    weights are the ones returned, and `patience` > 0 stops after that many evaluations without a
    gain.
    """

    epochs: int = 3
    batch_size: int = 32
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    max_grad_norm: float = 1.0
    seed: int = 0
    checkpoint_every: int = 200  # optimizer steps between checkpoints; epochs always end with one
    max_steps: int = 0  # > 0: train for exactly this many optimizer steps, whatever `epochs` says
    grad_accum: int = 1  # micro-batches of `batch_size` per optimizer step
    schedule: str = "linear"  # decay after warm-up: "linear" to 0, or "cosine" to `min_lr_ratio` * lr
    min_lr_ratio: float = 0.0
    eval_every: int = 0
    patience: int = 0

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise SlmError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_steps", "eval_every", "patience", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise SlmError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if not self.lr > 0:
            raise SlmError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise SlmError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.schedule not in ("linear", "cosine"):
            raise SlmError(f"schedule must be 'linear' or 'cosine', got {self.schedule!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise SlmError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


def lr_factor(step: int, total: int, config: TrainConfig) -> float:
    """The learning rate at optimizer `step` of `total`, as a fraction of `config.lr`: linear warm-up
    over the first `warmup_ratio` of the steps, then linear or cosine decay."""
    warmup = int(total * config.warmup_ratio)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if config.schedule == "cosine":
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return max(0.0, 1 - progress)


@dataclass
class TrainResult:
    """What `train` returns: the module (with the best weights when there was an evaluation), every
    evaluation made (`{"step", "epoch", **metrics}`), the best one, and whether patience ran out."""

    module: nn.Module
    history: list[dict] = field(default_factory=list)
    best: dict | None = None
    stopped_early: bool = False
    step_ends: list[float] = field(default_factory=list)  # seconds from the start to each step's end (this process)


def is_main_process() -> bool:
    """True on the one process that writes outputs (always true outside distributed runs)."""
    from accelerate import PartialState

    # The first PartialState made fixes the process layout for the run: made without cpu=True on a
    # CPU machine, it sets up one process per rank instead of one distributed run under torchrun.
    return PartialState(cpu=not torch.cuda.is_available()).is_main_process


def wait_for_everyone() -> None:
    """Block until every process of a distributed run gets here (returns at once in one process)."""
    from accelerate import PartialState

    PartialState(cpu=not torch.cuda.is_available()).wait_for_everyone()


def _accelerator(grad_accum: int):
    from accelerate import Accelerator, DistributedDataParallelKwargs

    # Some recipes leave parts of a model out of the loss (a classifier head while matching hidden
    # states); DDP must then be told, or it waits forever for their gradients.
    return Accelerator(cpu=not torch.cuda.is_available(), gradient_accumulation_steps=grad_accum,
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])


class _Selection:
    """Keeps the best evaluation and a CPU copy of its weights; decides when patience runs out."""

    def __init__(self, select: str | None, higher_is_better: bool, patience: int) -> None:
        self.select, self.sign, self.patience = select, (1 if higher_is_better else -1), patience
        self.history: list[dict] = []
        self.best: dict | None = None
        self.best_weights: dict[str, torch.Tensor] | None = None

    def record(self, scores: dict, module: nn.Module) -> None:
        self.history.append(scores)
        if self.select is None:
            return
        if self.select not in scores:
            raise SlmError(f"the evaluation returned {sorted(scores)}, not the selection metric '{self.select}'")
        if self.best is None or self.sign * scores[self.select] > self.sign * self.best[self.select]:
            self.best = scores
            self.best_weights = {k: v.detach().clone() for k, v in module.state_dict().items()}

    def out_of_patience(self) -> bool:
        if not self.patience or self.best is None:
            return False
        return sum(1 for s in self.history if s["step"] > self.best["step"]) >= self.patience


def train(module: nn.Module, examples: Sequence[dict], collate: Callable, config: TrainConfig,
          *, checkpoint_dir: Path | None = None, resume: bool = False, desc: str = "train",
          evaluate: Callable[[nn.Module], dict[str, float]] | None = None, select: str | None = None,
          higher_is_better: bool = True, tokens_per_example: int = 0) -> TrainResult:
    """Train the parameters of `module` that require grad on `examples`.

    Each example holds "input_ids" (batches group texts of similar length, see
    `length_grouped_order`). `module(batch)` returns `(loss, parts)`, `parts` a dict of floats shown
    on the progress bar; the loss is computed inside `forward` so that DDP sees it and averages
    gradients across ranks.

    `evaluate(module)` (module in eval mode, no grad) returns metrics on held-out data; it runs on
    every rank, so all ranks see the same scores and stop together. With `select`, the weights with
    the best `select` score are restored at the end (see `TrainConfig` for when evaluations happen).
    With `checkpoint_dir`, a checkpoint (with the evaluations and best weights so far) is written every
    `config.checkpoint_every` steps and at each epoch end; `resume=True` continues from it exactly.
    With `tokens_per_example` (fixed-length rows, as in pretraining) the progress bar shows tokens/s.
    """
    config.validate()
    if select is not None and evaluate is None:
        raise SlmError("a selection metric needs an evaluate function")
    accelerator = _accelerator(config.grad_accum)
    params = [p for p in module.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    # The fused kernel: one pass over each parameter, 14 ms a step against the default (foreach)
    # one's 43 ms for 29M parameters on 2 cores (bench/train_parts.py).
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, fused=True)
    selection = _Selection(select, higher_is_better, config.patience)
    state = TrainState()
    if resume:
        if checkpoint_dir is not None:
            restore_interrupted(checkpoint_dir)
        if checkpoint_dir is None or not (checkpoint_dir / "state.json").exists():
            raise SlmError(f"--resume given but there is no checkpoint in '{checkpoint_dir}'")
        extra = checkpoint_extra(checkpoint_dir)
        saved = extra.get("config")
        if saved and saved != asdict(config):
            raise SlmError(f"the checkpoint in '{checkpoint_dir}' was made with other settings ({saved}); "
                           "resume with the same ones or start afresh without --resume")
        state = load_checkpoint(checkpoint_dir, module, optimizer)
        selection.history, selection.best = extra.get("history", []), extra.get("best")
        selection.best_weights = load_best_weights(checkpoint_dir)
    model, optimizer = accelerator.prepare(module, optimizer)

    lengths = [len(e["input_ids"]) for e in examples]
    per_step = config.batch_size * config.grad_accum * accelerator.num_processes
    steps_per_epoch = math.ceil(len(examples) / per_step)
    total_steps = config.max_steps or steps_per_epoch * config.epochs
    eval_every = config.eval_every or steps_per_epoch

    def checkpoint() -> None:
        if checkpoint_dir:
            _checkpoint(accelerator, model, optimizer, state, checkpoint_dir, config, selection)

    # An explicit `disable` overrides tqdm's own TQDM_DISABLE, so it is read here: logs of long runs
    # would otherwise fill with the bar's updates.
    quiet = os.environ.get("TQDM_DISABLE", "").lower() not in ("", "0", "false")
    progress = tqdm(total=total_steps, initial=state.global_step, desc=desc, unit="step",
                    disable=quiet or not accelerator.is_local_main_process, dynamic_ncols=True)
    stopped_early = False
    started, step_ends = time.perf_counter(), []
    model.train()
    epoch = state.epoch
    while state.global_step < total_steps and not stopped_early:
        # Group by what one optimizer step reads (every micro-batch on every rank), so a step's
        # texts have similar lengths and accumulating micro-batches equals one larger batch.
        order = length_grouped_order(lengths, per_step, torch.Generator().manual_seed(config.seed + epoch))
        loader = accelerator.prepare(DataLoader([examples[i] for i in order], batch_size=config.batch_size,
                                                shuffle=False, collate_fn=collate))
        skip = state.step_in_epoch * config.grad_accum if epoch == state.epoch else 0
        if skip:
            loader = accelerator.skip_first_batches(loader, skip)
        step_in_epoch = state.step_in_epoch if epoch == state.epoch else 0
        micro = 0
        for batch in loader:
            if micro == 0:  # a new optimizer step begins
                torch.manual_seed((config.seed * 1_000_003 + state.global_step) * accelerator.num_processes
                                  + accelerator.process_index)
                for group in optimizer.param_groups:
                    group["lr"] = config.lr * lr_factor(state.global_step, total_steps, config)
            with accelerator.accumulate(model):
                loss, parts = model(batch)
                if not torch.isfinite(loss):
                    raise SlmError(f"the loss became {loss.item()} at step {state.global_step}; "
                                   "lower the learning rate")
                accelerator.backward(loss)
                micro += 1
                if not accelerator.sync_gradients:  # every grad_accum micro-batches, and at the epoch's end
                    continue
                if config.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            micro = 0
            step_in_epoch += 1
            state = TrainState(epoch, step_in_epoch, state.global_step + 1)
            step_ends.append(time.perf_counter() - started)
            progress.update(1)
            shown = {k: f"{v:.4f}" for k, v in {"loss": loss.item(), **parts}.items()}
            if tokens_per_example and len(step_ends) > 1:
                recent = step_ends[-min(len(step_ends), 11):]  # the last ten steps
                shown["tok/s"] = f"{per_step * tokens_per_example * (len(recent) - 1) / (recent[-1] - recent[0]):.0f}"
            progress.set_postfix(shown)
            if evaluate and state.global_step % eval_every == 0:
                stopped_early = _evaluate(evaluate, model, accelerator, state, selection, progress)
            if stopped_early or state.global_step >= total_steps:
                break
            if config.checkpoint_every and state.global_step % config.checkpoint_every == 0:
                checkpoint()
        if not stopped_early and state.global_step < total_steps:
            epoch += 1
            state = TrainState(epoch, 0, state.global_step)
        checkpoint()
    progress.close()
    if evaluate and (not selection.history or selection.history[-1]["step"] != state.global_step):
        _evaluate(evaluate, model, accelerator, state, selection, progress)
    module = accelerator.unwrap_model(model)
    if selection.best_weights is not None:
        module.load_state_dict(selection.best_weights)
    module.eval()
    return TrainResult(module, selection.history, selection.best, stopped_early, step_ends)


def _evaluate(evaluate: Callable, model: nn.Module, accelerator, state: TrainState, selection: _Selection,
              progress) -> bool:
    """Score the model, record it; True when patience has run out."""
    model.eval()
    with torch.no_grad():
        scores = {"step": state.global_step, "epoch": state.epoch, **evaluate(accelerator.unwrap_model(model))}
    model.train()
    selection.record(scores, accelerator.unwrap_model(model))
    shown = ", ".join(f"{k} {v:.4f}" for k, v in scores.items() if k not in ("step", "epoch"))
    progress.write(f"step {state.global_step}: {shown}")
    return selection.out_of_patience()


def _checkpoint(accelerator, model, optimizer, state: TrainState, path: Path, config: TrainConfig,
                selection: _Selection) -> None:
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_checkpoint(path, accelerator.unwrap_model(model), optimizer, state,
                        {"config": asdict(config), "history": selection.history, "best": selection.best},
                        best_weights=selection.best_weights)
    accelerator.wait_for_everyone()
