"""Command-line flags for optimisation settings and recipe files (LitGPT-style configs as data)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_train_arguments(parser: argparse.ArgumentParser, *, epochs: int, lr: float, batch_size: int = 32,
                        max_length: int | None = 64) -> argparse._ArgumentGroup:
    """Add the optimisation flags (`max_length=None` leaves out --max-length); returns their group."""
    group = parser.add_argument_group("training")
    group.add_argument("--epochs", type=int, default=epochs, help=f"passes over the training data (default: {epochs})")
    group.add_argument("--lr", type=float, default=lr, help=f"peak learning rate, AdamW (default: {lr})")
    group.add_argument("--batch-size", type=int, default=batch_size, help=f"examples per step (default: {batch_size})")
    if max_length is not None:
        group.add_argument("--max-length", type=int, default=max_length,
                           help=f"tokens kept per text (default: {max_length})")
    group.add_argument("--max-steps", type=int, default=0, metavar="N",
                       help="train for exactly N optimizer steps instead of --epochs (default: 0, off)")
    group.add_argument("--grad-accum", type=int, default=1, metavar="K",
                       help="micro-batches per optimizer step: K x --batch-size examples per step at the "
                            "memory of one micro-batch (default: 1)")
    group.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    group.add_argument("--checkpoint-every", type=int, default=200,
                       help="optimizer steps between checkpoints (default: 200; epochs always end with one)")
    group.add_argument("--resume", action="store_true", help="continue a killed run from its last checkpoint")
    parser.add_argument("--recipe", type=Path, default=None,
                        help="a JSON file of settings (keys are these flags' names with underscores); "
                             "flags given on the command line win")
    return group


def add_chat_tuning_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of chat fine-tuning (`slm finetune` on conversations, `slm distill --method answers`)."""
    group = parser.add_argument_group("chat fine-tuning (causal LMs)")
    group.add_argument("--lora", action="store_true",
                       help="train LoRA adapters instead of every weight; they are merged into the weights on "
                            "save, so the output is a plain model folder (default: full fine-tuning)")
    group.add_argument("--lora-rank", type=int, default=16, help="LoRA rank r (default: 16)")
    group.add_argument("--lora-alpha", type=float, default=32.0, help="LoRA scale alpha; updates are scaled by "
                       "alpha / r (default: 32)")
    group.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA input (default: 0)")
    group.add_argument("--lora-targets", default="all-linear", metavar="NAMES",
                       help="comma-separated module names to adapt, e.g. q_proj,v_proj (default: all-linear, every "
                            "linear layer of the blocks)")
    group.add_argument("--no-pack", dest="pack", action="store_false",
                       help="one conversation per row (default: short conversations packed into full rows, each "
                            "attending to itself only)")
    group.add_argument("--strict-data", action="store_true",
                       help="stop at the first conversation that would be skipped (one ending on a user turn, or "
                            "longer than --max-length) instead of counting and reporting them")


def lora_settings_from_args(args: argparse.Namespace):
    """The LoRA settings the flags ask for, or None for full fine-tuning."""
    from smallmighty.models.lora import LoraSettings

    if not args.lora:
        return None
    targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    return LoraSettings(rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout, target_modules=targets)


def train_config_from_args(args: argparse.Namespace, **overrides):
    from smallmighty.train.loop import TrainConfig

    return TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                       checkpoint_every=args.checkpoint_every, max_steps=args.max_steps,
                       grad_accum=args.grad_accum, **overrides)


def apply_recipe(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Fill in settings from `--recipe`: a recipe value replaces a flag left at its default, so
    flags typed on the command line still win."""
    from smallmighty.errors import SlmError

    if not getattr(args, "recipe", None):
        return args
    try:
        recipe = json.loads(args.recipe.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SlmError(f"recipe '{args.recipe}': {exc}") from exc
    if not isinstance(recipe, dict):
        raise SlmError(f"recipe '{args.recipe}': expected a JSON object of settings")
    unknown = sorted(set(recipe) - set(vars(args)))
    if unknown:
        raise SlmError(f"recipe '{args.recipe}': unknown setting(s) {', '.join(unknown)}")
    for key, value in recipe.items():
        if getattr(args, key) == parser.get_default(key):
            setattr(args, key, value)
    return args
