"""The report card: teacher, students and baseline side by side, as JSON, HTML and a terminal table.

A card is a plain JSON-serialisable dict so it can be written, read back and re-rendered without any
of the models around:

    {"title": str,
     "task": {"dataset": str, "n_train": int, "n_test": int, "num_labels": int},
     "hardware": {...},            # e.g. speed.hardware_info()
     "models": [{"name", "role": "teacher"|"student"|"baseline", "runtime", "params": int|None,
                 "disk_mb", "accuracy", "macro_f1", "latency_ms_p50", "latency_ms_p95",
                 "throughput_per_s", "peak_rss_mb": float|None}, ...],
     "training": {...}}            # free-form

The HTML page is self-contained (inline CSS, charts as base64 PNGs, no scripts, no links) so it can be
mailed, attached to a CI run or opened offline and still show everything.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
import statistics
from pathlib import Path
from typing import Any, Callable

from smallmighty.errors import SlmError
from smallmighty.evaluate.cost import cost_html, format_cost_table
from smallmighty.io import write_json, write_text

ROLES = ("teacher", "student", "baseline")
ROLE_COLOURS = {"teacher": "#3b6ea8", "student": "#e07b39", "baseline": "#8c8c8c"}
_NUMBERS = ("disk_mb", "accuracy", "macro_f1", "latency_ms_p50", "latency_ms_p95", "throughput_per_s")
_OPTIONAL_NUMBERS = ("params", "peak_rss_mb")
#: How a student's name says which seed it is (`pipeline.run_pipeline`): dropped where the seeds' mean speaks.
_SEED_SUFFIX = re.compile(r" seed \d+")


def validate_card(card: dict) -> None:
    """Raise `SlmError` naming the model and field if the card does not follow the schema."""
    if not isinstance(card, dict) or not isinstance(card.get("models"), list) or not card["models"]:
        raise SlmError("a report card needs a non-empty 'models' list")
    for i, model in enumerate(card["models"]):
        where = f"report card, model {i + 1}"
        if not isinstance(model, dict):
            raise SlmError(f"{where}: expected an object, got {type(model).__name__}")
        for key in ("name", "runtime"):
            if not isinstance(model.get(key), str) or not model[key]:
                raise SlmError(f"{where}, field '{key}': expected a non-empty string")
        if model.get("role") not in ROLES:
            raise SlmError(f"{where}, field 'role': expected one of {', '.join(ROLES)}, got {model.get('role')!r}")
        for key in _NUMBERS + _OPTIONAL_NUMBERS:
            value = model.get(key)
            if value is None and key in _OPTIONAL_NUMBERS:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise SlmError(f"{where} ({model['name']}), field '{key}': expected a finite number >= 0, "
                               f"got {value!r}")


def model_label(model: dict) -> str:
    """A model's display name; the runtime is part of it because one model often appears once per runtime."""
    return f"{model['name']} ({model['runtime']})"


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def _reference_teacher(teachers: list[dict], model: dict) -> dict:
    """The teacher measured on the same runtime, so a speedup compares like with like; else the first."""
    return next((t for t in teachers if t["runtime"] == model["runtime"]), teachers[0])


def summarize(card: dict) -> dict:
    """Compare every non-teacher model with the teacher.

    Ratios read "how many times better": `retained`/`f1_retained` = model / teacher quality,
    `speedup` = teacher p50 / model p50, `throughput_ratio` = model / teacher items per second, and
    `size_ratio` (params), `disk_ratio`, `memory_ratio` (peak RSS) = teacher / model. A ratio is None
    where either figure is missing. With no teacher in the card there is nothing to compare against,
    so `comparisons` is empty.
    """
    validate_card(card)
    teachers = [m for m in card["models"] if m["role"] == "teacher"]
    comparisons = []
    for model in card["models"]:
        if model["role"] == "teacher" or not teachers:
            continue
        teacher = _reference_teacher(teachers, model)
        comparisons.append({
            "model": model_label(model),
            "role": model["role"],
            "teacher": model_label(teacher),
            "retained": _ratio(model["accuracy"], teacher["accuracy"]),
            "f1_retained": _ratio(model["macro_f1"], teacher["macro_f1"]),
            "speedup": _ratio(teacher["latency_ms_p50"], model["latency_ms_p50"]),
            "throughput_ratio": _ratio(model["throughput_per_s"], teacher["throughput_per_s"]),
            "size_ratio": _ratio(teacher.get("params"), model.get("params")),
            "disk_ratio": _ratio(teacher["disk_mb"], model["disk_mb"]),
            "memory_ratio": _ratio(teacher.get("peak_rss_mb"), model.get("peak_rss_mb")),
        })
    return {"teacher": model_label(teachers[0]) if teachers else None, "comparisons": comparisons,
            "best": model_label(best_model(card["models"], card.get("primary_metric", "accuracy"))),
            "recommended": recommendation(card), "headline": _headline(card, comparisons)}


