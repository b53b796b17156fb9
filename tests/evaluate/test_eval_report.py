"""Report card: comparison maths, the JSON and self-contained HTML outputs, and the terminal table."""

from __future__ import annotations

import copy
import html
import json
import re
from pathlib import Path

import pytest

from smallmighty.errors import SlmError
from smallmighty.evaluate.report import format_table, summarize, write_report


def model(name: str, role: str, runtime: str = "torch", **figures: float | int | None) -> dict:
    base = {"name": name, "role": role, "runtime": runtime, "params": 1000, "disk_mb": 1.0, "accuracy": 0.5,
            "macro_f1": 0.5, "latency_ms_p50": 1.0, "latency_ms_p95": 2.0, "throughput_per_s": 100.0,
            "peak_rss_mb": 100.0}
    return {**base, **figures}


TEACHER = model("big-teacher", "teacher", params=20_000_000, disk_mb=80.0, accuracy=0.90, macro_f1=0.80,
                latency_ms_p50=12.0, latency_ms_p95=16.0, throughput_per_s=400.0, peak_rss_mb=600.0)
STUDENT = model("tiny-student", "student", params=4_000_000, disk_mb=16.0, accuracy=0.882, macro_f1=0.76,
                latency_ms_p50=3.0, latency_ms_p95=4.5, throughput_per_s=2000.0, peak_rss_mb=300.0)
BASELINE = model("tfidf", "baseline", runtime="sklearn", params=None, disk_mb=8.0, accuracy=0.855,
                 macro_f1=0.72, latency_ms_p50=2.4, latency_ms_p95=3.1, throughput_per_s=3000.0, peak_rss_mb=None)


def card(*models: dict) -> dict:
    return {"title": "Test card", "task": {"dataset": "toy", "n_train": 100, "n_test": 40, "num_labels": 3},
            "hardware": {"cores": 2, "torch_threads": 2, "platform": "Linux"}, "models": list(models),
            "training": {"epochs": 3, "schedule": {"lr": 1e-4}}}


def test_summarize_compares_with_the_teacher() -> None:
    summary = summarize(card(TEACHER, STUDENT, BASELINE))
    assert summary["teacher"] == "big-teacher (torch)"
    student, baseline = summary["comparisons"]
    assert student["model"] == "tiny-student (torch)"
    assert student["retained"] == pytest.approx(0.882 / 0.90)  # 0.98
    assert student["f1_retained"] == pytest.approx(0.95)
    assert student["speedup"] == pytest.approx(4.0)
    assert student["throughput_ratio"] == pytest.approx(5.0)
    assert student["size_ratio"] == pytest.approx(5.0)
    assert student["disk_ratio"] == pytest.approx(5.0)
    assert student["memory_ratio"] == pytest.approx(2.0)
    assert baseline["speedup"] == pytest.approx(5.0)
    assert baseline["size_ratio"] is None and baseline["memory_ratio"] is None  # missing figures, no ratio
    assert summary["headline"] == ("Student tiny-student (torch) keeps 98.0% of the teacher's accuracy with "
                                   "5.0x fewer parameters and runs 4.0x faster at batch 1 "
                                   "(teacher: big-teacher (torch)). The most accurate model here is big-teacher "
                                   "(torch): accuracy 90.0% against the student's 88.2%, +2.7 points against "
                                   "the baseline.")
    assert summary["best"] == "big-teacher (torch)"
    assert summary["recommended"]["role"] == "student"


def margins(student: dict, baseline: dict, low: float, high: float, metric: str = "accuracy") -> list[dict]:
    return [{"model": f"{student['name']} ({student['runtime']})", "versus": f"{baseline['name']} ({baseline['runtime']})",
             "role": "baseline", "metric": metric, "margin": student[metric] - baseline[metric], "ci95": [low, high]}]


def test_headline_when_the_student_is_the_best_model() -> None:
    best_student = {**STUDENT, "accuracy": 0.912}
    with_margins = {**card(TEACHER, best_student, BASELINE),
                    "student_margins": margins(best_student, BASELINE, 0.031, 0.083)}
    summary = summarize(with_margins)
    assert summary["headline"] == (
        "Student tiny-student (torch) is the most accurate model here: accuracy 91.2%, +5.7 points against the "
        "baseline (95% CI +3.1 to +8.3). It keeps 101.3% of the teacher's accuracy with 5.0x fewer parameters and "
        "runs 4.0x faster at batch 1 (teacher: big-teacher (torch)).")
    assert summary["best"] == summary["recommended"]["model"] == "tiny-student (torch)"
    unclear = summarize({**with_margins, "student_margins": margins(best_student, BASELINE, -0.004, 0.02)})
    assert "(95% CI -0.4 to +2.0, not a clear difference)" in unclear["headline"]


