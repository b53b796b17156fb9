"""Cut a smaller Llama-family decoder (Llama, SmolLM, Mistral, Qwen2) out of a larger one.

The decoder counterpart of `prune.py` (Minitron, Muralidharan et al. 2024): the student keeps the
teacher's most influential blocks, and within them the residual channels, attention heads and SwiGLU
neurons that are most active on the training corpus. Each kept unit's weights are copied exactly;
what the student lacks is repaired by distillation.

A block's influence is how much it changes the residual stream: 1 - the mean cosine similarity of
its input and output (ShortGPT's Block Influence, Men et al. 2024). The blocks that change it least
are the ones dropped. Why not every k-th block, as encoders are cut: a decoder's first and last
blocks do far more than the rest (SmolLM2-135M's first block turns its input almost orthogonal,
influence 0.99, where its middle blocks score 0.03), and every k-th block drops the first. Cut to 16
of its 30 blocks, SmolLM2-135M scores a Tiny Shakespeare validation perplexity of 9.8k before any
training with the blocks kept by influence, 680k with every k-th block (bench/README.md, distill_lm.py).

Grouped-query attention constrains the head cut: query heads share a key/value head within their
group, so whole key/value groups are chosen (by the summed activity of their query heads) and each
kept group keeps the same number of its most active query heads. The head size is the teacher's,
so attention scores keep their scale and rotary positions their frequencies; `head_dim` is written
to the config, which lets heads x head size differ from the width.

With every unit kept, the cut is the teacher itself (the logits match to float precision); with
`keep_ids`, the vocabulary rows are those of a trimmed tokenizer (`bpe_trim`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from smallmighty.errors import SlmError
from smallmighty.models.prune import Importance, _take, _top

#: Families with the Llama module layout (q/k/v/o, gate/up/down, RMSNorm); Qwen2 adds q/k/v biases.
DECODER_FAMILIES = ("llama", "mistral", "qwen2")


#: The default cut: the share of the teacher's blocks and of each kept block's SwiGLU neurons. A
#: decoder loses less by narrowing every FFN than by losing more blocks: at half of SmolLM2-135M's
#: parameters (vocabulary trimmed to Tiny Shakespeare's tokens), 24 of its 30 blocks with 928 of 1,536
#: neurons score a validation perplexity of 189 before training and 50.8 after 80 distillation steps
#: at lr 3e-4; 16 whole blocks 9.8k and 67.0; all 30 blocks with 640 neurons 172 and 52.0, 13% slower
#: per step (the teacher: 43.0; bench/README.md, distill_lm.py).
DEFAULT_LAYER_SHARE, DEFAULT_FFN_SHARE = 0.8, 0.6


@dataclass
class DecoderCut:
    """The student's size; `None` keeps the teacher's value, except `layers` (default: 4/5 of the
    teacher's blocks) and `ffn` (default: 3/5 of the teacher's neurons, a multiple of 16)."""

    layers: int | None = None
    hidden: int | None = None
    heads: int | None = None
    kv_heads: int | None = None
    ffn: int | None = None

    def resolve(self, teacher_config) -> "DecoderCut":
        """Fill in the teacher's sizes and check the student fits inside the teacher."""
        t = teacher_config
        t_kv = getattr(t, "num_key_value_heads", None) or t.num_attention_heads
        heads = self.heads or t.num_attention_heads
        per_group = t.num_attention_heads // t_kv
        kv_heads = self.kv_heads or max(1, min(t_kv, -(-heads // per_group)))
        layers = max(1, round(t.num_hidden_layers * DEFAULT_LAYER_SHARE))
        ffn = min(t.intermediate_size, 16 * max(1, round(t.intermediate_size * DEFAULT_FFN_SHARE / 16)))
        cut = DecoderCut(self.layers or layers, self.hidden or t.hidden_size, heads, kv_heads, self.ffn or ffn)
        limits = {"layers": t.num_hidden_layers, "hidden": t.hidden_size, "heads": t.num_attention_heads,
                  "kv_heads": t_kv, "ffn": t.intermediate_size}
        for name, limit in limits.items():
            value = getattr(cut, name)
            if not 1 <= value <= limit:
                raise SlmError(f"a student cut from the teacher needs 1 <= {name} <= {limit} (the teacher's), "
                               f"got {value}")
        if cut.heads % cut.kv_heads or cut.heads // cut.kv_heads > per_group:
            raise SlmError(f"{cut.heads} query heads do not split into {cut.kv_heads} key/value groups of at most "
                           f"{per_group} (the teacher's group size); choose heads = kv_heads x 1..{per_group}")
        return cut

    def as_dict(self) -> dict:
        return asdict(self)


def can_cut(teacher_config) -> bool:
    return getattr(teacher_config, "model_type", None) in DECODER_FAMILIES


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


@torch.no_grad()
def decoder_importance(model: nn.Module, rows: torch.Tensor, *, batch_size: int = 8) -> Importance:
    """Mean activity of every channel, query head and SwiGLU neuron of `model` over `rows` [n, seq_len],
    and each block's influence.

    Channels: mean |RMSNorm output| summed over every norm (the residual stream as the blocks read
    it); heads: mean L2 norm of each head's attention output (o_proj's input); neurons: mean
    |silu(gate) * up| (down_proj's input); blocks: 1 - mean cosine similarity of the block's input
    and output residual stream, per token (summed over batches: only the ranking is used).
    """
    config = model.config
    n_blocks, head_dim = config.num_hidden_layers, _head_dim(config)
    channels = torch.zeros(config.hidden_size)
    heads = [torch.zeros(config.num_attention_heads) for _ in range(n_blocks)]
    neurons = [torch.zeros(config.intermediate_size) for _ in range(n_blocks)]
    influence = torch.zeros(n_blocks)

    def mean_over_tokens(x: torch.Tensor) -> torch.Tensor:
        return x.float().flatten(0, -2).mean(0).cpu()

    def add_channels(_module, _inputs, output):
        channels.add_(mean_over_tokens(output.abs()))

    def add_heads(block: int):
        def hook(_module, inputs):
            heads[block].add_(mean_over_tokens(inputs[0].unflatten(-1, (-1, head_dim)).norm(dim=-1)))
        return hook

    def add_neurons(block: int):
        def hook(_module, inputs):
            neurons[block].add_(mean_over_tokens(inputs[0].abs()))
        return hook

    def add_influence(block: int):
        def hook(_module, args, kwargs, output):
            before = args[0] if args else kwargs["hidden_states"]
            after = output[0] if isinstance(output, tuple) else output
            influence[block] += 1 - nn.functional.cosine_similarity(before.float(), after.float(), dim=-1).mean().item()
        return hook

    base = model.model
    handles = [base.norm.register_forward_hook(add_channels)]
    for b, layer in enumerate(base.layers):
        handles += [layer.register_forward_hook(add_influence(b), with_kwargs=True),
                    layer.input_layernorm.register_forward_hook(add_channels),
                    layer.post_attention_layernorm.register_forward_hook(add_channels),
                    layer.self_attn.o_proj.register_forward_pre_hook(add_heads(b)),
                    layer.mlp.down_proj.register_forward_pre_hook(add_neurons(b))]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for start in range(0, len(rows), batch_size):
            base(input_ids=rows[start:start + batch_size].to(device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return Importance(channels, heads, neurons, influence)


def kept_blocks(importance: Importance, layers: int) -> list[int]:
    """The teacher blocks a `layers`-block student keeps: the most influential, in the teacher's order."""
    if importance.blocks is None:
        raise SlmError("choosing the blocks to keep needs their influence (measure it with decoder_importance)")
    return _top(importance.blocks, layers).tolist()


def _kept_heads(scores: torch.Tensor, cut: DecoderCut, t_kv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(query heads, key/value heads) to keep in one block: the most active groups, and in each the
    most active of its query heads, grouped so query head j of the student reads kv head j // per_group."""
    per_group = len(scores) // t_kv
    grouped = scores.view(t_kv, per_group)
    groups = _top(grouped.sum(-1), cut.kv_heads)
    keep = cut.heads // cut.kv_heads
    queries = torch.cat([g * per_group + _top(grouped[g], keep) for g in groups.tolist()])
    return queries, groups


def _dims(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads.unsqueeze(1) * head_dim + torch.arange(head_dim)).flatten()


#: Per block parameter: which index set slices each dimension ("q" = kept query heads' rows,
#: "kv" = kept key/value heads' rows, "channels", "neurons").
_BLOCK_SLICES = {
    "self_attn.q_proj.weight": ("q", "channels"), "self_attn.q_proj.bias": ("q",),
    "self_attn.k_proj.weight": ("kv", "channels"), "self_attn.k_proj.bias": ("kv",),
    "self_attn.v_proj.weight": ("kv", "channels"), "self_attn.v_proj.bias": ("kv",),
    "self_attn.o_proj.weight": ("channels", "q"),
    "mlp.gate_proj.weight": ("neurons", "channels"), "mlp.up_proj.weight": ("neurons", "channels"),
    "mlp.down_proj.weight": ("channels", "neurons"),
    "input_layernorm.weight": ("channels",), "post_attention_layernorm.weight": ("channels",),
}
_OUTER_SLICES = {"model.embed_tokens.weight": ("vocab", "channels"), "model.norm.weight": ("channels",),
                 "lm_head.weight": ("vocab", "channels")}


def student_config(teacher_config, cut: DecoderCut, vocab_size: int, token_ids: dict[str, int | None]):
    """The teacher's config with the student's sizes (and special-token ids after vocabulary trimming)."""
    config = teacher_config.__class__.from_dict(teacher_config.to_dict())
    config.update({"num_hidden_layers": cut.layers, "hidden_size": cut.hidden, "num_attention_heads": cut.heads,
                   "num_key_value_heads": cut.kv_heads, "intermediate_size": cut.ffn,
                   "head_dim": _head_dim(teacher_config), "vocab_size": vocab_size, **token_ids})
    return config


def cut_decoder(teacher: nn.Module, cut: DecoderCut, importance: Importance, keep_ids: list[int] | None = None,
                token_ids: dict[str, int | None] | None = None) -> nn.Module:
    """A fp32 student `LlamaForCausalLM` (or the teacher's family) holding the teacher's most active
    units: `kept_blocks`, then `_top` channels, heads and neurons; vocabulary rows
    `keep_ids` (default: all). `token_ids` overrides bos/eos/pad ids in the config (after trimming)."""
    from transformers import AutoModelForCausalLM

    tcfg = teacher.config
    if not can_cut(tcfg):
        raise SlmError(f"cutting a student out of the teacher needs a {'/'.join(DECODER_FAMILIES)} model, "
                       f"not '{tcfg.model_type}'; give a student shape to train from random weights")
    cut = cut.resolve(tcfg)
    keep_ids = list(range(tcfg.vocab_size)) if keep_ids is None else keep_ids
    config = student_config(tcfg, cut, len(keep_ids), token_ids or {})
    student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    head_dim = _head_dim(tcfg)
    t_kv = getattr(tcfg, "num_key_value_heads", None) or tcfg.num_attention_heads
    blocks = kept_blocks(importance, cut.layers)
    outer = {"channels": _top(importance.channels, cut.hidden), "vocab": torch.tensor(keep_ids)}
    weights = teacher.state_dict()
    state: dict[str, torch.Tensor] = {}
    for name in student.state_dict():
        if name.startswith("model.layers."):
            s_block, suffix = name.removeprefix("model.layers.").split(".", 1)
            t_block = blocks[int(s_block)]
            queries, groups = _kept_heads(importance.heads[t_block], cut, t_kv)
            index = {**outer, "q": _dims(queries, head_dim), "kv": _dims(groups, head_dim),
                     "neurons": _top(importance.neurons[t_block], cut.ffn)}
            slices = _BLOCK_SLICES.get(suffix)
            if slices is None:
                raise SlmError(f"cannot cut the teacher's '{suffix}' (an unknown block parameter)")
            state[name] = _take(weights[f"model.layers.{t_block}.{suffix}"], tuple(index[k] for k in slices))
        elif name in _OUTER_SLICES:
            state[name] = _take(weights[name], tuple(outer[k] for k in _OUTER_SLICES[name]))
    missing = student.load_state_dict(state, strict=False).missing_keys
    if set(missing) - {"lm_head.weight"}:  # a tied head has no weight of its own
        raise SlmError(f"the cut left {sorted(missing)[:3]} without weights")
    return student.eval()
