"""Loss functions for encoder distillation (DistilBERT / TinyBERT style), in plain PyTorch.

- `soft_logit_kd` / `soft_logit_kd_topk`: Hinton's soft-target loss, from full teacher logits or
  from a cached teacher top-k (so a teacher pass can be stored once and reused for many epochs).
- `hidden_state_mse` with `HiddenProjection`: match intermediate hidden states layer by layer.
- `attention_map_loss`: match attention probability maps row by row.
- `DistillWeights`: how much each term counts, and the temperature.

The hard-label term is plain `torch.nn.functional.cross_entropy`; it gets no wrapper here.
Every loss computes in at least float32, so bf16/fp16 activations do not underflow in logs and
softmaxes, and raises `SlmError` for inputs that cannot belong together (mismatched shapes, an
all-padding batch, a non-positive temperature).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smallmighty.errors import SlmError

# Smallest probability the attention loss takes a log of: far below any probability that matters,
# and well above float32's smallest normal number (~1.2e-38), so log() stays finite.
ATTENTION_EPS = 1e-12


def _at_least_fp32(x: Tensor) -> Tensor:
    """Upcast half-precision tensors to float32; leave float32/float64 untouched."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _check_temperature(temperature: float) -> None:
    if not (temperature > 0 and math.isfinite(temperature)):
        raise SlmError(f"the distillation temperature must be a finite number > 0, got {temperature}")


def _batch_kl(teacher_probs: Tensor, student_log_probs: Tensor) -> Tensor:
    """Mean over the batch of sum_c p_c (log p_c - log q_c), with 0 * log 0 taken as 0."""
    per_row = (torch.xlogy(teacher_probs, teacher_probs) - teacher_probs * student_log_probs).sum(-1)
    return per_row.mean()


def soft_logit_kd(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """KL(softmax(teacher/T) || softmax(student/T)), averaged over the batch, times T^2.

    The T^2 factor (Hinton et al., 2015) keeps the gradient size of this term roughly independent
    of T, so the weights in `DistillWeights` keep their meaning when the temperature changes.
    Shapes: both [B, C].
    """
    _check_temperature(temperature)
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise SlmError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                       f"{tuple(teacher_logits.shape)} must both be [batch, classes] of one shape")
    teacher_probs = F.softmax(_at_least_fp32(teacher_logits) / temperature, dim=-1)
    student_log_probs = F.log_softmax(_at_least_fp32(student_logits) / temperature, dim=-1)
    return _batch_kl(teacher_probs, student_log_probs) * temperature**2


def soft_logit_kd_topk(student_logits: Tensor, topk_values: Tensor, topk_indices: Tensor,
                       temperature: float) -> Tensor:
    """`soft_logit_kd` against a teacher stored as its top-k logits only.

    The teacher distribution is softmax(topk_values / T) on the k kept classes and zero on the
    rest; the student keeps its full softmax(student/T) over all C classes, so mass the student
    puts on dropped classes is still penalised (through its smaller log-probabilities on the kept
    ones). With k == C this is exactly `soft_logit_kd`.
    Shapes: student_logits [B, C]; topk_values and topk_indices (long) [B, k], k <= C.
    """
    _check_temperature(temperature)
    if student_logits.dim() != 2 or topk_values.dim() != 2 or topk_values.shape != topk_indices.shape \
            or topk_values.shape[0] != student_logits.shape[0]:
        raise SlmError(f"student logits {tuple(student_logits.shape)} must be [batch, classes] and "
                       f"teacher top-k values {tuple(topk_values.shape)} and indices "
                       f"{tuple(topk_indices.shape)} [batch, k] with the same batch size")
    num_classes = student_logits.shape[1]
    if topk_indices.numel() and (topk_indices.min() < 0 or topk_indices.max() >= num_classes):
        low, high = topk_indices.min().item(), topk_indices.max().item()
        raise SlmError(f"teacher top-k indices must lie in 0..{num_classes - 1} "
                       f"(the student's classes), got {low}..{high}")
    if (topk_indices.sort(dim=-1).values.diff(dim=-1) == 0).any():
        raise SlmError("teacher top-k indices repeat a class within a row; each class may be kept once")
    teacher_probs = F.softmax(_at_least_fp32(topk_values) / temperature, dim=-1)
    student_log_probs = F.log_softmax(_at_least_fp32(student_logits) / temperature, dim=-1)
    return _batch_kl(teacher_probs, student_log_probs.gather(-1, topk_indices)) * temperature**2


