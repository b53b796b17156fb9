"""ROUGE-L against hand-computed values, and the answers report with its side-by-side table."""

from __future__ import annotations

import json

import pytest

from smallmighty.evaluate.answers import (
    answers_card,
    lcs_length,
    mean_rouge_l,
    rouge_l,
    words,
    write_answers_report,
)


def test_words_follow_rouge_scores_tokenisation() -> None:
    assert words("Hello, World! It's 3pm -- café") == ["hello", "world", "it", "s", "3pm", "caf"]


def test_lcs_is_the_longest_common_subsequence_not_substring() -> None:
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4  # the textbook case: BCBA
    assert lcs_length(list("ABC"), []) == 0 and lcs_length(list("AXBYC"), list("ABC")) == 3


@pytest.mark.parametrize("candidate, reference, expected", [
    ("the cat sat on the mat", "the cat is on the mat", 5 / 6),   # LCS the cat on the mat: P = R = 5/6
    ("a b c d", "a c", 2 * 0.5 * 1.0 / 1.5),                          # P = 2/4, R = 2/2
    ("Hello, World!", "hello world", 1.0),
    ("", "hello", 0.0),
    ("completely different", "nothing shared", 0.0),
])
def test_rouge_l_f1_by_hand(candidate, reference, expected) -> None:
    assert rouge_l(candidate, reference) == pytest.approx(expected)


def test_mean_rouge_l_needs_pairs() -> None:
    assert mean_rouge_l(["a b", "c"], ["a b", "d"]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        mean_rouge_l(["a"], [])


def test_report_shows_every_model_and_the_answers_side_by_side(tmp_path) -> None:
    card = answers_card(
        title="Answers <test>", prompts=["What is 2+2?", "Say hi"],
        teacher={"name": "teacher", "params": 100_000_000, "answers": ["It is 4.", "Hi there!"], "ended": 2},
        students=[{"name": "student before", "params": 50_000_000, "answers": ["banana", "Hi"], "answer_ppl": 80.0,
                   "ended": 0},
                  {"name": "student after (LoRA)", "params": 50_000_000, "answers": ["It is 4.", "Hi there"],
                   "answer_ppl": 3.5, "ended": 1}])
    before, after = card["models"][1:]
    assert [m["ended"] for m in card["models"]] == [2, 0, 1]
    assert before["rouge_l"] == pytest.approx((0 + 2 * 1 * 0.5 / 1.5) / 2) and after["rouge_l"] == pytest.approx(1.0)
    json_path, html_path = write_answers_report(tmp_path, card)
    assert json.loads(json_path.read_text())["answers"][0] == {
        "prompt": "What is 2+2?", "teacher": "It is 4.", "student before": "banana", "student after (LoRA)": "It is 4."}
    page = html_path.read_text()
    assert "Answers &lt;test&gt;" in page and "<script" not in page
    for text in ("student after (LoRA)", "banana", "Hi there!", "80.00", "3.50", "50.0M", "answers that end",
                 "<td>0</td>"):
        assert text in page
