"""The on-disk teacher cache returns exactly what the teacher computed, and is rebuilt when stale."""

from __future__ import annotations

import torch

from smallmighty.distill.teacher_cache import CacheSpec, build_teacher_cache
from smallmighty.models.encoder import load_encoder_classifier

TEXTS = ["a short one", "a somewhat longer sentence about the weather today", "pizza", "goal for the team"]


def test_cache_round_trip_matches_teacher_outputs(tiny_encoder_dir, tmp_path):
    teacher, tok = load_encoder_classifier(str(tiny_encoder_dir), ["a", "b", "c"])
    teacher.set_attn_implementation("eager")
    teacher.eval()
    ids = tok(TEXTS)["input_ids"]
    spec = CacheSpec(top_k=2, hidden_layers=[0, 2], attention_layers=[1, 2])
    cache = build_teacher_cache(teacher, ids, tok.pad_token_id, spec, tmp_path / "c.safetensors", teacher_id="t",
                                batch_size=3)
    index = torch.tensor([1, 3])
    width = max(len(ids[1]), len(ids[3]))
    got = cache.batch(index, width)
    batch = tok([TEXTS[1], TEXTS[3]], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = teacher(**batch, output_hidden_states=True, output_attentions=True)
    values, indices = out.logits.topk(2, dim=-1)
    assert torch.allclose(got["topk_values"], values, atol=1e-5)
    assert torch.equal(got["topk_indices"], indices)
    for row, i in enumerate([1, 3]):
        n = len(ids[i])
        for j in (0, 2):
            assert torch.allclose(got["hidden"][j][row, :n], out.hidden_states[j][row, :n], atol=1e-2)  # fp16
            assert torch.all(got["hidden"][j][row, n:] == 0)
        for j in (1, 2):
            assert torch.allclose(got["attention"][j][row, :, :n, :n], out.attentions[j - 1][row, :, :n, :n],
                                  atol=1e-3)


def test_cache_is_reused_only_when_fingerprint_matches(tiny_encoder_dir, tmp_path):
    teacher, tok = load_encoder_classifier(str(tiny_encoder_dir), ["a", "b", "c"])
    ids = tok(TEXTS)["input_ids"]
    path = tmp_path / "c.safetensors"
    first = build_teacher_cache(teacher, ids, tok.pad_token_id, CacheSpec(top_k=2), path, teacher_id="t")
    mtime = path.stat().st_mtime_ns
    again = build_teacher_cache(teacher, ids, tok.pad_token_id, CacheSpec(top_k=2), path, teacher_id="t")
    assert path.stat().st_mtime_ns == mtime and again.fingerprint == first.fingerprint
    changed = build_teacher_cache(teacher, ids[:3], tok.pad_token_id, CacheSpec(top_k=2), path, teacher_id="t")
    assert changed.fingerprint != first.fingerprint and len(changed) == 3