class HiddenProjection(nn.Module):
    """One learned Linear(student_dim -> teacher_dim) per mapped layer, for `hidden_state_mse`.

    `forward(layer_index, hidden)` projects with the Linear of position `layer_index` in the layer
    map (0-based); `hidden_state_mse` takes one layer's module, `projection.layers[layer_index]`.

    When the widths are equal the Linear is still there, initialised to the identity with zero
    bias: training then starts from the plain MSE of raw hidden states (TinyBERT with equal widths)
    while the student remains free to learn its own basis, since forcing it to reproduce the
    teacher's coordinates exactly constrains it more than the task requires. Always having a Linear
    also gives every student the same parameter layout, whatever the widths.
    """

    def __init__(self, student_dim: int, teacher_dim: int, num_layers: int) -> None:
        super().__init__()
        if min(student_dim, teacher_dim, num_layers) < 1:
            raise SlmError(f"hidden projection needs positive sizes, got student_dim={student_dim}, "
                           f"teacher_dim={teacher_dim}, num_layers={num_layers}")
        self.layers = nn.ModuleList(nn.Linear(student_dim, teacher_dim) for _ in range(num_layers))
        if student_dim == teacher_dim:
            with torch.no_grad():
                for linear in self.layers:
                    linear.weight.copy_(torch.eye(teacher_dim))
                    linear.bias.zero_()

    def forward(self, layer_index: int, hidden: Tensor) -> Tensor:
        """Project `hidden` [..., student_dim] with the Linear of map position `layer_index`."""
        return self.layers[layer_index](hidden)


def _valid_token_mask(attention_mask: Tensor, batch: int, length: int) -> Tensor:
    """The attention mask as booleans, checked to be [batch, length] and to hold a real token."""
    if attention_mask.shape != (batch, length):
        raise SlmError(f"attention mask {tuple(attention_mask.shape)} does not match "
                       f"[batch, length] = [{batch}, {length}]")
    valid = attention_mask.bool()
    if not valid.any():
        raise SlmError("the attention mask marks every token as padding; there is nothing to match")
    return valid


def hidden_state_mse(student_hidden: Tensor, teacher_hidden: Tensor, attention_mask: Tensor,
                     projection: nn.Module | None) -> Tensor:
    """Mean squared error between hidden states, over non-padding tokens only.

    The student [B, L, ds] is first passed through `projection` (if given) to reach the teacher
    width dt; with different widths a projection is required. Padding is excluded because its
    hidden states are whatever the model computes for ignored positions, which nothing downstream
    reads. The mean runs over every (real token, feature) entry, so the value does not grow with
    padding or width.
    """
    if projection is not None:
        student_hidden = projection(student_hidden)
    elif student_hidden.shape[-1] != teacher_hidden.shape[-1]:
        raise SlmError(f"student hidden width {student_hidden.shape[-1]} differs from teacher width "
                       f"{teacher_hidden.shape[-1]}; pass a projection (HiddenProjection) to bridge them")
    if student_hidden.dim() != 3 or student_hidden.shape != teacher_hidden.shape:
        raise SlmError(f"student hidden states {tuple(student_hidden.shape)} (after projection) and "
                       f"teacher hidden states {tuple(teacher_hidden.shape)} must both be "
                       "[batch, length, width] of one shape")
    batch, length, width = teacher_hidden.shape
    valid = _valid_token_mask(attention_mask, batch, length)
    diff = _at_least_fp32(student_hidden)[valid] - _at_least_fp32(teacher_hidden)[valid]
    return diff.pow(2).mean()


