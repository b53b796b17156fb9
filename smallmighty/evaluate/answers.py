"""How close a student's answers come to its teacher's: ROUGE-L, perplexity on the teacher's answers,
and the answers side by side in a self-contained HTML report.

ROUGE-L is the F1 of the longest common subsequence of words, computed here exactly with the
tokenisation of Google's `rouge-score` package (lower case, runs of characters other than a-z and
0-9 split words, no stemming), so figures compare with papers that use it; it equals that package on
the answers of bench/chat_student.py without pulling in its nltk dependency.

Perplexity on the teacher's answers (of the answer tokens only, prompt given) says how likely the
student finds what the teacher would say; it moves smoothly where ROUGE-L of greedy answers jumps.
"""

from __future__ import annotations

import re
from pathlib import Path

from smallmighty.evaluate.report import _e, document, hardware_and_training
from smallmighty.io import write_json, write_text

_NON_WORD = re.compile(r"[^a-z0-9]+")


def words(text: str) -> list[str]:
    """rouge-score's default tokens: lower case, split on anything but a-z and 0-9."""
    return _NON_WORD.sub(" ", text.lower()).split()


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, one row at a time)."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 of `candidate` against `reference` (0 when either has no words)."""
    c, r = words(candidate), words(reference)
    common = lcs_length(c, r) if c and r else 0
    if not common:
        return 0.0
    precision, recall = common / len(c), common / len(r)
    return 2 * precision * recall / (precision + recall)


def mean_rouge_l(candidates: list[str], references: list[str]) -> float:
    if len(candidates) != len(references) or not candidates:
        raise ValueError("ROUGE-L needs as many candidates as references, at least one")
    return sum(rouge_l(c, r) for c, r in zip(candidates, references)) / len(candidates)


# ---- the report --------------------------------------------------------------------------------

def answers_card(*, title: str, prompts: list[str], teacher: dict, students: list[dict],
                 training: dict | None = None, hardware: dict | None = None, shown: int = 30) -> dict:
    """A report card for learning from a teacher's answers.

    `teacher` is {"name", "params", "answers", optionally "ended"}; each of `students` is {"name",
    "params", "answers", "answer_ppl", optionally "ended", ...} (the untuned student first, then each
    tuned one). "ended" counts the answers that end with an end-of-turn token, not at the token limit.
    ROUGE-L against the teacher's answers is computed here; the first `shown` prompts are kept side by
    side.
    """
    rows = [{"name": teacher["name"], "role": "teacher", "params": teacher["params"], "rouge_l": 1.0,
             "answer_ppl": teacher.get("answer_ppl"), "ended": teacher.get("ended")}]
    for s in students:
        rows.append({"name": s["name"], "role": "student", "params": s["params"],
                     "rouge_l": mean_rouge_l(s["answers"], teacher["answers"]), "answer_ppl": s.get("answer_ppl"),
                     **{k: v for k, v in s.items() if k not in ("name", "params", "answers", "answer_ppl")}})
    side = [{"prompt": p, "teacher": teacher["answers"][i], **{s["name"]: s["answers"][i] for s in students}}
            for i, p in enumerate(prompts[:shown])]
    return {"title": title, "task": {"held_out_prompts": len(prompts)}, "models": rows, "answers": side,
            "training": training or {}, "hardware": hardware or {}}


def _models_html(models: list[dict]) -> str:
    head = "".join(f"<th>{h}</th>" for h in ("model", "role", "params", "ROUGE-L vs teacher", "answer perplexity",
                                             "answers that end"))
    body = "".join(
        f'<tr><td class="text">{_e(m["name"])}</td><td class="text">{_e(m["role"])}</td>'
        f'<td>{m["params"] / 1e6:.1f}M</td><td>{m["rouge_l"]:.3f}</td>'
        f'<td>{"-" if m.get("answer_ppl") is None else format(m["answer_ppl"], ".2f")}</td>'
        f'<td>{"-" if m.get("ended") is None else m["ended"]}</td></tr>' for m in models)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _answers_html(answers: list[dict]) -> str:
    if not answers:
        return "<p>(no answers kept)</p>"
    columns = list(answers[0])
    head = "".join(f'<th class="text">{_e(c)}</th>' for c in columns)
    body = "".join("<tr>" + "".join(f'<td class="text answer">{_e(a[c])}</td>' for c in columns) + "</tr>"
                   for a in answers)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_answers_html(card: dict) -> str:
    """The report page: the figures, then the answers side by side (self-contained, no scripts)."""
    return document(
        _e(card["title"]),
        f"<p>ROUGE-L: longest common word subsequence F1 of each model's greedy answers against the "
        f"teacher's, on {card['task']['held_out_prompts']} held-out prompts. Answer perplexity: the model's "
        f"perplexity on the teacher's answer tokens, prompt given (lower is closer to the teacher).</p>\n"
        f"<h2>Models</h2>{_models_html(card['models'])}\n"
        f"<h2>Answers side by side</h2>{_answers_html(card['answers'])}\n{hardware_and_training(card)}",
        css=".answer{white-space:pre-wrap;vertical-align:top;max-width:28em;font-size:90%}\n")


def write_answers_report(out_dir: str | Path, card: dict) -> tuple[Path, Path]:
    """`report.json` and `report.html` in `out_dir`."""
    out_dir = Path(out_dir)
    write_json(out_dir / "report.json", card)
    write_text(out_dir / "report.html", render_answers_html(card))
    return out_dir / "report.json", out_dir / "report.html"
