"""Cost rows: CPU time measured as CPU time, RAPL read where present, estimates labelled, dollars from a price."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from tiny_classifier import write_tiny_classifier
from tiny_llama import write_tiny_llama

from smallmighty.errors import SlmError
from smallmighty.evaluate import cost
from smallmighty.evaluate.report import format_table, render_html, summarize


def fake_rapl(root: Path, packages: dict[str, int], max_range: int = 10**9) -> Path:
    """A powercap tree: package domains with counters, and a sub-domain that must not be added."""
    for name, value in packages.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / "energy_uj").write_text(f"{value}\n")
        (root / name / "max_energy_range_uj").write_text(f"{max_range}\n")
    (root / "intel-rapl:0:0").mkdir(exist_ok=True)
    (root / "intel-rapl:0:0" / "energy_uj").write_text("999999999\n")
    return root


def test_rapl_sums_package_domains_only(tmp_path):
    root = fake_rapl(tmp_path, {"intel-rapl:0": 5_000_000, "intel-rapl:1": 2_000_000})
    assert cost.rapl_energy_uj(root) == 7_000_000
    assert cost.rapl_energy_uj(tmp_path / "missing") is None
    (root / "intel-rapl:1" / "energy_uj").write_text("not a number")
    assert cost.rapl_energy_uj(root) is None


def test_meter_reads_energy_across_a_wrap_around(tmp_path):
    root = fake_rapl(tmp_path, {"intel-rapl:0": 999_000_000}, max_range=1_000_000_000)
    with cost.Meter(root) as meter:
        (root / "intel-rapl:0" / "energy_uj").write_text("1000000\n")  # wrapped: 1 J + 1 J
    assert meter.energy_j == pytest.approx(2.0)
    with cost.Meter(tmp_path / "none") as meter:
        pass
    assert meter.energy_j is None


def burn(cpu_seconds: float) -> None:
    end = time.process_time() + cpu_seconds
    while time.process_time() < end:
        pass


def test_request_cost_is_cpu_time_not_wall_time():
    asleep = cost.request_cost(lambda _: time.sleep(0.005), range(40))  # 5 ms of wall time, no CPU
    busy = cost.request_cost(lambda _: burn(0.004), range(40))  # 4 ms of CPU each
    assert asleep["cpu_s_per_1k"] < 1.0
    assert 4.0 <= busy["cpu_s_per_1k"] < 6.0
    with pytest.raises(ValueError):
        cost.request_cost(print, [])


def cost_card(**assumed) -> dict:
    models = [{"name": "student", "role": "student", "runtime": "onnx", "cpu_s_per_1k": 0.72, "rapl_j_per_1k": None,
               "standalone_cold_start_s": 0.41, "standalone_peak_rss_mb": 76.0},
              {"name": "teacher", "role": "teacher", "runtime": "onnx", "cpu_s_per_1k": 5.4, "rapl_j_per_1k": 31.0},
              {"name": "old", "role": "baseline", "runtime": "x"}]  # not measured: no row
    return {"models": models, **({"cost": cost.cost_assumptions(**assumed)} if assumed else {})}


def test_cost_rows_state_where_energy_comes_from_and_price_dollars():
    rows = cost.cost_rows(cost_card(price_per_core_hour=0.10, watts_per_core=4.0))
    assert [r["model"] for r in rows] == ["student (onnx)", "teacher (onnx)"]
    student, teacher = rows
    assert student["energy_j_per_1k"] == pytest.approx(0.72 * 4.0)
    assert student["energy_source"] == "estimate, 4 W per busy core"
    assert teacher["energy_j_per_1k"] == 31.0 and teacher["energy_source"] == "RAPL"
    assert student["usd_per_1m"] == pytest.approx(0.72 * 1000 / 3600 * 0.10)
    defaults = cost.cost_rows(cost_card())[0]
    assert defaults["usd_per_1m"] == pytest.approx(0.72 * 1000 / 3600 * cost.DEFAULT_PRICE_PER_CORE_HOUR)
    with pytest.raises(SlmError, match="price per core-hour must be a positive number"):
        cost.cost_assumptions(price_per_core_hour=0)


def report_card(**extra: dict) -> dict:
    def row(name: str, role: str, p50: float) -> dict:
        return {"name": name, "role": role, "runtime": "onnx", "params": 1000, "disk_mb": 1.0, "accuracy": 0.9,
                "macro_f1": 0.9, "latency_ms_p50": p50, "latency_ms_p95": p50, "throughput_per_s": 100.0,
                "peak_rss_mb": 100.0, **extra.get(name, {})}
    return {"title": "t", "task": {}, "hardware": {}, "training": {},
            "models": [row("teacher", "teacher", 5.0), row("student", "student", 1.0)]}


def test_report_shows_the_cost_table_only_when_costs_were_measured():
    assert "CPU s / 1k requests" not in format_table(report_card())
    measured = report_card(teacher={"cpu_s_per_1k": 5.4, "rapl_j_per_1k": None},
                           student={"cpu_s_per_1k": 0.72, "rapl_j_per_1k": None, "standalone_cold_start_s": 0.41,
                                    "standalone_peak_rss_mb": 76.0})
    text = format_table(measured)
    assert "CPU s / 1k requests" in text and "estimate, 5 W per busy core" in text and "0.720" in text
    page = render_html(measured, summarize(measured))
    assert "<h2>Cost</h2>" in page and "torch-free start s" in page and "0.41" in page


def test_decoder_cost_counts_cpu_per_generated_token(tmp_path):
    from smallmighty.engine.generate import Engine

    engine = Engine.from_pretrained(write_tiny_llama(tmp_path / "tiny"), precision="fp32")
    eos = set(engine.eos_token_ids)
    measured = cost.decoder_cost(engine, [5, 6, 7], new_tokens=16)
    assert measured["cpu_s_per_1k_tokens"] > 0 and engine.eos_token_ids == eos


def test_standalone_start_is_a_small_torch_free_process(tmp_path):
    from smallmighty.compress.classifier_export import export_classifier_onnx

    folder = export_classifier_onnx(write_tiny_classifier(tmp_path / "clf"), tmp_path / "export")
    start = cost.standalone_start(folder, "my card has not arrived")
    assert 0 < start["cold_start_s"] < 30
    # torch alone takes over 300 MB; onnxruntime, tokenizers and a tiny model stay far below.
    assert 10 < start["peak_rss_mb"] < 150
