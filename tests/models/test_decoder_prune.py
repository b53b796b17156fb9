"""Cutting a student decoder out of a Llama teacher: exact where nothing is lost, whole GQA groups,
the blocks that change the residual stream most."""

from __future__ import annotations

import copy

import pytest
import torch

from smallmighty.errors import SlmError
from smallmighty.models.decoder_prune import DecoderCut, cut_decoder, decoder_importance, kept_blocks


@pytest.fixture(scope="module")
def teacher():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=4,
                         num_attention_heads=6, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


ROWS = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(1))


def _logits(model, ids=ROWS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_keeping_every_unit_reproduces_the_teachers_logits(teacher):
    importance = decoder_importance(teacher, ROWS)
    student = cut_decoder(teacher, DecoderCut(layers=4, ffn=80), importance)
    torch.testing.assert_close(_logits(student), _logits(teacher), rtol=1e-5, atol=1e-5)
    # With a trimmed vocabulary the student's logits are the teacher's kept columns.
    keep = [0, 3, 5, 17, 40, 95]
    trimmed = cut_decoder(teacher, DecoderCut(layers=4, ffn=80), importance, keep_ids=keep)
    ids = torch.tensor([[1, 2, 0, 4, 5, 3]])
    torch.testing.assert_close(_logits(trimmed, ids), _logits(teacher, torch.tensor([keep])[:, ids[0]])[..., keep],
                               rtol=1e-5, atol=1e-5)


def test_blocks_that_leave_the_residual_stream_unchanged_are_the_ones_dropped(teacher):
    # Blocks 1 and 2 write nothing to the residual stream (zero attention and FFN outputs): their
    # influence is 0, a 2-block student keeps blocks 0 and 3, and it computes exactly the teacher.
    idle = copy.deepcopy(teacher)
    for block in (1, 2):
        layer = idle.model.layers[block]
        torch.nn.init.zeros_(layer.self_attn.o_proj.weight)
        torch.nn.init.zeros_(layer.mlp.down_proj.weight)
    importance = decoder_importance(idle, ROWS)
    torch.testing.assert_close(importance.blocks[[1, 2]], torch.zeros(2), atol=1e-6, rtol=0)
    assert kept_blocks(importance, 2) == [0, 3]
    assert kept_blocks(importance, 3)[0] == 0 and kept_blocks(importance, 3)[-1] == 3
    student = cut_decoder(idle, DecoderCut(layers=2, ffn=80), importance)
    torch.testing.assert_close(_logits(student), _logits(idle), rtol=1e-5, atol=1e-5)


def test_the_most_active_units_are_kept_in_whole_key_value_groups(teacher):
    importance = decoder_importance(teacher, ROWS)
    importance.blocks = torch.tensor([0.1, 0.5, 0.2, 0.9])  # a 2-block student keeps teacher blocks 1 and 3
    block = 3
    # Group 1 (query heads 3, 4, 5) is the busiest; within it heads 5 and 3.
    importance.heads[block] = torch.tensor([5.0, 5.0, 0.0, 4.0, 0.1, 9.0])
    student = cut_decoder(teacher, DecoderCut(layers=2, hidden=32, heads=2, kv_heads=1, ffn=40), importance)
    cfg = student.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size, cfg.head_dim) == (2, 32, 2, 1, 40, 8)
    channels = importance.channels.topk(32).indices.sort().values
    t, s = teacher.model.layers[block].self_attn, student.model.layers[1].self_attn
    q_rows = torch.cat([torch.arange(24, 32), torch.arange(40, 48)])  # heads 3 and 5, 8 dims each
    torch.testing.assert_close(s.q_proj.weight, t.q_proj.weight[q_rows][:, channels])
    torch.testing.assert_close(s.k_proj.weight, t.k_proj.weight[8:16][:, channels])
    torch.testing.assert_close(s.o_proj.weight, t.o_proj.weight[channels][:, q_rows])
    neurons = importance.neurons[block].topk(40).indices.sort().values
    torch.testing.assert_close(student.model.layers[1].mlp.down_proj.weight,
                               teacher.model.layers[block].mlp.down_proj.weight[channels][:, neurons])
    assert _logits(student).shape == (4, 16, 96)


def test_shapes_that_do_not_fit_the_teacher_are_refused(teacher):
    with pytest.raises(SlmError, match="heads = kv_heads x 1..3"):
        DecoderCut(heads=5, kv_heads=2).resolve(teacher.config)
    with pytest.raises(SlmError, match="layers <= 4"):
        DecoderCut(layers=5).resolve(teacher.config)
    assert DecoderCut().resolve(teacher.config) == DecoderCut(3, 48, 6, 2, 48)  # 4/5 of the blocks, 3/5 of the FFN
    assert DecoderCut(heads=4).resolve(teacher.config).kv_heads == 2