def _times(ratio: float, more: str, less: str) -> str:
    return f"{ratio:.1f}x {more}" if ratio >= 1 else f"{1 / ratio:.1f}x {less}"


_METRIC_NAMES = {"accuracy": "accuracy", "macro_f1": "macro-F1"}
#: Which model a tie goes to: the cheaper one.
_TIE_ORDER = {"baseline": 0, "student": 1, "teacher": 2}


def best_model(models: list[dict], metric: str) -> dict:
    """The model with the best `metric` on the test split; a tie goes to the cheaper one."""
    return max(models, key=lambda m: (m[metric], -_TIE_ORDER[m["role"]]))


def _margin_text(card: dict, student: dict, other: dict, against: str, *, flip: bool = False) -> str:
    """'+0.6 points against the baseline (95% CI +0.1 to +1.1)' for student minus other, or with
    `flip` '1.9 points ahead (95% CI 1.2 to 2.6)' for other minus student; the interval is the card's
    paired bootstrap, when it has one."""
    metric = card.get("primary_metric", "accuracy")
    sign, fmt = (-1, ".1f") if flip else (1, "+.1f")
    record = next((m for m in card.get("student_margins") or []
                   if m["model"] == model_label(student) and m["versus"] == model_label(other)
                   and m["metric"] == metric), None)
    text = f"{sign * (student[metric] - other[metric]) * 100:{fmt}} points {against}"
    if record is None:
        return text
    low, high = sorted(sign * v * 100 for v in record["ci95"])
    unclear = ", not a clear difference" if low <= 0 <= high else ""
    return f"{text} (95% CI {low:{fmt}} to {high:{fmt}}{unclear})"


def student_score(card: dict, student: dict, metric: str) -> tuple[float, int]:
    """The student's score to weigh against other models, and how many seeds it averages: with students
    of several seeds (the card's `training.student_seeds`), the mean of the seeds' students on its runtime, the student a
    user can expect rather than the first or the luckiest seed; else its own score."""
    rows = _seed_rows(card, student)
    return statistics.fmean(m[metric] for m in rows), len(rows)


def _seed_rows(card: dict, student: dict) -> list[dict]:
    """The students of every seed on `student`'s runtime, or `student` alone when the card has one seed."""
    if len((card.get("training") or {}).get("student_seeds") or []) < 2:
        return [student]
    return [m for m in card["models"] if m["role"] == "student" and m["runtime"] == student["runtime"]]


def recommendation(card: dict) -> dict | None:
    """Which model to use, and why: the baseline when it scores at least as well as the student (the
    seeds' mean, see `student_score`), else the student (the teacher's extra accuracy, if any, is
    weighed by the reader from the card)."""
    metric = card.get("primary_metric", "accuracy")
    student = next((m for m in card["models"] if m["role"] == "student"), None)
    baseline = next((m for m in card["models"] if m["role"] == "baseline"), None)
    if student is None:
        return None
    if baseline is not None and baseline[metric] >= student_score(card, student, metric)[0]:
        return {"model": model_label(baseline), "role": "baseline",
                "why": f"it scores at least as well as the student on {_METRIC_NAMES[metric]}"}
    return {"model": model_label(student), "role": "student",
            "why": "it outscores the baseline" if baseline else "no baseline was measured"}


