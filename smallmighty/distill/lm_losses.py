"""Divergences between a teacher's and a student's next-token distributions, for causal-LM distillation.

The teacher is stored as its k most likely tokens plus one "tail" bucket holding the rest of its
probability mass (`TeacherTopK`), so a pass over the corpus can be cached once in a few bytes per
token. The student's full softmax is folded into the same k + 1 buckets: its probabilities of the
teacher's k tokens, and all the rest in its tail. Both are then proper distributions over the same
k + 1 outcomes, so every divergence below is well defined (reverse KL needs the teacher's
probability wherever the student puts mass), and with k equal to the vocabulary they are exactly
the full-vocabulary divergences.

- forward KL(p || q): the student covers every token the teacher deems likely (mode covering;
  DistilGPT2, MiniLM);
- reverse KL(q || p): the student puts its mass where the teacher is confident (mode seeking;
  MiniLLM);
- generalised Jensen-Shannon with beta (GKD, Agarwal et al. 2024):
  beta KL(p || m) + (1 - beta) KL(q || m) with m = beta p + (1 - beta) q, divided here by
  beta (1 - beta). That constant factor makes it continuous in beta: as beta -> 0 it tends to the
  forward KL and as beta -> 1 to the reverse KL, which are its values at 0 and 1.

All are computed at a temperature T (both distributions softened by T) and multiplied by T^2, as
`losses.soft_logit_kd` is, so loss weights keep their meaning across temperatures; they average
over the positions a mask selects, in at least float32 whatever the activations' precision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from smallmighty.errors import SlmError

#: Smallest tail probability taken a log of: the teacher's k tokens can hold all of its mass (k equal to the
#: vocabulary, or a confident teacher in float32), and log(0) would turn the divergences' gradients into NaN.
TAIL_FLOOR = 1e-30
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


@dataclass
class TeacherTopK:
    """The teacher's next-token distribution at one temperature, in k + 1 buckets.

    `log_probs` [..., k]: log-probabilities of its k most likely tokens; `indices` [..., k]: those
    tokens as *student* ids; `tail` [...]: log of the remaining probability mass.
    """

    log_probs: Tensor
    indices: Tensor
    tail: Tensor

    def to(self, device: torch.device) -> "TeacherTopK":
        return TeacherTopK(self.log_probs.to(device), self.indices.to(device), self.tail.to(device))


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, floored at log(TAIL_FLOOR)."""
    return torch.log(torch.clamp(-torch.expm1(x), min=TAIL_FLOOR))


def _check_temperature(temperature: float) -> None:
    if not (temperature > 0 and math.isfinite(temperature)):
        raise SlmError(f"the distillation temperature must be a finite number > 0, got {temperature}")


def teacher_topk(logits: Tensor, temperature: float, k: int, columns: Tensor | None = None) -> TeacherTopK:
    """Summarise teacher `logits` [..., V_teacher] as `TeacherTopK` at `temperature`.

    `columns` [V_student] (long) maps each student id to its teacher id when the student's vocabulary
    is a trimmed copy of the teacher's: the k tokens are then the likeliest tokens the student has,
    and mass on tokens it lacks (and on padding rows past the tokenizer) goes to the tail.
    """
    _check_temperature(temperature)
    log_probs = F.log_softmax(logits.float() / temperature, dim=-1)
    if columns is not None:
        log_probs = log_probs.index_select(-1, columns)
    top, indices = log_probs.topk(min(k, log_probs.shape[-1]), dim=-1)
    return TeacherTopK(top, indices, _log1mexp(torch.logsumexp(top, dim=-1)))


def bucket_log_probs(student_logits: Tensor, teacher: TeacherTopK, temperature: float) -> tuple[Tensor, Tensor]:
    """(teacher, student) log-probabilities over the k + 1 buckets, each [..., k + 1]."""
    _check_temperature(temperature)
    if student_logits.shape[:-1] != teacher.log_probs.shape[:-1] or teacher.log_probs.shape != teacher.indices.shape:
        raise SlmError(f"student logits {tuple(student_logits.shape)} and teacher top-k "
                       f"{tuple(teacher.log_probs.shape)} must agree on every dimension but the last")
    vocab = student_logits.shape[-1]
    if teacher.indices.numel() and not 0 <= int(teacher.indices.min()) <= int(teacher.indices.max()) < vocab:
        raise SlmError(f"teacher top-k ids must lie in 0..{vocab - 1} (the student's vocabulary)")
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    top = student.gather(-1, teacher.indices.long())
    student_buckets = torch.cat([top, _log1mexp(torch.logsumexp(top, dim=-1)).unsqueeze(-1)], dim=-1)
    teacher_buckets = torch.cat([teacher.log_probs.float(), teacher.tail.float().unsqueeze(-1)], dim=-1)
    return teacher_buckets, student_buckets


def kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) over the last dimension, from log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def generalized_jsd(log_p: Tensor, log_q: Tensor, beta: float) -> Tensor:
    """[beta KL(p || m) + (1 - beta) KL(q || m)] / (beta (1 - beta)), m = beta p + (1 - beta) q;
    KL(p || q) at beta = 0 and KL(q || p) at beta = 1, its limits there."""
    if not 0 <= beta <= 1:
        raise SlmError(f"the JSD beta must lie in [0, 1], got {beta}")
    if beta == 0:
        return kl(log_p, log_q)
    if beta == 1:
        return kl(log_q, log_p)
    log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log(1 - beta)]), dim=0)
    return (beta * kl(log_p, log_m) + (1 - beta) * kl(log_q, log_m)) / (beta * (1 - beta))


def divergence_beta(divergence: str, beta: float) -> float:
    """The JSD beta that gives `divergence`: forward KL is 0, reverse KL 1, "jsd" the given beta."""
    if divergence not in DIVERGENCES:
        raise SlmError(f"divergence must be one of {', '.join(DIVERGENCES)}, got {divergence!r}")
    return {"forward_kl": 0.0, "reverse_kl": 1.0}.get(divergence, beta)


def token_divergence(student_logits: Tensor, teacher: TeacherTopK, *, temperature: float, beta: float,
                     mask: Tensor | None = None) -> Tensor:
    """Mean over the positions in `mask` (default: all) of `generalized_jsd` with `beta` between the
    teacher and the student at `temperature`, times T^2. Logits [..., V], mask [...] (bool)."""
    log_p, log_q = bucket_log_probs(student_logits, teacher, temperature)
    # k + 1 numbers per position: float64 costs nothing here and keeps the JSD's limits exact (near
    # beta = 0 or 1 it divides two small, nearly cancelling terms).
    per_position = generalized_jsd(log_p.double(), log_q.double(), beta).float()
    if mask is not None:
        if mask.shape != per_position.shape:
            raise SlmError(f"mask {tuple(mask.shape)} does not match the positions {tuple(per_position.shape)}")
        if not mask.any():
            raise SlmError("the mask selects no position to distil")
        per_position = per_position[mask]
    return per_position.mean() * temperature**2