@pytest.mark.parametrize("baseline_accuracy, teacher_part", [
    (0.95, "the teacher scores 90.0%"),            # the baseline is the best model on the card
    (0.89, "only the teacher scores higher, 90.0%"),  # the baseline beats the student, not the teacher
])
def test_headline_when_the_baseline_beats_the_student(baseline_accuracy: float, teacher_part: str) -> None:
    """Users act on the headline: a baseline that wins is named first, with the margin, and recommended."""
    strong = {**BASELINE, "accuracy": baseline_accuracy}
    summary = summarize({**card(TEACHER, STUDENT, strong),
                         "student_margins": margins(STUDENT, strong, -0.081, -0.052)})
    gap = (baseline_accuracy - 0.882) * 100
    assert summary["headline"].startswith(
        f"The baseline tfidf (sklearn) beats the student: accuracy {baseline_accuracy:.1%} against 88.2%, "
        f"{gap:.1f} points ahead (95% CI 5.2 to 8.1); {teacher_part}. Use the baseline rather than the student. "
        "Student tiny-student (torch) keeps 98.0% of the teacher's accuracy")
    assert summary["recommended"]["role"] == "baseline"


def test_several_seeds_are_weighed_by_their_mean() -> None:
    """One lucky seed must not make the student look better than the baseline: the seeds' mean is what a
    user can expect (banking77, 2026-12-01: seed 0 at 91.17% beat TF-IDF at 91.10%; the mean was 90.66%)."""
    seeds = [{**STUDENT, "name": f"tiny-student seed {i}", "accuracy": a} for i, a in enumerate((0.870, 0.840, 0.860))]
    baseline = {**BASELINE, "accuracy": 0.865}
    summary = summarize({**card(TEACHER, *seeds, baseline), "training": {"student_seeds": [0, 1, 2]}})
    assert summary["recommended"]["role"] == "baseline"
    assert summary["headline"].startswith(
        "The baseline tfidf (sklearn) is level with the student: accuracy 86.5% against 85.7% (the mean of 3 "
        "student seeds), 0.83 points ahead, within the student seeds' standard deviation (1.53 points); only the "
        "teacher scores higher, 90.0%. Use the baseline rather than the student.")
    ahead = summarize({**card(TEACHER, *seeds, {**baseline, "accuracy": 0.88}), "training": {"student_seeds": [0, 1, 2]}})
    assert ahead["recommended"]["role"] == "baseline"
    assert ahead["headline"].startswith("The baseline tfidf (sklearn) beats the student: accuracy 88.0% against "
                                        "85.7% (the mean of 3 student seeds), 2.33 points ahead, beyond the student "
                                        "seeds' standard deviation (1.53 points);")
    weaker = {**baseline, "accuracy": 0.80}
    summary = summarize({**card(TEACHER, *seeds, weaker), "training": {"student_seeds": [0, 1, 2]}})
    assert summary["recommended"]["role"] == "student"
    assert summary["headline"].startswith(
        "Student tiny-student (torch), the mean of 3 seeds, keeps 95.2% of the teacher's accuracy")
    assert "against the student's 85.7%, +5.7 points against the baseline." in summary["headline"]
    # seed 1 alone is under the teacher; seed 0 alone runs 4.0x faster than the teacher, the seeds' mean 6.0x
    best = [{**s, "accuracy": a, "latency_ms_p50": ms} for s, a, ms in zip(seeds, (0.93, 0.89, 0.91), (3.0, 2.0, 1.0))]
    summary = summarize({**card(TEACHER, *best, weaker), "training": {"student_seeds": [0, 1, 2]}})
    assert summary["headline"].startswith(
        "Student tiny-student (torch), the mean of 3 seeds, is the most accurate model here: accuracy 91.0%, "
        "+11.0 points against the baseline. It keeps 101.1% of the teacher's accuracy with 5.0x fewer parameters "
        "and runs 6.0x faster at batch 1")


def test_headline_follows_the_primary_metric() -> None:
    """On imbalanced data the card's primary metric is macro-F1, and the headline weighs models by it."""
    f1_card = {**card(TEACHER, STUDENT, {**BASELINE, "accuracy": 0.95, "macro_f1": 0.70}),
               "primary_metric": "macro_f1"}
    summary = summarize(f1_card)
    assert summary["recommended"]["role"] == "student"
    assert "keeps 95.0% of the teacher's macro-F1" in summary["headline"]
    assert "macro-F1 80.0% against the student's 76.0%, +6.0 points against the baseline" in summary["headline"]


