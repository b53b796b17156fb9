"""Greedy decoding in our engine against transformers on a saved model folder.

A plain module next to conftest.py (pytest puts this folder on sys.path), not a test file.
"""

from __future__ import annotations

from pathlib import Path

import torch

# int8 weights move a small model's logits by a few hundredths; where transformers' best two tokens
# are closer than this, either choice is right and the comparison skips the position.
INT8_TIE = 0.1


def assert_engine_follows_transformers(model_dir: Path, texts: list[str], precision: str,
                                       max_new_tokens: int = 20) -> list[list[int]]:
    """fp32: the engine's greedy continuation of each text equals transformers' token for token.
    int8: fed transformers' continuation, the engine picks transformers' next token at every
    position whose top-two margin is at least `INT8_TIE` (a greedy run would wander off at the first
    near-tie). Returns transformers' continuations."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from smallmighty.engine.generate import Engine
    from smallmighty.engine.sampling import GenerationSettings

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [tokenizer(text)["input_ids"] for text in texts]
    hf = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.inference_mode():
        expected = [hf.generate(torch.tensor([p]), max_new_tokens=max_new_tokens, do_sample=False,
                                eos_token_id=None)[0, len(p):].tolist() for p in prompts]
    engine = Engine.from_pretrained(model_dir, precision=precision)
    engine.eos_token_ids = set()
    assert [engine.encode(text) for text in texts] == prompts
    if precision == "fp32":
        assert [engine.generate([p], GenerationSettings(max_new_tokens=max_new_tokens))[0] for p in prompts] == expected
        return expected
    prefixes, margins = [], []
    for prompt, continuation in zip(prompts, expected):
        sequence = prompt + continuation
        with torch.inference_mode():
            top = hf(torch.tensor([sequence])).logits[0, len(prompt) - 1:-1].topk(2, dim=-1).values
        margins += (top[:, 0] - top[:, 1]).tolist()
        prefixes += [sequence[:len(prompt) + i] for i in range(len(continuation))]
    chosen = [row[0] for row in engine.generate(prefixes, GenerationSettings(max_new_tokens=1))]
    wanted = [token for continuation in expected for token in continuation]
    decisive = [i for i, margin in enumerate(margins) if margin >= INT8_TIE]
    assert len(decisive) >= len(wanted) // 2, "too few decisive positions to compare"
    assert [chosen[i] for i in decisive] == [wanted[i] for i in decisive]
    return expected
