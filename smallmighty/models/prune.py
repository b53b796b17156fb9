"""Cut a student out of a BERT teacher: fewer layers, residual channels, heads and FFN neurons.

Why: a narrow student whose layers start from random weights has to learn the task from a few
thousand labelled texts, and a 2-4 layer transformer trained from scratch on that little data lands
several points below a bag-of-words baseline. Cut from the teacher instead, it starts with what
pre-training and fine-tuning put there, and distillation only has to repair the cut (the recipe of
Minitron, Muralidharan et al. 2024, and of structured pruning for BERT such as CoFi).

What is kept: every k-th block (the ones the uniform layer map pairs with the student, so each
student layer starts close to its distillation target); inside them the residual channels, whole
attention heads (the teacher's head size is kept, so attention scores keep their scale) and FFN
neurons whose activations on the training texts are largest. Slicing a weight matrix by those
indices is exact for the kept units; only LayerNorm's statistics over fewer channels, and the
missing units, change the function, and that is what the short repair training fixes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

#: Which index set slices each dimension of a parameter inside a transformer block, by name suffix:
#: "heads" = the kept attention-head dimensions, "channels" = the kept residual channels,
#: "neurons" = the kept FFN neurons.
_BLOCK_SLICES: dict[str, tuple[str, ...]] = {
    **{f"attention.self.{p}.weight": ("heads", "channels") for p in ("query", "key", "value")},
    **{f"attention.self.{p}.bias": ("heads",) for p in ("query", "key", "value")},
    "attention.output.dense.weight": ("channels", "heads"),
    "attention.output.dense.bias": ("channels",),
    "attention.output.LayerNorm.weight": ("channels",),
    "attention.output.LayerNorm.bias": ("channels",),
    "intermediate.dense.weight": ("neurons", "channels"),
    "intermediate.dense.bias": ("neurons",),
    "output.dense.weight": ("channels", "neurons"),
    "output.dense.bias": ("channels",),
    "output.LayerNorm.weight": ("channels",),
    "output.LayerNorm.bias": ("channels",),
}

#: The same for parameters outside the blocks; "vocab" = the kept word pieces, "positions" = the
#: first max_length positions, None = the whole dimension.
_OUTER_SLICES: dict[str, tuple[str | None, ...]] = {
    "embeddings.word_embeddings.weight": ("vocab", "channels"),
    "embeddings.position_embeddings.weight": ("positions", "channels"),
    "embeddings.token_type_embeddings.weight": (None, "channels"),
    "embeddings.LayerNorm.weight": ("channels",),
    "embeddings.LayerNorm.bias": ("channels",),
    "pooler.dense.weight": ("channels", "channels"),
    "pooler.dense.bias": ("channels",),
}


@dataclass
class Importance:
    """How much each prunable unit of the teacher is used, measured on real inputs."""

    channels: torch.Tensor  # [hidden]: mean |LayerNorm output|, summed over every LayerNorm
    heads: list[torch.Tensor]  # per block [heads]: mean L2 norm of the head's attention output
    neurons: list[torch.Tensor]  # per block [ffn]: mean |activation| of each FFN neuron


def can_prune(teacher_config, hidden: int, heads: int, ffn: int, layers: int) -> bool:
    """Whether a student of this shape can be cut out of this teacher: a BERT teacher at least as
    large in every dimension, and student heads of the teacher's head size."""
    head_size = teacher_config.hidden_size // teacher_config.num_attention_heads
    return (teacher_config.model_type == "bert" and hidden <= teacher_config.hidden_size
            and heads * head_size == hidden and ffn <= teacher_config.intermediate_size
            and layers <= teacher_config.num_hidden_layers)