def _group_heads(student_attn: Tensor, teacher_attn: Tensor) -> tuple[Tensor, Tensor]:
    """Bring both attention maps to one head count by averaging heads.

    If the teacher's head count is a multiple of the student's, each student head h is matched to
    the mean of teacher heads h*g .. h*g+g-1 (g = Ht / Hs), contiguous groups as in the teacher's
    own head order. Otherwise no grouping is meaningful and both sides are averaged over all their
    heads into one map. A mean of probability rows is still a probability row, so the KL that
    follows stays well defined.
    """
    student_heads, teacher_heads = student_attn.shape[1], teacher_attn.shape[1]
    if teacher_heads % student_heads == 0:
        b, _, lq, lk = teacher_attn.shape
        grouped = teacher_attn.reshape(b, student_heads, teacher_heads // student_heads, lq, lk)
        return student_attn, grouped.mean(dim=2)
    return student_attn.mean(dim=1, keepdim=True), teacher_attn.mean(dim=1, keepdim=True)


def attention_map_loss(student_attn: Tensor, teacher_attn: Tensor, attention_mask: Tensor) -> Tensor:
    """KL(teacher row || student row) of attention probabilities, averaged over real query rows.

    Inputs are attention *probabilities* [B, H, L, L] (query, key), as returned with
    `output_attentions=True`; head counts may differ (see `_group_heads`). Padding query rows are
    dropped, and padding key columns are removed with each row then renormalised over the real
    keys, so mass a model leaks onto padding neither counts nor skews the comparison. Probabilities
    are clamped at `ATTENTION_EPS` before the student's log, so a zero where the teacher has mass
    gives a large finite loss rather than inf/NaN. The mean is over (batch, head, real query) rows.
    """
    if student_attn.dim() != 4 or teacher_attn.dim() != 4 \
            or student_attn.shape[0] != teacher_attn.shape[0] \
            or student_attn.shape[2:] != teacher_attn.shape[2:] \
            or student_attn.shape[2] != student_attn.shape[3]:
        raise SlmError(f"student attention {tuple(student_attn.shape)} and teacher attention "
                       f"{tuple(teacher_attn.shape)} must be [batch, heads, length, length] "
                       "with the same batch and length")
    batch, _, length, _ = student_attn.shape
    valid = _valid_token_mask(attention_mask, batch, length)
    student, teacher = _group_heads(_at_least_fp32(student_attn), _at_least_fp32(teacher_attn))

    keys = valid[:, None, None, :].to(student.dtype)  # [B, 1, 1, L]: zero out padding keys

    def renormalised(probs: Tensor) -> Tensor:
        kept = probs.clamp_min(0) * keys
        return kept / kept.sum(-1, keepdim=True).clamp_min(ATTENTION_EPS)

    p, q = renormalised(teacher), renormalised(student)
    row_kl = (torch.xlogy(p, p) - p * q.clamp_min(ATTENTION_EPS).log()).sum(-1)  # [B, H, L]
    rows = valid[:, None, :].expand_as(row_kl)
    return row_kl[rows].mean()


@dataclass
class DistillWeights:
    """Weights of the distillation terms and the soft-target temperature.

    The defaults (0.8 soft-target KD + 0.2 hard-label CE, T = 3) are the logit-only recipe that
    distilled MiniLM-L6 into a 4-layer student in this project's measurements; `hidden` and
    `attention` switch on the TinyBERT intermediate-layer terms.
    """

    kd: float = 0.8
    ce: float = 0.2
    hidden: float = 0.0
    attention: float = 0.0
    temperature: float = 3.0

    def validate(self) -> None:
        """Raise `SlmError` for a negative or non-finite weight, all-zero weights, or T <= 0."""
        weights = [f.name for f in fields(self) if f.name != "temperature"]
        for name in weights:
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise SlmError(f"distillation weight '{name}' must be a finite number >= 0, got {value}")
        if all(getattr(self, name) == 0 for name in weights):
            raise SlmError(f"all distillation weights ({', '.join(weights)}) are 0; "
                           "at least one term must count")
        _check_temperature(self.temperature)
