"""Causal-LM distillation divergences against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from smallmighty.distill.lm_losses import (
    TeacherTopK,
    divergence_beta,
    generalized_jsd,
    teacher_topk,
    token_divergence,
)
from smallmighty.errors import SlmError

TEACHER = [2.0, 1.0, 0.0, -1.0]
STUDENT = [0.5, 1.5, -0.5, 0.0]


def softmax(xs: list[float], t: float = 1.0) -> list[float]:
    e = [math.exp(x / t) for x in xs]
    return [v / sum(e) for v in e]


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def value(divergence: str, teacher: TeacherTopK, student: list[float], t: float = 1.0, beta: float = 0.5) -> float:
    return token_divergence(torch.tensor([student]), teacher, temperature=t,
                            beta=divergence_beta(divergence, beta)).item()


def test_full_vocabulary_divergences_equal_their_textbook_values():
    teacher = teacher_topk(torch.tensor([TEACHER]), 1.0, k=4)
    p, q = softmax(TEACHER), softmax(STUDENT)
    assert value("forward_kl", teacher, STUDENT) == pytest.approx(kl(p, q), rel=1e-5)
    assert value("reverse_kl", teacher, STUDENT) == pytest.approx(kl(q, p), rel=1e-5)
    m = [(a + b) / 2 for a, b in zip(p, q)]
    assert value("jsd", teacher, STUDENT, beta=0.5) == pytest.approx((0.5 * kl(p, m) + 0.5 * kl(q, m)) / 0.25,
                                                                     rel=1e-5)
    m = [0.2 * a + 0.8 * b for a, b in zip(p, q)]
    assert value("jsd", teacher, STUDENT, beta=0.2) == pytest.approx((0.2 * kl(p, m) + 0.8 * kl(q, m)) / 0.16,
                                                                     rel=1e-5)


def test_jsd_tends_to_forward_kl_at_beta_0_and_reverse_kl_at_beta_1():
    teacher = teacher_topk(torch.tensor([TEACHER]), 1.0, k=4)
    forward, reverse = value("forward_kl", teacher, STUDENT), value("reverse_kl", teacher, STUDENT)
    assert value("jsd", teacher, STUDENT, beta=1e-5) == pytest.approx(forward, rel=5e-4)
    assert value("jsd", teacher, STUDENT, beta=1 - 1e-5) == pytest.approx(reverse, rel=5e-4)
    assert value("jsd", teacher, STUDENT, beta=0.0) == forward and value("jsd", teacher, STUDENT, beta=1.0) == reverse
    assert forward != pytest.approx(reverse, rel=1e-2)  # the limits really are two different values


def test_top_k_keeps_the_rest_of_the_mass_in_one_tail_bucket_and_temperature_scales_by_t_squared():
    t = 2.0
    teacher = teacher_topk(torch.tensor([TEACHER]), t, k=2)  # tokens 0 and 1
    assert teacher.indices.tolist() == [[0, 1]]
    p_all, q_all = softmax(TEACHER, t), softmax(STUDENT, t)
    p = [p_all[0], p_all[1], p_all[2] + p_all[3]]
    q = [q_all[0], q_all[1], q_all[2] + q_all[3]]
    assert teacher.tail.exp().item() == pytest.approx(p[2], rel=1e-5)
    assert value("forward_kl", teacher, STUDENT, t) == pytest.approx(kl(p, q) * t * t, rel=1e-5)
    assert value("reverse_kl", teacher, STUDENT, t) == pytest.approx(kl(q, p) * t * t, rel=1e-5)


def test_a_trimmed_student_vocabulary_reads_the_teachers_kept_columns():
    # The student has teacher tokens 1, 2 and 3 (student ids 0, 1, 2); token 0, the teacher's favourite, is gone.
    teacher = teacher_topk(torch.tensor([TEACHER]), 1.0, k=2, columns=torch.tensor([1, 2, 3]))
    assert teacher.indices.tolist() == [[0, 1]]
    p_all = softmax(TEACHER)
    assert teacher.log_probs.exp()[0].tolist() == pytest.approx([p_all[1], p_all[2]], rel=1e-5)
    assert teacher.tail.exp().item() == pytest.approx(p_all[0] + p_all[3], rel=1e-5)
    q_all = softmax(STUDENT[:3])
    p, q = [p_all[1], p_all[2], p_all[0] + p_all[3]], [q_all[0], q_all[1], q_all[2]]
    assert value("forward_kl", teacher, STUDENT[:3]) == pytest.approx(kl(p, q), rel=1e-5)


def test_mask_averages_only_the_chosen_positions_and_gradients_stay_finite():
    torch.manual_seed(0)
    teacher_logits, student_logits = torch.randn(2, 3, 5), torch.randn(2, 3, 5, requires_grad=True)
    teacher = teacher_topk(teacher_logits, 1.0, k=5)  # the whole vocabulary: the tail is empty
    mask = torch.tensor([[True, False, True], [False, False, True]])
    for beta in (0.0, 0.5, 1.0):
        loss = token_divergence(student_logits, teacher, temperature=1.0, beta=beta, mask=mask)
        p, q = teacher_logits.softmax(-1), student_logits.softmax(-1)
        each = [generalized_jsd(p[i, j].log(), q[i, j].log(), beta) for i, j in mask.nonzero().tolist()]
        assert loss.item() == pytest.approx(torch.stack(each).mean().item(), rel=1e-5)
        loss.backward()
        assert torch.isfinite(student_logits.grad).all()
        student_logits.grad = None


def test_inputs_that_cannot_belong_together_are_named():
    teacher = teacher_topk(torch.tensor([TEACHER]), 1.0, k=2)
    with pytest.raises(SlmError, match="temperature"):
        token_divergence(torch.tensor([STUDENT]), teacher, temperature=0.0, beta=0.0)
    with pytest.raises(SlmError, match="beta"):
        generalized_jsd(torch.zeros(2), torch.zeros(2), 1.5)
    with pytest.raises(SlmError, match="divergence must be one of"):
        divergence_beta("tvd", 0.5)
    with pytest.raises(SlmError, match="every dimension but the last"):
        token_divergence(torch.zeros(2, 4), teacher, temperature=1.0, beta=0.0)
    with pytest.raises(SlmError, match="student's vocabulary"):
        token_divergence(torch.zeros(1, 1), teacher, temperature=1.0, beta=0.0)