@torch.no_grad()
def activation_importance(model: nn.Module, input_ids: list[list[int]], pad_id: int, *,
                          batch_size: int = 64) -> Importance:
    """Run the BERT `model` over `input_ids` and measure every channel, head and FFN neuron.

    Padding positions are left out of every mean: they are most of a short-text batch and carry
    no signal the student needs.
    """
    bert = model.base_model
    config = model.config
    head_size = config.hidden_size // config.num_attention_heads
    n_blocks = config.num_hidden_layers
    channels = torch.zeros(config.hidden_size)
    heads = [torch.zeros(config.num_attention_heads) for _ in range(n_blocks)]
    neurons = [torch.zeros(config.intermediate_size) for _ in range(n_blocks)]
    state: dict[str, torch.Tensor] = {}

    def masked_mean(x: torch.Tensor) -> torch.Tensor:
        mask = state["mask"]
        return (x * mask.unsqueeze(-1)).flatten(0, 1).sum(0) / mask.sum()

    def add_channels(_module, _inputs, output):
        channels.add_(masked_mean(output.abs()).cpu())

    def add_heads(block: int):
        def hook(_module, inputs):
            context = inputs[0]
            norms = context.unflatten(-1, (-1, head_size)).norm(dim=-1)
            heads[block].add_(masked_mean(norms).cpu())
        return hook

    def add_neurons(block: int):
        def hook(_module, inputs):
            neurons[block].add_(masked_mean(inputs[0].abs()).cpu())
        return hook

    handles = [bert.embeddings.LayerNorm.register_forward_hook(add_channels)]
    for b, layer in enumerate(bert.encoder.layer):
        handles += [layer.attention.output.LayerNorm.register_forward_hook(add_channels),
                    layer.output.LayerNorm.register_forward_hook(add_channels),
                    layer.attention.output.dense.register_forward_pre_hook(add_heads(b)),
                    layer.output.dense.register_forward_pre_hook(add_neurons(b))]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for start in range(0, len(input_ids), batch_size):
            chunk = input_ids[start:start + batch_size]
            width = max(len(ids) for ids in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            for row, seq in enumerate(chunk):
                ids[row, :len(seq)] = torch.tensor(seq)
            mask = (torch.arange(width) < torch.tensor([len(s) for s in chunk]).unsqueeze(1)).to(device)
            state["mask"] = mask.float()
            bert(input_ids=ids.to(device), attention_mask=mask.long())
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return Importance(channels, heads, neurons)


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, in their original order (so kept units keep their layout)."""
    return scores.topk(k).indices.sort().values


def _take(tensor: torch.Tensor, indices: tuple[torch.Tensor | None, ...]) -> torch.Tensor:
    for dim, index in enumerate(indices):
        if index is not None:
            tensor = tensor.index_select(dim, index)
    return tensor.clone()


def pruned_state_dict(teacher: nn.Module, student: nn.Module, importance: Importance, blocks: list[int],
                      keep_ids: list[int]) -> dict[str, torch.Tensor]:
    """The student's weights cut from the teacher's: student block i comes from teacher block
    `blocks[i]`, the embedding rows are the `keep_ids` word pieces, and the classifier reads the
    kept channels. `student` only supplies the target shape."""
    scfg, tcfg = student.config, teacher.config
    head_size = tcfg.hidden_size // tcfg.num_attention_heads
    channels = _top(importance.channels, scfg.hidden_size)
    index = {"channels": channels, "vocab": torch.tensor(keep_ids),
             "positions": torch.arange(scfg.max_position_embeddings), None: None}
    prefix = teacher.base_model_prefix
    teacher_weights = teacher.state_dict()
    out: dict[str, torch.Tensor] = {}
    for name, value in student.state_dict().items():
        inner = name.removeprefix(prefix + ".")
        if inner.startswith("encoder.layer."):
            s_block, suffix = inner.removeprefix("encoder.layer.").split(".", 1)
            t_block = blocks[int(s_block)]
            kept_heads = _top(importance.heads[t_block], scfg.num_attention_heads)
            block_index = {**index, "neurons": _top(importance.neurons[t_block], scfg.intermediate_size),
                           "heads": (kept_heads.unsqueeze(1) * head_size + torch.arange(head_size)).flatten()}
            source = f"{prefix}.encoder.layer.{t_block}.{suffix}"
            sliced = _take(teacher_weights[source], tuple(block_index[k] for k in _BLOCK_SLICES[suffix]))
        elif inner in _OUTER_SLICES:
            sliced = _take(teacher_weights[name], tuple(index[k] for k in _OUTER_SLICES[inner]))
        elif name == "classifier.weight":
            sliced = _take(teacher_weights[name], (None, channels))
        elif name in teacher_weights and teacher_weights[name].shape == value.shape:
            sliced = teacher_weights[name].clone()  # classifier bias, position-id buffers
        else:
            continue  # leave the student's own initialisation (e.g. a pooler the teacher lacks)
        out[name] = sliced
    return out
