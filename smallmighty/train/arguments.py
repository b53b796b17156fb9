"""Command-line flags for optimisation settings and recipe files (LitGPT-style configs as data)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def add_train_arguments(parser: argparse.ArgumentParser, *, epochs: int | None, lr: float, batch_size: int = 32,
                        max_length: int | str | None = 64) -> argparse._ArgumentGroup:
    """Add the optimisation flags; returns their group. `epochs=None` makes the default length a
    budget from the data size (train.budget), stopped early on the validation split;
    `max_length="auto"` reads it from the data (train.lengths), `max_length=None` leaves out --max-length."""
    group = parser.add_argument_group("training")
    group.add_argument("--epochs", type=int, default=epochs,
                       help=f"passes over the training data (default: {epochs or AUTO_EPOCHS})")
    group.add_argument("--lr", type=float, default=lr, help=f"peak learning rate, AdamW (default: {lr})")
    group.add_argument("--batch-size", type=int, default=batch_size, help=f"examples per step (default: {batch_size})")
    if max_length is not None:
        group.add_argument("--max-length", type=int, default=None if max_length == "auto" else max_length,
                           help=f"tokens kept per text (default: {AUTO_LENGTH if max_length == 'auto' else max_length})")
    group.add_argument("--max-steps", type=int, default=0, metavar="N",
                       help="train for exactly N optimizer steps instead of --epochs (default: 0, off)")
    group.add_argument("--grad-accum", type=int, default=1, metavar="K",
                       help="micro-batches per optimizer step: K x --batch-size examples per step at the "
                            "memory of one micro-batch (default: 1)")
    group.add_argument("--patience", type=int, default=None, metavar="N",
                       help="stop after N validation scores without a gain, 0 = never (default: 3 with a fine-tuned model's "
                            "automatic budget; a distilled student's budget, --epochs and --max-steps run in full); "
                            "the best-scoring weights are kept")
    group.add_argument("--eval-every", type=int, default=0, metavar="N",
                       help="optimizer steps between validation scores (default: each epoch's end; a twentieth of "
                            "a classifier's automatic budget, a tenth of its --max-steps)")
    group.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    group.add_argument("--checkpoint-every", type=int, default=200,
                       help="optimizer steps between checkpoints (default: 200; epochs always end with one)")
    group.add_argument("--resume", action="store_true", help="continue a killed run from its last checkpoint")
    add_recipe_argument(parser)
    return group


def add_recipe_argument(parser: argparse.ArgumentParser) -> None:
    """`--recipe FILE`: settings from a JSON file, under the flags typed on the command line."""
    parser.add_argument("--recipe", type=Path, default=None,
                        help="a JSON file of settings (keys are this command's flag names with "
                             "underscores); flags typed on the command line win")


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


AUTO_EPOCHS = ("auto: a step budget from the data size (at least 600 steps, at most 3,000), stopped early on "
               "the validation split")
AUTO_LENGTH = ("auto: 64 or 128, whichever holds 95%% of the training texts; longer texts are read at inference as "
               "up to 4 windows of it, their logits averaged. A length given here reads the first N tokens")


def train_config_from_args(args: argparse.Namespace, *, budget=None, n_examples: int = 0, mean_tokens: float = 0.0,
                           **overrides):
    """The `TrainConfig` the flags describe, `overrides` replacing fields. With `--epochs` and
    `--max-steps` left unset, `budget` (a `train.budget.Budget`) sets the length from `n_examples`
    texts of `mean_tokens` tokens; without a budget, such a command must give its own `epochs`."""
    from smallmighty.errors import SlmError
    from smallmighty.train.budget import budgeted
    from smallmighty.train.loop import TrainConfig

    settings = dict(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                    checkpoint_every=args.checkpoint_every, max_steps=args.max_steps, grad_accum=args.grad_accum,
                    eval_every=getattr(args, "eval_every", 0), patience=getattr(args, "patience", None) or 0)
    settings.update(overrides)
    automatic = settings["epochs"] is None and not args.max_steps
    if automatic and budget is None:
        raise SlmError("give --epochs or --max-steps")
    config = TrainConfig(**{**settings, "epochs": settings["epochs"] or 1})
    if automatic:
        config = budgeted(config, budget, n_examples, mean_tokens)
        if args.patience is not None:
            config.patience = args.patience
        if args.eval_every:
            config.eval_every = args.eval_every
    elif budget is not None and args.max_steps and not args.eval_every:
        config.eval_every = max(1, -(-args.max_steps // 10))
    return config


def apply_recipe(args: argparse.Namespace, parser: argparse.ArgumentParser, *,
                 other_settings: set[str] = frozenset()) -> argparse.Namespace:
    """Fill in settings from `--recipe`, each value checked against its flag's type and choices.

    A recipe describes a whole run, so a key in `other_settings` (settings of other commands:
    `slm eval` reading a `slm distill` recipe) is skipped; any other unknown key is an error.

    A recipe value replaces every setting not typed on the command line, even a typed value that
    equals the default. Which flags were typed is `args.typed_on_command_line`, which `slm`'s main
    sets (`smallmighty.cli.typed_settings`); without it (a Namespace built by hand), a setting
    still at its default counts as not typed. Applying a recipe twice changes nothing.
    """
    from smallmighty.errors import SlmError

    if not getattr(args, "recipe", None) or getattr(args, "recipe_applied", False):
        return args
    try:
        recipe = json.loads(args.recipe.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SlmError(f"recipe '{args.recipe}': {exc}") from None
    if not isinstance(recipe, dict):
        raise SlmError(f"recipe '{args.recipe}': expected a JSON object of settings")
    actions = {a.dest: a for a in parser._actions if a.dest not in (argparse.SUPPRESS, "help", "recipe")}
    unknown = sorted(set(recipe) - set(actions) - set(other_settings))
    if unknown:
        raise SlmError(f"recipe '{args.recipe}': unknown setting(s) {', '.join(unknown)}")
    typed = getattr(args, "typed_on_command_line", None)
    for key, value in recipe.items():
        if key not in actions:
            continue
        value = _recipe_value(args.recipe, key, value, actions[key])
        if typed is not None:
            was_typed = key in typed
        else:
            was_typed = getattr(args, key) != parser.get_default(key)
        if not was_typed:
            setattr(args, key, value)
    args.recipe_applied = True
    return args


def _recipe_value(recipe: Path, key: str, value: Any, action: argparse.Action) -> Any:
    """`value` as the flag behind `key` would parse it, or an error naming the key."""
    from smallmighty.errors import SlmError

    def bad(expected: str) -> SlmError:
        return SlmError(f"recipe '{recipe}': setting '{key}' must be {expected}, got {value!r}")

    def scalar(item: Any) -> Any:
        kind = action.type or str
        if kind is int and (not isinstance(item, int) or isinstance(item, bool)):
            raise bad("an integer")
        if kind is float:
            if not isinstance(item, (int, float)) or isinstance(item, bool):
                raise bad("a number")
            return float(item)
        if kind is int:
            return item
        if not isinstance(item, str):
            raise bad("a string")
        try:
            return kind(item)
        except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
            raise bad(f"valid ({exc})") from None

    if action.nargs == 0:  # a switch (--resume, --no-baseline)
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if value is None and action.default is None:
        return None
    if isinstance(action, argparse._AppendAction):
        if not isinstance(value, list):
            raise bad("a list")
        return [scalar(item) for item in value]
    value = scalar(value)
    if action.choices is not None and value not in action.choices:
        raise bad(f"one of {', '.join(map(str, action.choices))}")
    return value
