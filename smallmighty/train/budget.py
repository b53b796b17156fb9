"""How long to train when the user does not say: a step budget from the size of the data, cut short
by early stopping on the validation split.

Why not a fixed number of epochs: three epochs are about 90 optimizer steps on a thousand texts (an
undertrained model: a teacher at 77% where TF-IDF reached 99.6%) and 6,000 steps on 67,000 texts (an
hour of CPU for no gain). So the budget is `epochs` passes over the data, but never fewer than
`min_steps` (small data needs many passes) nor more than `max_steps`, nor more than `max_tokens`
tokens read (long documents cost many times more per step). Within it the model is scored on the
validation split `evaluations` times; training stops after `patience` scores without a gain (0: never),
and the best-scoring weights are kept. The constants were chosen by sweeps over several datasets, scored on
validation only (see bench/README.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from smallmighty.train.loop import TrainConfig


@dataclass(frozen=True)
class Budget:
    """The rule that turns a dataset's size into a training length (see the module docstring)."""

    epochs: float
    min_steps: int
    max_steps: int
    max_tokens: int
    evaluations: int = 20
    patience: int = 3

    def steps(self, n_examples: int, examples_per_step: int, mean_tokens: float) -> int:
        """Optimizer steps for `n_examples` texts of `mean_tokens` tokens on average."""
        by_epochs = math.ceil(self.epochs * n_examples / examples_per_step)
        by_tokens = self.max_tokens // max(1.0, examples_per_step * mean_tokens)
        return max(1, min(max(by_epochs, self.min_steps), self.max_steps, int(by_tokens)))


#: Fine-tuning a pretrained teacher.
TEACHER_BUDGET = Budget(epochs=10, min_steps=600, max_steps=3000, max_tokens=1_500_000)
#: Distilling a student from the teacher's logits: a smaller model, so more tokens for the same time.
#: Students are cheap, so they run their whole budget (the best-scoring weights are still kept): on
#: banking77 (validation, 3 seeds) a patience of 3 stopped one seed at step 1,410 of 2,813 on a
#: passing plateau (91.1%) that the full run left for 92.4%; mean 92.0% -> 92.5% (bench/README.md).
STUDENT_BUDGET = Budget(epochs=10, min_steps=600, max_steps=3000, max_tokens=3_000_000, patience=0)


def budgeted(config: TrainConfig, budget: Budget, n_examples: int, mean_tokens: float) -> TrainConfig:
    """`config` with its length set by `budget` for this data: `max_steps`, `eval_every`, `patience`."""
    steps = budget.steps(n_examples, config.batch_size * config.grad_accum, mean_tokens)
    return replace(config, max_steps=steps, eval_every=max(1, math.ceil(steps / budget.evaluations)),
                   patience=budget.patience)