def test_each_model_is_compared_with_the_teacher_on_its_own_runtime() -> None:
    onnx_teacher = {**TEACHER, "runtime": "onnx", "latency_ms_p50": 4.0}
    onnx_student = {**STUDENT, "runtime": "onnx", "latency_ms_p50": 1.0}
    summary = summarize(card(TEACHER, onnx_teacher, STUDENT, onnx_student, BASELINE))
    speedups = {c["model"]: (c["teacher"], c["speedup"]) for c in summary["comparisons"]}
    assert speedups["tiny-student (onnx)"] == ("big-teacher (onnx)", pytest.approx(4.0))
    assert speedups["tiny-student (torch)"] == ("big-teacher (torch)", pytest.approx(4.0))
    assert speedups["tfidf (sklearn)"] == ("big-teacher (torch)", pytest.approx(5.0))  # no sklearn teacher


def test_a_slower_bigger_student_is_worded_as_such() -> None:
    slow = {**STUDENT, "params": 40_000_000, "latency_ms_p50": 24.0}
    assert "2.0x more parameters and runs 2.0x slower" in summarize(card(TEACHER, slow))["headline"]


def test_no_teacher_means_no_comparisons() -> None:
    summary = summarize(card(STUDENT))
    assert summary["teacher"] is None and summary["comparisons"] == []
    assert "88.2%" in summary["headline"] and "no teacher" in summary["headline"]


@pytest.mark.parametrize(("change", "match"), [
    ({"role": "teaher"}, "field 'role'"),
    ({"accuracy": float("nan")}, "field 'accuracy'"),
    ({"latency_ms_p50": None}, "field 'latency_ms_p50'"),
    ({"name": ""}, "field 'name'"),
])
def test_bad_cards_name_the_model_and_field(change: dict, match: str) -> None:
    with pytest.raises(SlmError, match=f"model 2.*{match}"):
        summarize(card(TEACHER, {**STUDENT, **change}))
    with pytest.raises(SlmError, match="non-empty 'models'"):
        summarize(card())


def test_write_report_writes_json_and_self_contained_html(tmp_path: Path) -> None:
    original = card(TEACHER, STUDENT, BASELINE)
    kept = copy.deepcopy(original)
    json_path, html_path = write_report(tmp_path / "out", original)
    assert original == kept  # the caller's card is not modified
    assert (json_path, html_path) == (tmp_path / "out" / "report.json", tmp_path / "out" / "report.html")

    data = json.loads(json_path.read_text())
    assert data["models"] == kept["models"] and data["training"] == kept["training"]
    assert data["summary"]["comparisons"][0]["speedup"] == pytest.approx(4.0)

    page = html_path.read_text()
    for name in ("big-teacher", "tiny-student", "tfidf"):
        assert name in page
    for number in ("90.00%", "88.20%", "85.50%", "12.00", "4.50", "2000", "20.0M", "98.0%", "4.00x"):
        assert number in page
    assert html.escape(data["summary"]["headline"]) in page
    assert len(re.findall(r'<img src="data:image/png;base64,[A-Za-z0-9+/=]{200,}"', page)) == 5
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert "<style>" in page


def test_student_only_card_renders(tmp_path: Path) -> None:
    _, html_path = write_report(tmp_path, card(STUDENT))
    page = html_path.read_text()
    assert "tiny-student" in page and "Compared with the teacher" not in page
    assert page.count("data:image/png;base64,") == 5


def test_user_strings_are_escaped(tmp_path: Path) -> None:
    evil = {**STUDENT, "name": "<b>x</b>", "runtime": "$onnx"}
    hostile = card(TEACHER, evil)
    hostile["title"] = "<script>alert(1)</script>"
    hostile["training"] = {"<i>note</i>": "a & b"}
    _, html_path = write_report(tmp_path, hostile)
    page = html_path.read_text()
    assert "<b>x</b>" not in page and "&lt;b&gt;x&lt;/b&gt;" in page
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "&lt;i&gt;note&lt;/i&gt;" in page and "a &amp; b" in page


def test_format_table_lines_up_columns() -> None:
    text = format_table(card(TEACHER, STUDENT, BASELINE))
    lines = text.splitlines()
    header, rule, *rows = lines[:5]
    assert header.split()[:3] == ["model", "role", "runtime"]
    assert len({len(line) for line in (header, rule, *rows)}) == 1  # fixed width
    assert "tiny-student" in rows[1] and "88.20%" in rows[1] and "4.0M" in rows[1]
    assert rows[2].split()[3] == "-"  # the baseline has no parameter count
    comparison = text.split("vs teacher")[1]  # the comparison table follows
    assert "98.0%" in comparison and "4.00x" in comparison and "5.0x" in comparison
    assert lines[-1] == summarize(card(TEACHER, STUDENT, BASELINE))["headline"]
