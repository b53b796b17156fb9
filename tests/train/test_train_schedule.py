"""The loop's schedule: step budgets, gradient accumulation, warm-up + cosine, evaluation with
best-weight selection and early stopping, and exact resume of all of it."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from smallmighty.errors import SlmError
from smallmighty.train.loop import TrainConfig, lr_factor, train


class Regression(nn.Module):
    """A linear model with an MSE loss, in the (loss, parts) form `train` expects."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(4, 1)

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        loss = (self.linear(batch["x"]).squeeze(-1) - batch["y"]).pow(2).mean()
        return loss, {}


def examples(n: int = 32) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1
    return [{"input_ids": [0] * 4, "x": x[i], "y": y[i]} for i in range(n)]


def collate(rows: list[dict]) -> dict:
    return {"x": torch.stack([r["x"] for r in rows]), "y": torch.stack([r["y"] for r in rows])}


def weights(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def test_lr_schedules() -> None:
    linear = TrainConfig(warmup_ratio=0.1)
    assert [round(lr_factor(s, 100, linear), 4) for s in (0, 9, 10, 55, 99)] == [0.0909, 0.9091, 1.0, 0.5, 0.0111]
    cosine = TrainConfig(warmup_ratio=0.1, schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(10, 100, cosine) == pytest.approx(1.0)
    assert lr_factor(55, 100, cosine) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(100, 100, cosine) == pytest.approx(0.1)
    assert lr_factor(32, 100, cosine) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 22 / 90)))
    with pytest.raises(SlmError, match="schedule must be"):
        TrainConfig(schedule="step").validate()


def test_max_steps_runs_exactly_that_many_steps_across_epochs(tmp_path) -> None:
    config = TrainConfig(epochs=1, batch_size=8, max_steps=10, lr=0.01, checkpoint_every=0)
    train(Regression(), examples(), collate, config, checkpoint_dir=tmp_path / "ckpt")
    import json

    state = json.loads((tmp_path / "ckpt" / "state.json").read_text())
    assert state["global_step"] == 10 and state["epoch"] == 2  # 4 steps per epoch: epochs 0, 1 and half of 2


def test_gradient_accumulation_equals_one_larger_batch() -> None:
    big = train(Regression(), examples(), collate, TrainConfig(epochs=2, batch_size=8, lr=0.05, warmup_ratio=0))
    accumulated = train(Regression(), examples(), collate,
                        TrainConfig(epochs=2, batch_size=4, grad_accum=2, lr=0.05, warmup_ratio=0))
    torch.testing.assert_close(weights(big.module), weights(accumulated.module))


def scripted_evaluation(scores: list[float], seen: list[torch.Tensor]):
    """An evaluate function returning the next of `scores` and remembering the weights it saw."""
    it = iter(scores)

    def evaluate(module: nn.Module) -> dict:
        seen.append(weights(module).clone())
        return {"accuracy": next(it)}

    return evaluate


def test_best_weights_are_restored_and_patience_stops_early() -> None:
    seen: list[torch.Tensor] = []
    config = TrainConfig(epochs=20, batch_size=8, lr=0.01, eval_every=2, patience=2)
    result = train(Regression(), examples(), collate, config, select="accuracy",
                   evaluate=scripted_evaluation([0.5, 0.7, 0.6, 0.65, 0.9, 0.9], seen))
    assert result.stopped_early
    assert [h["step"] for h in result.history] == [2, 4, 6, 8]  # no gain at 6 and 8: patience 2 is spent
    assert result.best["step"] == 4 and result.best["accuracy"] == 0.7
    torch.testing.assert_close(weights(result.module), seen[1])


def test_lower_is_better_selection() -> None:
    seen: list[torch.Tensor] = []
    result = train(Regression(), examples(), collate, TrainConfig(epochs=3, batch_size=8, lr=0.01),
                   select="accuracy", higher_is_better=False,
                   evaluate=scripted_evaluation([0.3, 0.1, 0.2], seen))
    assert [h["step"] for h in result.history] == [4, 8, 12]  # at each epoch's end by default
    assert result.best["step"] == 8 and not result.stopped_early
    torch.testing.assert_close(weights(result.module), seen[1])


def test_resume_after_a_crash_continues_the_evaluations_exactly(tmp_path) -> None:
    config = TrainConfig(epochs=6, batch_size=8, lr=0.01, eval_every=3, patience=0, checkpoint_every=3)
    scores = [0.1, 0.4, 0.3, 0.35, 0.2, 0.25, 0.3, 0.31]
    straight = train(Regression(), examples(), collate, config, select="accuracy",
                     evaluate=scripted_evaluation(scores, []))

    calls = []

    def crash_at_third(module: nn.Module) -> dict:
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed during the third evaluation, after the step-6 checkpoint
        return {"accuracy": scores[len(calls) - 1]}

    with pytest.raises(KeyboardInterrupt):
        train(Regression(), examples(), collate, config, checkpoint_dir=tmp_path / "ckpt", select="accuracy",
              evaluate=crash_at_third)
    resumed = train(Regression(), examples(), collate, config, checkpoint_dir=tmp_path / "ckpt", resume=True,
                    select="accuracy", evaluate=scripted_evaluation(scores[2:], []))
    assert resumed.history == straight.history
    assert resumed.best == straight.best and resumed.best["step"] == 6
    torch.testing.assert_close(weights(resumed.module), weights(straight.module))
