"""The causal-LM report card: perplexity on one scale for every tokenizer, ratios, the HTML page."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny_llama import write_tiny_llama

from smallmighty.evaluate.lm_card import (
    _TransformersWindows,
    format_lm_table,
    publish_lm,
    summarize_lm,
    text_nll,
)
from smallmighty.evaluate.perplexity import perplexity

TEXT = "The capital of France is Paris. A small model answers short questions about the world. " * 6


def _row(name: str, role: str, ppl: float, params: int, tok_s: float | None, curve=None) -> dict:
    return {"name": name, "role": role, "runtime": "ours", "params": params, "disk_mb": params * 4 / 2**20,
            "val_ppl": ppl, "decode_tok_s_fp32": tok_s, "decode_tok_s_int8": tok_s and tok_s * 3,
            "peak_rss_mb": 100.0, "peak_rss_mb_int8": 80.0, "curve": curve or []}


CARD = {"title": "t", "task": {"corpus": "c"}, "hardware": {"cpu": "x"}, "training": {},
        "models": [_row("teacher", "teacher", 20.0, 1000, 10.0),
                   _row("student", "student", 25.0, 400, 30.0, [{"tokens": 0, "val_ppl": 90.0},
                                                                {"tokens": 2048, "val_ppl": 30.0}]),
                   _row("scratch", "baseline", 50.0, 400, 30.0, [{"tokens": 2048, "val_ppl": 60.0}])]}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny"))


def test_summary_compares_each_model_with_the_teacher():
    student, scratch = summarize_lm(CARD)["comparisons"]
    assert student["ppl_ratio"] == pytest.approx(1.25) and student["size_ratio"] == pytest.approx(2.5)
    assert student["speedup_fp32"] == pytest.approx(3.0) and student["speedup_int8"] == pytest.approx(3.0)
    assert scratch["ppl_ratio"] == pytest.approx(2.5)
    headline = summarize_lm(CARD)["headline"]
    assert "1.25x the teacher's validation perplexity" in headline and "2.5x fewer parameters" in headline
    assert "reaches 50.00" in headline and "0.50x the scratch model's" in headline
    assert "25.00" in format_lm_table(CARD)


def test_the_report_is_json_and_a_self_contained_page(tmp_path, capsys):
    summary = publish_lm(tmp_path, CARD)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(summary)) and saved["models"][1]["curve"][1]["val_ppl"] == 30.0
    html = (tmp_path / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 5 and "<script" not in html and "src=\"http" not in html
    assert "report.html" in capsys.readouterr().out


def test_perplexity_is_per_reference_token(tiny):
    from tokenizers import Tokenizer

    from smallmighty.engine.generate import Engine

    nll, tokens, runtime = text_nll(tiny, TEXT, context=32)
    ids = Tokenizer.from_file(str(tiny / "tokenizer.json")).encode(TEXT, add_special_tokens=False).ids
    assert runtime == "ours" and tokens == len(ids)
    own = perplexity(Engine.from_pretrained(tiny).model, ids, context=32, stride=16, progress=False)
    assert math.exp(nll / (tokens - 1)) == pytest.approx(own, rel=1e-6)
    # transformers over the same windows gives the same figure (how models our engine lacks are scored).
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny).eval()
    with torch.inference_mode():
        assert perplexity(_TransformersWindows(hf), ids, context=32, stride=16, progress=False) == \
            pytest.approx(own, rel=1e-4)


def test_parameters_are_counted_from_the_weights_file(tiny):
    from transformers import AutoModelForCausalLM

    from smallmighty.models.causal_lm import count_parameters_on_disk
    from smallmighty.models.encoder import count_parameters

    assert count_parameters_on_disk(tiny) == count_parameters(AutoModelForCausalLM.from_pretrained(tiny))