def _headline(card: dict, comparisons: list[dict]) -> str:
    """One sentence (two when the baseline wins) for the top of the report: the first student (else
    the first non-teacher) against the best model on the card, by the card's primary metric."""
    if not comparisons:
        first = card["models"][0]
        return (f"{model_label(first)} reaches {first['accuracy']:.1%} accuracy at "
                f"{first['latency_ms_p50']:.1f} ms per query (batch 1, median); there is no teacher to compare with.")
    metric = card.get("primary_metric", "accuracy")
    name = _METRIC_NAMES[metric]
    c = next((c for c in comparisons if c["role"] == "student"), comparisons[0])  # card order: the caller's pick
    student = next(m for m in card["models"] if model_label(m) == c["model"])
    teacher = next(m for m in card["models"] if model_label(m) == c["teacher"])
    baseline = next((m for m in card["models"] if m["role"] == "baseline" and m is not student), None)
    score, seeds = student_score(card, student, metric)
    if seeds > 1:  # every figure about the student is the seeds' mean, and the best model is weighed by it
        others = [m for m in card["models"] if m["role"] != "student"]
        best = student if score > best_model(others, metric)[metric] else best_model(others, metric)
        label = f"{_SEED_SUFFIX.sub('', c['model'])}, the mean of {seeds} seeds,"
        kept_ratio = score / teacher[metric] if teacher[metric] else None
        speedup = _ratio(teacher["latency_ms_p50"],
                         statistics.fmean(m["latency_ms_p50"] for m in _seed_rows(card, student)))
    else:
        best = best_model(card["models"], metric)
        label = c["model"]
        kept_ratio = c["retained"] if metric == "accuracy" else c["f1_retained"]
        speedup = c["speedup"]
    parts = []
    if c["size_ratio"] is not None:
        parts.append(f"with {_times(c['size_ratio'], 'fewer', 'more')} parameters")
    if speedup is not None:
        parts.append(f"runs {_times(speedup, 'faster', 'slower')} at batch 1")
    kept = f"keeps {kept_ratio:.1%} of the teacher's {name}" if kept_ratio is not None else "was measured"
    tail = (" " + " and ".join(parts)) if parts else ""
    student_says = f"{c['role'].capitalize()} {label} {kept}{tail} (teacher: {c['teacher']})."
    if baseline is not None and baseline[metric] >= score:
        teacher_note = (f"; the teacher scores {teacher[metric]:.1%}" if teacher is not best
                        else f"; only the teacher scores higher, {teacher[metric]:.1%}")
        verb = "beats the student"
        if seeds == 1:
            margin = _margin_text(card, student, baseline, "ahead", flip=True)
        else:  # a gap smaller than the seeds' own spread is a tie, and is called one
            gap = (baseline[metric] - score) * 100
            spread = statistics.stdev(m[metric] for m in _seed_rows(card, student)) * 100
            within = gap <= spread
            verb = "is level with the student" if within else verb
            margin = (f"{gap:.2f} points ahead, {'within' if within else 'beyond'} the student seeds' "
                      f"standard deviation ({spread:.2f} points)")
        return (f"The baseline {model_label(baseline)} {verb}: {name} {baseline[metric]:.1%} against "
                f"{score:.1%}{_seeds_note(seeds)}, {margin}{teacher_note}. "
                f"Use the baseline rather than the student. {student_says}")
    against = ""
    if baseline is not None:
        against = (f", {_margin_text(card, student, baseline, 'against the baseline')}" if seeds == 1 else
                   f", {(score - baseline[metric]) * 100:+.1f} points against the baseline")
    if best is student:
        return (f"{c['role'].capitalize()} {label} is the most accurate model here: {name} "
                f"{score:.1%}{against}. It {kept}{tail} (teacher: {c['teacher']}).")
    return (f"{student_says} The most accurate model here is {model_label(best)}: {name} {best[metric]:.1%} against "
            f"the student's {score:.1%}{against}.")


def _seeds_note(seeds: int) -> str:
    return f" (the mean of {seeds} student seeds)" if seeds > 1 else ""


# ---------------------------------------------------------------------------------------------- text


