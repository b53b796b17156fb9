"""Training checkpoints: written atomically, read back without unpickling anything foreign.

A checkpoint is a directory with the trainable module's weights (safetensors), the optimizer state
(torch.save of plain tensors, read back with `weights_only=True`) and `state.json` saying where
training stood. It replaces the previous checkpoint in one atomic exchange where the OS has one
(`io.atomic_path`; Linux), so a run killed at any moment leaves either the old checkpoint or the new
one, never half of one. Elsewhere the swap takes two renames; a kill between them leaves the old one
aside, and `--resume` puts it back (`io.restore_interrupted`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from smallmighty.errors import SlmError
from smallmighty.io import atomic_path


@dataclass
class TrainState:
    """Where training stands: finished epochs, steps into the current epoch, total optimizer steps."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0


def save_checkpoint(path: Path, module: nn.Module, optimizer: torch.optim.Optimizer, state: TrainState,
                    extra: dict | None = None, best_weights: dict[str, torch.Tensor] | None = None) -> None:
    """Write the checkpoint; `best_weights` (the best-scoring weights so far) go beside it."""
    with atomic_path(path) as tmp:
        tmp.mkdir()
        save_model(module, str(tmp / "model.safetensors"))
        if best_weights is not None:
            save_file({k: v.contiguous() for k, v in best_weights.items()}, str(tmp / "best.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({**state.__dict__, **(extra or {})}, indent=2) + "\n")


def load_checkpoint(path: Path, module: nn.Module, optimizer: torch.optim.Optimizer) -> TrainState:
    """Restore `module` and `optimizer` in place from `path` and return the saved `TrainState`."""
    state_file = path / "state.json"
    if not state_file.exists():
        raise SlmError(f"no checkpoint to resume from in '{path}'")
    try:
        raw = json.loads(state_file.read_text())
        load_model(module, str(path / "model.safetensors"))
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise SlmError(f"checkpoint '{path}' is unreadable or does not match this run: {exc}") from exc
    return TrainState(raw["epoch"], raw["step_in_epoch"], raw["global_step"])


def load_best_weights(path: Path) -> dict[str, torch.Tensor] | None:
    """The best-scoring weights saved with a checkpoint, if any."""
    best = path / "best.safetensors"
    return load_file(str(best)) if best.is_file() else None


def checkpoint_extra(path: Path) -> dict:
    """The run settings saved with a checkpoint (to check a resume uses the same ones)."""
    state_file = path / "state.json"
    return json.loads(state_file.read_text()) if state_file.exists() else {}
