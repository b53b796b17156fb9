"""Distillation losses against values worked out by hand from small examples."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from smallmighty.distill.losses import (
    DistillWeights,
    HiddenProjection,
    attention_map_loss,
    hidden_state_mse,
    soft_logit_kd,
    soft_logit_kd_topk,
)
from smallmighty.errors import SlmError

LOG2, LOG3 = math.log(2.0), math.log(3.0)


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# --- soft_logit_kd -------------------------------------------------------------------------------

def test_soft_logit_kd_matches_hand_computed_kl_times_t_squared():
    temperature = 2.0
    # Row 0: teacher/T = [log 3, 0] -> p = [3/4, 1/4]; student/T = [0, 0] -> q = [1/2, 1/2].
    # Row 1: teacher and student equal -> KL 0.
    teacher = t([[2 * LOG3, 0.0], [1.0, -1.0]])
    student = t([[0.0, 0.0], [1.0, -1.0]])
    row0 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    expected = (row0 + 0.0) / 2 * temperature**2
    assert soft_logit_kd(student, teacher, temperature).item() == pytest.approx(expected, rel=1e-12)


def test_soft_logit_kd_is_kl_teacher_to_student_not_reverse():
    # KL(p||q) with p = [3/4, 1/4], q = [1/2, 1/2] differs from KL(q||p); only the former is right.
    teacher, student = t([[LOG3, 0.0]]), t([[0.0, 0.0]])
    forward = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    reverse = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert forward != pytest.approx(reverse)
    assert soft_logit_kd(student, teacher, 1.0).item() == pytest.approx(forward, rel=1e-12)


def test_soft_logit_kd_upcasts_half_precision_and_has_gradient():
    student = torch.tensor([[0.0, 0.0]], dtype=torch.bfloat16, requires_grad=True)
    teacher = torch.tensor([[LOG3, 0.0]], dtype=torch.bfloat16)
    loss = soft_logit_kd(student, teacher, 1.0)
    assert loss.dtype == torch.float32
    loss.backward()
    # d/ds of KL = (q - p) / T: q - p = [1/2 - 3/4, 1/2 - 1/4] (bf16 rounds log 3 a little).
    assert student.grad.float().tolist()[0] == pytest.approx([-0.25, 0.25], abs=5e-3)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
def test_soft_logit_kd_rejects_bad_temperature(temperature):
    with pytest.raises(SlmError, match="temperature"):
        soft_logit_kd(t([[0.0, 0.0]]), t([[0.0, 0.0]]), temperature)


def test_soft_logit_kd_rejects_mismatched_shapes():
    with pytest.raises(SlmError, match="must both be"):
        soft_logit_kd(t([[0.0, 0.0]]), t([[0.0, 0.0, 0.0]]), 1.0)


# --- soft_logit_kd_topk --------------------------------------------------------------------------

def test_soft_logit_kd_topk_matches_hand_computed_value():
    # C = 3, uniform student q = 1/3 each. Teacher keeps classes 2 and 0 with logits/T = [log 2, 0]
    # -> p = [2/3, 1/3] there, 0 on class 1. KL = 2/3 log((2/3)/(1/3)) + 1/3 log(1) = 2/3 log 2.
    temperature = 2.0
    values = t([[2 * LOG2, 0.0]])
    indices = torch.tensor([[2, 0]])
    expected = (2 / 3) * LOG2 * temperature**2
    loss = soft_logit_kd_topk(t([[0.0, 0.0, 0.0]]), values, indices, temperature)
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_soft_logit_kd_topk_counts_student_mass_on_dropped_classes():
    # Teacher keeps only class 0 (p = [1]); student q = softmax([0, log 3]) = [1/4, 3/4].
    # KL = 1 * log(1 / (1/4)) = log 4: the mass on the dropped class still costs.
    loss = soft_logit_kd_topk(t([[0.0, LOG3]]), t([[5.0]]), torch.tensor([[0]]), 1.0)
    assert loss.item() == pytest.approx(math.log(4.0), rel=1e-12)


def test_soft_logit_kd_topk_with_all_classes_equals_full_kd():
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(4, 7, generator=gen, dtype=torch.float64)
    teacher = torch.randn(4, 7, generator=gen, dtype=torch.float64) * 3
    values, indices = teacher.topk(7, dim=-1)
    full = soft_logit_kd(student, teacher, 2.5)
    sparse = soft_logit_kd_topk(student, values, indices, 2.5)
    torch.testing.assert_close(sparse, full, rtol=1e-13, atol=1e-13)


def test_soft_logit_kd_topk_rejects_out_of_range_and_repeated_indices():
    student = t([[0.0, 0.0, 0.0]])
    with pytest.raises(SlmError, match=r"0\.\.2"):
        soft_logit_kd_topk(student, t([[1.0, 0.0]]), torch.tensor([[0, 3]]), 1.0)
    with pytest.raises(SlmError, match="repeat"):
        soft_logit_kd_topk(student, t([[1.0, 0.0]]), torch.tensor([[1, 1]]), 1.0)


def test_soft_logit_kd_topk_rejects_bad_shapes_and_temperature():
    with pytest.raises(SlmError, match="same batch size"):
        soft_logit_kd_topk(t([[0.0, 0.0]]), t([[1.0], [1.0]]), torch.tensor([[0], [1]]), 1.0)
    with pytest.raises(SlmError, match="same batch size"):
        soft_logit_kd_topk(t([[0.0, 0.0]]), t([[1.0, 0.0]]), torch.tensor([[0]]), 1.0)
    with pytest.raises(SlmError, match="temperature"):
        soft_logit_kd_topk(t([[0.0, 0.0]]), t([[1.0]]), torch.tensor([[0]]), 0.0)


# --- hidden_state_mse and HiddenProjection -------------------------------------------------------

def test_hidden_state_mse_ignores_padding_tokens():
    # B=1, L=3, width 2; token 2 is padding with a huge difference that must not count.
    student = t([[[1.0, 2.0], [0.0, 0.0], [100.0, 100.0]]])
    teacher = t([[[1.0, 0.0], [3.0, 0.0], [0.0, 0.0]]])
    mask = torch.tensor([[1, 1, 0]])
    # Squared errors on real tokens: (0, 4) and (9, 0) -> mean over 4 entries = 13 / 4.
    assert hidden_state_mse(student, teacher, mask, None).item() == pytest.approx(13 / 4)


def test_hidden_state_mse_projects_student_to_teacher_width():
    projection = nn.Linear(1, 2, bias=False, dtype=torch.float64)
    with torch.no_grad():
        projection.weight.copy_(t([[2.0], [-1.0]]))  # x -> (2x, -x)
    student = t([[[1.0], [3.0]]])
    teacher = t([[[2.0, 0.0], [0.0, 0.0]]])
    mask = torch.tensor([[1, 1]])
    # Projected: (2, -1) and (6, -3). Squared errors: (0, 1) and (36, 9) -> 46 / 4.
    assert hidden_state_mse(student, teacher, mask, projection).item() == pytest.approx(46 / 4)


def test_hidden_state_mse_requires_projection_when_widths_differ():
    with pytest.raises(SlmError, match="pass a projection"):
        hidden_state_mse(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4), torch.ones(1, 2), None)


def test_hidden_state_mse_rejects_wrong_projection_width_mask_shape_and_all_padding():
    with pytest.raises(SlmError, match="after projection"):
        hidden_state_mse(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4), torch.ones(1, 2), nn.Linear(3, 5))
    with pytest.raises(SlmError, match="attention mask"):
        hidden_state_mse(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.ones(1, 3), None)
    with pytest.raises(SlmError, match="every token as padding"):
        hidden_state_mse(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.zeros(1, 2), None)


def test_hidden_projection_identity_init_when_widths_equal_and_learnable():
    projection = HiddenProjection(3, 3, num_layers=2)
    hidden = torch.randn(2, 4, 3)
    for layer in range(2):
        torch.testing.assert_close(projection(layer, hidden), hidden)
    assert all(p.requires_grad for p in projection.parameters())
    assert len(list(projection.parameters())) == 4  # weight + bias for each of the 2 layers


def test_hidden_projection_maps_widths_with_one_separate_linear_per_layer():
    projection = HiddenProjection(2, 5, num_layers=3)
    assert len(projection.layers) == 3
    hidden = torch.randn(1, 4, 2)
    outputs = [projection(i, hidden) for i in range(3)]
    assert all(out.shape == (1, 4, 5) for out in outputs)
    assert not torch.equal(outputs[0], outputs[1])  # independently initialised, not shared
    # hidden_state_mse takes one layer's Linear, and gradient reaches only that layer.
    loss = hidden_state_mse(hidden, torch.zeros(1, 4, 5), torch.ones(1, 4), projection.layers[1])
    loss.backward()
    assert projection.layers[1].weight.grad is not None
    assert projection.layers[0].weight.grad is None


def test_hidden_projection_rejects_non_positive_sizes():
    with pytest.raises(SlmError, match="num_layers=0"):
        HiddenProjection(4, 4, 0)


# --- attention_map_loss --------------------------------------------------------------------------

def test_attention_map_loss_excludes_padding_queries_and_keys():
    mask = torch.tensor([[1, 1, 0]])
    # Query rows over keys (k0, k1, k2); k2 and query row 2 are padding.
    teacher = t([[[[0.5, 0.5, 0.0],
                   [1.0, 0.0, 0.0],
                   [1.0, 0.0, 0.0]]]])
    student = t([[[[0.2, 0.6, 0.2],     # 0.2 leaked onto padding: renormalised to (1/4, 3/4)
                   [0.5, 0.5, 0.0],
                   [0.0, 0.0, 1.0]]]])  # padding query row: ignored (would be infinite KL)
    row0 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    row1 = 1.0 * math.log(1.0 / 0.5)
    expected = (row0 + row1) / 2
    assert attention_map_loss(student, teacher, mask).item() == pytest.approx(expected, rel=1e-9)


def test_attention_map_loss_groups_contiguous_teacher_heads():
    # Ht = 4, Hs = 2, L = 2, every query row the same. Teacher heads (0,1) average to (1/2, 1/2),
    # heads (2,3) to (1, 0). Student head 0 = (1/4, 3/4), head 1 = (1/2, 1/2).
    def rows(p):
        return [p, p]
    teacher = t([[rows([1.0, 0.0]), rows([0.0, 1.0]), rows([1.0, 0.0]), rows([1.0, 0.0])]])
    student = t([[rows([0.25, 0.75]), rows([0.5, 0.5])]])
    head0 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    head1 = math.log(1.0 / 0.5)
    expected = (head0 + head1) / 2
    loss = attention_map_loss(student, teacher, torch.ones(1, 2))
    assert loss.item() == pytest.approx(expected, rel=1e-9)


def test_attention_map_loss_averages_all_heads_when_not_divisible():
    # Ht = 3, Hs = 2: teacher mean of (1,0), (0,1), (1,0) = (2/3, 1/3); student mean of (1/2,1/2),
    # (0, 1) = (1/4, 3/4). KL = 2/3 log((2/3)/(1/4)) + 1/3 log((1/3)/(3/4)).
    teacher = t([[[[1.0, 0.0]], [[0.0, 1.0]], [[1.0, 0.0]]]]).expand(1, 3, 2, 2)
    student = t([[[[0.5, 0.5]], [[0.0, 1.0]]]]).expand(1, 2, 2, 2)
    expected = (2 / 3) * math.log((2 / 3) / 0.25) + (1 / 3) * math.log((1 / 3) / 0.75)
    loss = attention_map_loss(student, teacher, torch.ones(1, 2))
    assert loss.item() == pytest.approx(expected, rel=1e-9)


def test_attention_map_loss_is_finite_where_student_has_zero_mass():
    teacher = t([[[[0.5, 0.5], [0.5, 0.5]]]])
    student = t([[[[1.0, 0.0], [1.0, 0.0]]]]).requires_grad_()
    loss = attention_map_loss(student, teacher, torch.ones(1, 2))
    assert math.isfinite(loss.item()) and loss.item() > 10  # large, not inf/nan
    loss.backward()
    assert torch.isfinite(student.grad).all()


def test_attention_map_loss_zero_for_identical_maps_and_rejects_bad_inputs():
    attn = torch.softmax(torch.randn(2, 4, 5, 5), dim=-1)
    mask = torch.ones(2, 5)
    assert attention_map_loss(attn, attn, mask).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(SlmError, match="same batch and length"):
        attention_map_loss(attn, attn[:, :, :4, :4], mask)
    with pytest.raises(SlmError, match="attention mask"):
        attention_map_loss(attn, attn, torch.ones(2, 4))
    with pytest.raises(SlmError, match="every token as padding"):
        attention_map_loss(attn, attn, torch.zeros(2, 5))


# --- DistillWeights ------------------------------------------------------------------------------

def test_distill_weights_defaults_validate():
    weights = DistillWeights()
    weights.validate()
    assert (weights.kd, weights.ce, weights.hidden, weights.attention, weights.temperature) == \
        (0.8, 0.2, 0.0, 0.0, 3.0)


@pytest.mark.parametrize("field", ["kd", "ce", "hidden", "attention"])
def test_distill_weights_rejects_negative_weight(field):
    with pytest.raises(SlmError, match=f"'{field}'"):
        DistillWeights(**{field: -0.1}).validate()


@pytest.mark.parametrize("temperature", [0.0, -2.0])
def test_distill_weights_rejects_non_positive_temperature(temperature):
    with pytest.raises(SlmError, match="temperature"):
        DistillWeights(temperature=temperature).validate()


def test_distill_weights_rejects_all_zero_but_accepts_a_single_term():
    with pytest.raises(SlmError, match="are 0"):
        DistillWeights(kd=0.0, ce=0.0).validate()
    DistillWeights(kd=0.0, ce=0.0, attention=1.0).validate()