def _fmt_count(n: int | None) -> str:
    if n is None:
        return "-"
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= size:
            return f"{n / size:.1f}{suffix}"
    return str(n)


def _fmt_opt(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


#: Model table columns: (header, cell formatter, card field, which way is better: +1 higher, -1 lower, 0 unranked).
_COLUMNS: list[tuple[str, Callable[[dict], str], str | None, int]] = [
    ("model", lambda m: m["name"], None, 0),
    ("role", lambda m: m["role"], None, 0),
    ("runtime", lambda m: m["runtime"], None, 0),
    ("params", lambda m: _fmt_count(m.get("params")), "params", -1),
    ("disk MB", lambda m: f"{m['disk_mb']:.1f}", "disk_mb", -1),
    ("accuracy", lambda m: f"{m['accuracy']:.2%}", "accuracy", 1),
    ("macro-F1", lambda m: f"{m['macro_f1']:.2%}", "macro_f1", 1),
    ("p50 ms", lambda m: f"{m['latency_ms_p50']:.2f}", "latency_ms_p50", -1),
    ("p95 ms", lambda m: f"{m['latency_ms_p95']:.2f}", "latency_ms_p95", -1),
    ("items/s", lambda m: f"{m['throughput_per_s']:.0f}", "throughput_per_s", 1),
    ("peak RSS MB", lambda m: _fmt_opt(m.get("peak_rss_mb"), ".0f"), "peak_rss_mb", -1),
]

_COMPARISON_COLUMNS: list[tuple[str, str, str]] = [
    ("accuracy kept", "retained", ".1%"),
    ("F1 kept", "f1_retained", ".1%"),
    ("speedup", "speedup", ".2f"),
    ("throughput", "throughput_ratio", ".2f"),
    ("fewer params", "size_ratio", ".1f"),
    ("less disk", "disk_ratio", ".1f"),
    ("less RAM", "memory_ratio", ".2f"),
]


def _comparison_cells(c: dict) -> list[str]:
    """Shares print as percentages, the other ratios as "N.NNx"."""
    return [_fmt_opt(c[key], fmt) + ("x" if c[key] is not None and not fmt.endswith("%") else "")
            for _, key, fmt in _COMPARISON_COLUMNS]


def _text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    # Text columns (the first ones) align left, figures align right.
    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def format_table(card: dict) -> str:
    """Fixed-width text for a terminal: every model's figures, then each model relative to the teacher."""
    summary = summarize(card)
    text = _text_table([c[0] for c in _COLUMNS], [[fmt(m) for _, fmt, _, _ in _COLUMNS] for m in card["models"]])
    if summary["comparisons"]:
        rows = [[c["model"], c["role"], c["teacher"], *_comparison_cells(c)] for c in summary["comparisons"]]
        text += "\n\n" + _text_table(["model", "role", "vs teacher", *(c[0] for c in _COMPARISON_COLUMNS)], rows)
    cost = format_cost_table(card)
    return text + ("\n\n" + cost if cost else "") + "\n\n" + summary["headline"]


# ---------------------------------------------------------------------------------------------- charts


def _plain(text: str) -> str:
    """Keep matplotlib from reading '$' in a model name as the start of a formula."""
    return text.replace("$", r"\$")


def _png(fig: Any) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


_SERIES_ALPHA = (1.0, 0.5, 0.3)


def _bar_panel(ax: Any, models: list[dict], series: list[tuple[str, Callable[[dict], float | None], str]],
               xlabel: str) -> None:
    """Horizontal grouped bars, one group per model, each bar labelled with its value ('n/a' if missing)."""
    from matplotlib.patches import Patch

    labels = [_plain(model_label(m)) for m in models]
    height = 0.8 / len(series)
    top = max((v for m in models for _, get, _ in series if (v := get(m)) is not None), default=1.0) or 1.0
    for j, (name, get, fmt) in enumerate(series):
        for i, model in enumerate(models):
            y = i + (j - (len(series) - 1) / 2) * height
            value = get(model)
            colour = ROLE_COLOURS[model["role"]]
            if value is None:
                ax.text(top * 0.01, y, "n/a", va="center", fontsize=8, color="#666666")
                continue
            ax.barh(y, value, height=height * 0.92, color=colour, alpha=_SERIES_ALPHA[j])
            ax.text(value + top * 0.01, y, format(value, fmt), va="center", fontsize=8)
    ax.set_yticks(range(len(models)), labels)
    ax.set_ylim(len(models) - 0.5, -0.5)  # first model on top; fixed so a row of only 'n/a' keeps its place
    ax.set_xlim(0, top * 1.18)
    ax.set_xlabel(xlabel)
    ax.spines[["top", "right"]].set_visible(False)
    if len(series) > 1:  # shades tell the series apart (colours are roles), so the key shows shades of grey
        handles = [Patch(color="#555555", alpha=_SERIES_ALPHA[j]) for j in range(len(series))]
        ax.legend(handles, [name for name, _, _ in series], loc="lower right", bbox_to_anchor=(1.0, 1.0),
                  ncol=len(series), fontsize=8, frameon=False)


def _bar_figure(models: list[dict], panels: list[tuple[str, list, str]]) -> str:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.2 * len(panels), 0.55 * len(models) + 1.3))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, series, xlabel) in zip(axes, panels):
        _bar_panel(ax, models, series, xlabel)
        ax.set_title(title, fontsize=10, loc="left")
    fig.tight_layout()
    return _png(fig)


def _scatter_figure(models: list[dict]) -> str:
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.subplots()
    for model in models:
        ax.scatter(model["latency_ms_p50"], model["accuracy"] * 100, s=60, color=ROLE_COLOURS[model["role"]],
                   edgecolor="black", linewidth=0.5, zorder=3)
        ax.annotate(_plain(model_label(model)), (model["latency_ms_p50"], model["accuracy"] * 100),
                    xytext=(6, 4), textcoords="offset points", fontsize=8)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    latencies = [m["latency_ms_p50"] for m in models]
    low, high = min(latencies), max(latencies)
    ax.set_xlim(max(low, 1e-3) / 1.6, max(high, 1e-3) * 2.2)  # room for the labels right of each point
    accuracies = [m["accuracy"] * 100 for m in models]
    pad = max(0.5, (max(accuracies) - min(accuracies)) * 0.25)
    ax.set_ylim(min(accuracies) - pad, min(100.0, max(accuracies) + pad))
    ax.set_xlabel("latency p50, ms per query at batch 1 (log scale; left is faster)")
    ax.set_ylabel("accuracy %")
    ax.set_title("Accuracy against latency: up and to the left is better", fontsize=10, loc="left")
    ax.grid(True, which="both", alpha=0.3)
    roles = [r for r in ROLES if any(m["role"] == r for m in models)]
    ax.legend([Line2D([], [], marker="o", ls="", color=ROLE_COLOURS[r]) for r in roles], roles,
              fontsize=8, frameon=False, loc="lower right")
    fig.tight_layout()
    return _png(fig)


def _field(key: str, scale: float = 1.0) -> Callable[[dict], float | None]:
    return lambda model: None if model.get(key) is None else model[key] * scale


def _charts(models: list[dict]) -> list[tuple[str, str]]:
    """(caption, base64 PNG) for every chart in the report."""
    return [
        ("Quality on the test set (higher is better).",
         _bar_figure(models, [("Accuracy and macro-F1", [("accuracy", _field("accuracy", 100), ".2f"),
                                                          ("macro-F1", _field("macro_f1", 100), ".2f")], "%")])),
        ("Batch-1 latency, one query at a time (lower is better).",
         _bar_figure(models, [("Latency", [("p50", _field("latency_ms_p50"), ".2f"),
                                           ("p95", _field("latency_ms_p95"), ".2f")], "ms per query")])),
        ("Size: parameters and file size on disk (lower is better).",
         _bar_figure(models, [("Parameters", [("params", _field("params", 1e-6), ".2f")], "millions"),
                              ("Disk", [("disk", _field("disk_mb"), ".1f")], "MB")])),
        ("Peak resident memory of a fresh process that loads and runs the model (lower is better).",
         _bar_figure(models, [("Peak RAM", [("peak RSS", _field("peak_rss_mb"), ".0f")], "MiB")])),
        ("Each model's accuracy against its batch-1 latency.", _scatter_figure(models)),
    ]


# ---------------------------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2rem auto;max-width:1100px;color:#222;
padding:0 1rem;line-height:1.45}
h1{margin-bottom:.2rem}h2{margin-top:2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
.headline{font-size:1.2rem;background:#f4f7fb;border-left:4px solid #3b6ea8;padding:.7rem 1rem}
.task{color:#555}
table{border-collapse:collapse;font-size:.9rem;margin:.5rem 0}
th,td{padding:.35rem .6rem;border-bottom:1px solid #e5e5e5;text-align:right;white-space:nowrap}
th{background:#fafafa}td.text,th.text{text-align:left}
td.best{font-weight:700;color:#1f6f2f}
.role{display:inline-block;border-radius:3px;padding:0 .4rem;color:#fff;font-size:.8rem}
figure{margin:1.2rem 0}figure img{max-width:100%}figcaption{color:#555;font-size:.9rem}
dl{display:grid;grid-template-columns:max-content 1fr;gap:.2rem 1rem;font-size:.9rem}
dt{font-weight:600}dd{margin:0;font-family:ui-monospace,monospace;white-space:pre-wrap}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _best(models: list[dict], key: str | None, direction: int) -> float | None:
    values = [m.get(key) for m in models if key and m.get(key) is not None]
    if not direction or len(values) < 2:
        return None
    return max(values) if direction > 0 else min(values)


def _models_table(models: list[dict], columns: list[tuple[str, Callable[[dict], str], str | None, int]] = _COLUMNS
                  ) -> str:
    """An HTML table of `models`, one row each; `columns` as `_COLUMNS` (name, role and runtime first)."""
    best = {key: _best(models, key, d) for _, _, key, d in columns}
    head = "".join(f'<th class="{"text" if i < 3 else ""}">{_e(h)}</th>' for i, (h, *_) in enumerate(columns))
    rows = []
    for model in models:
        cells = []
        for i, (_, fmt, key, _) in enumerate(columns):
            text = _e(fmt(model))
            if i == 1:
                text = f'<span class="role" style="background:{ROLE_COLOURS[model["role"]]}">{text}</span>'
            cls = "text" if i < 3 else ("best" if key and best[key] is not None and model.get(key) == best[key]
                                        else "")
            cells.append(f'<td class="{cls}">{text}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _comparison_table(comparisons: list[dict]) -> str:
    head = ('<th class="text">model</th><th class="text">vs teacher</th>'
            + "".join(f"<th>{_e(name)}</th>" for name, _, _ in _COMPARISON_COLUMNS))
    rows = "".join(
        f'<tr><td class="text">{_e(c["model"])}</td><td class="text">{_e(c["teacher"])}</td>'
        + "".join(f"<td>{_e(cell)}</td>" for cell in _comparison_cells(c)) + "</tr>"
        for c in comparisons)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _definition_list(data: dict) -> str:
    items = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v if isinstance(v, (str, int, float)) else json.dumps(v))}</dd>"
                    for k, v in data.items())
    return f"<dl>{items}</dl>" if items else "<p>(none recorded)</p>"


def _margins_section(card: dict) -> str:
    """The student against every other model: the test-split difference and its paired bootstrap interval."""
    margins = card.get("student_margins") or []
    if not margins:
        return ""
    rows = "".join(
        f'<tr><td class="text">{_e(m["model"])}</td><td class="text">{_e(m["versus"])}</td>'
        f'<td class="text">{_e(_METRIC_NAMES.get(m["metric"], m["metric"]))}</td><td>{m["margin"] * 100:+.2f}</td>'
        f'<td>{m["ci95"][0] * 100:+.2f} to {m["ci95"][1] * 100:+.2f}</td></tr>' for m in margins)
    return ("<h2>How sure the differences are</h2><p>The student's score minus each other model's, in points, on "
            "the test split, with a 95% interval from a paired bootstrap over the test examples (an interval that "
            "includes 0 is not a clear difference).</p><table><thead><tr><th class=\"text\">student</th>"
            "<th class=\"text\">versus</th><th class=\"text\">metric</th><th>difference</th><th>95% interval</th>"
            f"</tr></thead><tbody>{rows}</tbody></table>")


def render_html(card: dict, summary: dict) -> str:
    """The whole report page as one self-contained HTML string."""
    comparisons = ""
    if summary["comparisons"]:
        comparisons = ("<h2>Compared with the teacher</h2><p>Ratios above 1 favour the model: accuracy kept is "
                       "model/teacher; speedup, fewer params, less disk and less RAM are teacher/model; throughput is "
                       "model/teacher.</p>" + _comparison_table(summary["comparisons"]))
    return page(card, summary, models_note="Latency is per query at batch 1; throughput is batched.",
                models_table=_models_table(card["models"]), comparisons=comparisons, charts=_charts(card["models"]))


def page(card: dict, summary: dict, *, models_note: str, models_table: str, comparisons: str,
         charts: list[tuple[str, str]]) -> str:
    """The report page around its parts: title, task, headline, the models table and comparisons (HTML),
    charts ((caption, base64 PNG) pairs), hardware and training, as one self-contained document."""
    figures = "".join(f'<figure><img src="data:image/png;base64,{png}" alt="{_e(caption)}">'
                      f"<figcaption>{_e(caption)}</figcaption></figure>" for caption, png in charts)
    task_line = ", ".join(f"{_e(k.replace('_', ' '))}: {_e(v)}" for k, v in (card.get("task") or {}).items())
    title = _e(card.get("title") or "Model report")
    selection = ""
    if card.get("selection"):
        selection = ("<h2>How the settings were chosen</h2><p>Every choice was made on the validation split; the "
                     f"test split was scored once, at the end.</p>{_definition_list(card['selection'])}\n")
    return document(title, f"<p class=\"task\">{task_line}</p>\n"
                    f'<p class="headline">{_e(summary["headline"])}</p>\n'
                    f"<h2>Models</h2><p>Best value in each column in bold green. {_e(models_note)}</p>{models_table}\n"
                    f"{comparisons}\n{cost_html(card)}\n{_margins_section(card)}\n<h2>Charts</h2>{figures}\n"
                    f"{selection}{hardware_and_training(card)}")


def hardware_and_training(card: dict) -> str:
    """The closing sections every report shares: the machine it ran on and how it was trained."""
    return (f"<h2>Hardware</h2>{_definition_list(card.get('hardware') or {})}\n"
            f"<h2>Training</h2>{_definition_list(card.get('training') or {})}\n")


def document(title: str, body: str, css: str = "") -> str:
    """A self-contained HTML page (styles inline, no scripts) titled `title` (already escaped) around
    `body`: every report of the package looks alike and opens from a file anywhere."""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f"<style>{_CSS}{css}</style></head><body>\n<h1>{title}</h1>\n{body}</body></html>\n")


def write_report(out_dir: str | Path, card: dict, *, summarize: Callable[[dict], dict] = summarize,
                 render: Callable[[dict, dict], str] = render_html) -> tuple[Path, Path]:
    """Write `report.json` (the card plus its summary) and a self-contained `report.html` into `out_dir`.

    `summarize` and `render` default to the classifiers' card; other cards (causal LMs) pass theirs."""
    summary = summarize(card)
    out_dir = Path(out_dir)
    json_path, html_path = out_dir / "report.json", out_dir / "report.html"
    write_json(json_path, {**card, "summary": summary})
    write_text(html_path, render(card, summary))
    return json_path, html_path


def publish(out_dir: str | Path, card: dict, *, summarize: Callable[[dict], dict] = summarize,
            render: Callable[[dict, dict], str] = render_html, table: Callable[[dict], str] = format_table) -> dict:
    """Write the report files, print the card's tables and where the report is; returns the summary."""
    json_path, html_path = write_report(out_dir, card, summarize=summarize, render=render)
    print(table(card))
    print(f"report: {html_path} (and {json_path})")
    return summarize(card)
