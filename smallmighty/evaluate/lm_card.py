"""The report card for causal LMs: teacher, distilled student and scratch baseline side by side.

Same files and style as the classifiers' card (`report.py`: report.json, a self-contained
report.html, a terminal table), with a causal LM's figures:

- `val_ppl`: perplexity on the validation text with the sliding-window recipe of
  `evaluate.perplexity` (windows of the training length, half-window stride, so every token after
  the first is scored with at least half a window of context), in our engine at fp32. Models with
  different tokenizers split the same text into different numbers of tokens, so the total negative
  log-likelihood is divided by one count for all, the reference (teacher's) number of tokens:
  exp(NLL / reference tokens). For the teacher this is its ordinary perplexity, and students that
  share its tokenizer (also a trimmed copy, which splits unseen words more finely) are compared on
  the same scale.
- parameters and size on disk of the safetensors weights;
- batch-1 decode tokens/s in our engine at fp32 and int8, and the peak RSS of a fresh process that
  loads the model and decodes (`decode_speed`);
- training curves: validation perplexity against training tokens for each trained model.

The card is a plain dict:

    {"title", "task": {"corpus", "validation_tokens", "context", ...}, "hardware": {...},
     "models": [{"name", "role": "teacher"|"student"|"baseline", "runtime", "params", "disk_mb",
                 "val_ppl", "decode_tok_s_fp32", "decode_tok_s_int8", "peak_rss_mb", "peak_rss_mb_int8",
                 "curve": [{"tokens", "val_ppl"}, ...]}, ...],
     "training": {...}}
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from smallmighty.errors import DataError, SlmError
from smallmighty.evaluate.card import disk_size_mb
from smallmighty.evaluate.decode_speed import profile_decode
from smallmighty.evaluate.perplexity import perplexity
from smallmighty.evaluate.report import (
    ROLE_COLOURS,
    _bar_figure,
    _e,
    _field,
    _fmt_count,
    _fmt_opt,
    _models_table,
    _plain,
    _png,
    _text_table,
    model_label,
    page,
    publish,
)
from smallmighty.evaluate.speed import hardware_info
from smallmighty.models.causal_lm import count_parameters_on_disk

PRECISIONS = ("fp32", "int8")

#: Model table columns, as `report._COLUMNS`: (header, cell, field, which way is better).
LM_COLUMNS = [
    ("model", lambda m: m["name"], None, 0),
    ("role", lambda m: m["role"], None, 0),
    ("runtime", lambda m: m["runtime"], None, 0),
    ("params", lambda m: _fmt_count(m.get("params")), "params", -1),
    ("disk MB", lambda m: f"{m['disk_mb']:.1f}", "disk_mb", -1),
    ("val ppl", lambda m: f"{m['val_ppl']:.2f}", "val_ppl", -1),
    ("tok/s fp32", lambda m: _fmt_opt(m.get("decode_tok_s_fp32"), ".1f"), "decode_tok_s_fp32", 1),
    ("tok/s int8", lambda m: _fmt_opt(m.get("decode_tok_s_int8"), ".1f"), "decode_tok_s_int8", 1),
    ("peak RSS MB", lambda m: _fmt_opt(m.get("peak_rss_mb"), ".0f"), "peak_rss_mb", -1),
    ("peak RSS int8", lambda m: _fmt_opt(m.get("peak_rss_mb_int8"), ".0f"), "peak_rss_mb_int8", -1),
]


# ---------------------------------------------------------------------------------------------- measuring


class _TransformersWindows:
    """A transformers causal LM answering the calls `evaluate.perplexity` makes of our engine's model,
    so a teacher the engine does not run (GPT-2, Gemma...) is scored over the very same windows."""

    def __init__(self, model: Any) -> None:
        from types import SimpleNamespace

        self.hf = model
        self.config = SimpleNamespace(context_limit=getattr(model.config, "max_position_embeddings", 1 << 30))

    @property
    def model(self) -> "_TransformersWindows":  # perplexity() reads `.model` of what it is given
        return self

    def rope(self, length: int) -> Any:
        import torch

        return torch.zeros(length, 1)

    def new_cache(self, batch: int, length: int) -> None:
        return None

    def __call__(self, ids, cache, start, rope, last_only: bool = False):
        return self.hf(input_ids=ids).logits


def _scorer(model_dir: Path) -> tuple[Any, Any, str]:
    """(object `perplexity` accepts, a `tokenizers.Tokenizer`, runtime name) for one model folder."""
    from smallmighty.engine.generate import Engine

    try:
        engine = Engine.from_pretrained(model_dir)
        return engine.model, engine.tokenizer, "ours"
    except DataError:  # a family our engine does not run: transformers scores it
        from smallmighty.models.causal_lm import load_hf_causal_lm

        model, tokenizer = load_hf_causal_lm(model_dir)
        return _TransformersWindows(model), tokenizer.backend_tokenizer, "transformers"


def text_nll(model_dir: str | Path, text: str, *, context: int) -> tuple[float, int, str]:
    """(total negative log-likelihood in nats of `text` after its first token, the model's number of
    tokens for it, runtime) with `context`-token windows at half-window stride."""
    scorer, tokenizer, runtime = _scorer(Path(model_dir))
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    ppl = perplexity(scorer, ids, context=context, stride=max(1, context // 2), progress=False)
    return (len(ids) - 1) * math.log(ppl), len(ids), runtime


def evaluate_causal_lm(model_dir: str | Path, text: str, *, name: str, role: str, reference_tokens: int,
                       context: int, speed: bool = True, curve: list[dict] | None = None) -> dict:
    """One model's row of the card (see the module docstring); `reference_tokens` normalises `val_ppl`."""
    nll, tokens, runtime = text_nll(model_dir, text, context=context)
    row = {"name": name, "role": role, "runtime": runtime, "params": count_parameters_on_disk(model_dir),
           "disk_mb": disk_size_mb_weights(model_dir), "val_ppl": math.exp(nll / max(1, reference_tokens - 1)),
           "val_tokens": tokens, "curve": curve or []}
    for precision in PRECISIONS:
        measured = profile_decode(str(model_dir), precision) if speed and runtime == "ours" else {}
        row[f"decode_tok_s_{precision}"] = measured.get("decode_tok_s")
        row["peak_rss_mb" if precision == "fp32" else f"peak_rss_mb_{precision}"] = measured.get("peak_rss_mb")
    return row


def disk_size_mb_weights(model_dir: str | Path) -> float:
    """MiB of the weights (the safetensors files) a model folder holds."""
    return sum(disk_size_mb(p) for p in Path(model_dir).glob("*.safetensors"))


def build_lm_card(models: list[dict], *, title: str, task: dict, training: dict | None = None) -> dict:
    return {"title": title, "task": task, "hardware": hardware_info(), "models": models, "training": training or {}}


# ---------------------------------------------------------------------------------------------- summary


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return None if numerator is None or not denominator else numerator / denominator


def summarize_lm(card: dict) -> dict:
    """Each model against the teacher: `ppl_ratio` = model / teacher perplexity (lower is better),
    `size_ratio` = teacher / model parameters, `speedup_fp32` / `speedup_int8` = model / teacher
    decode tokens/s, `memory_ratio` = teacher / model peak RSS (fp32)."""
    models = card.get("models") or []
    if not models:
        raise SlmError("a report card needs a non-empty 'models' list")
    teacher = next((m for m in models if m["role"] == "teacher"), None)
    comparisons = []
    for model in models:
        if teacher is None or model is teacher:
            continue
        comparisons.append({
            "model": model_label(model), "role": model["role"], "teacher": model_label(teacher),
            "ppl_ratio": _ratio(model["val_ppl"], teacher["val_ppl"]),
            "size_ratio": _ratio(teacher["params"], model["params"]),
            "speedup_fp32": _ratio(model.get("decode_tok_s_fp32"), teacher.get("decode_tok_s_fp32")),
            "speedup_int8": _ratio(model.get("decode_tok_s_int8"), teacher.get("decode_tok_s_int8")),
            "memory_ratio": _ratio(teacher.get("peak_rss_mb"), model.get("peak_rss_mb")),
        })
    return {"teacher": model_label(teacher) if teacher else None, "comparisons": comparisons,
            "headline": _headline(models, comparisons)}


def _headline(models: list[dict], comparisons: list[dict]) -> str:
    student = next((c for c in comparisons if c["role"] == "student"), None)
    if student is None:
        first = models[0]
        return f"{model_label(first)} reaches validation perplexity {first['val_ppl']:.2f}."
    parts = [f"has {student['ppl_ratio']:.2f}x the teacher's validation perplexity"]
    if student["size_ratio"]:
        parts.append(f"{student['size_ratio']:.1f}x fewer parameters")
    if student["speedup_int8"]:
        parts.append(f"decodes {student['speedup_int8']:.1f}x as fast at int8")
    text = f"Student {student['model']} " + ", ".join(parts) + "."
    baseline = next((m for m in models if m["role"] == "baseline"), None)
    distilled = next(m for m in models if model_label(m) == student["model"])
    if baseline:
        text += (f" The same shape trained from scratch on as many tokens reaches {baseline['val_ppl']:.2f}: the "
                 f"student's perplexity is {distilled['val_ppl'] / baseline['val_ppl']:.2f}x the scratch model's.")
    return text


_COMPARISON_COLUMNS = [("ppl / teacher", "ppl_ratio", ".2f"), ("fewer params", "size_ratio", ".1f"),
                       ("speedup fp32", "speedup_fp32", ".2f"), ("speedup int8", "speedup_int8", ".2f"),
                       ("less RAM", "memory_ratio", ".2f")]


def _comparison_rows(summary: dict) -> list[list[str]]:
    return [[c["model"], c["teacher"], *(_fmt_opt(c[key], fmt) + ("x" if c[key] is not None else "")
                                         for _, key, fmt in _COMPARISON_COLUMNS)] for c in summary["comparisons"]]


def format_lm_table(card: dict) -> str:
    """Fixed-width text for a terminal: the models, each against the teacher, the headline."""
    summary = summarize_lm(card)
    text = _text_table([c[0] for c in LM_COLUMNS], [[cell(m) for _, cell, _, _ in LM_COLUMNS] for m in card["models"]])
    if summary["comparisons"]:
        text += "\n\n" + _text_table(["model", "vs teacher", *(c[0] for c in _COMPARISON_COLUMNS)],
                                     _comparison_rows(summary))
    return text + "\n\n" + summary["headline"]


# ---------------------------------------------------------------------------------------------- charts and HTML


def _curve_figure(models: list[dict]) -> str | None:
    from matplotlib.figure import Figure

    trained = [m for m in models if m.get("curve")]
    if not trained:
        return None
    fig = Figure(figsize=(6.5, 4.0))
    ax = fig.subplots()
    for model in trained:
        tokens = [p["tokens"] / 1e6 for p in model["curve"]]
        ax.plot(tokens, [p["val_ppl"] for p in model["curve"]], marker="o", markersize=3,
                color=ROLE_COLOURS[model["role"]], label=_plain(model_label(model)))
    ax.set_yscale("log")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("validation perplexity (own tokens, log scale)")
    ax.set_title("Training curves: lower is better", fontsize=10, loc="left")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    return _png(fig)


def _lm_charts(models: list[dict]) -> list[tuple[str, str]]:
    charts = [
        ("Validation perplexity per reference token (lower is better).",
         _bar_figure(models, [("Perplexity", [("val ppl", _field("val_ppl"), ".2f")], "perplexity")])),
        ("Batch-1 decoding speed in our engine (higher is better).",
         _bar_figure(models, [("Decode speed", [("fp32", _field("decode_tok_s_fp32"), ".1f"),
                                                ("int8", _field("decode_tok_s_int8"), ".1f")], "tokens/s")])),
        ("Size: parameters and weights on disk (lower is better).",
         _bar_figure(models, [("Parameters", [("params", _field("params", 1e-6), ".2f")], "millions"),
                              ("Disk", [("disk", _field("disk_mb"), ".1f")], "MB")])),
        ("Peak resident memory of a fresh process that loads the model and decodes (lower is better).",
         _bar_figure(models, [("Peak RAM", [("fp32", _field("peak_rss_mb"), ".0f"),
                                            ("int8", _field("peak_rss_mb_int8"), ".0f")], "MiB")])),
    ]
    curves = _curve_figure(models)
    if curves:
        charts.append(("Validation perplexity during training, in each model's own tokens on the validation "
                       "rows scored while training.", curves))
    return charts


def render_lm_html(card: dict, summary: dict) -> str:
    """The whole report page as one self-contained HTML string."""
    comparisons = ""
    if summary["comparisons"]:
        head = '<th class="text">model</th><th class="text">vs teacher</th>' + "".join(
            f"<th>{_e(name)}</th>" for name, _, _ in _COMPARISON_COLUMNS)
        rows = "".join("<tr>" + "".join(f'<td class="{"text" if i < 2 else ""}">{_e(cell)}</td>'
                                        for i, cell in enumerate(row)) + "</tr>" for row in _comparison_rows(summary))
        comparisons = ("<h2>Compared with the teacher</h2><p>Perplexity ratio is model/teacher (lower is better); "
                       "fewer params and less RAM are teacher/model, speedups model/teacher (higher is better)."
                       f"</p><table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
    table = _models_table([{k: v for k, v in m.items() if k != "curve"} for m in card["models"]], LM_COLUMNS)
    return page(card, summary, models_note="Perplexity is on the validation text, per reference token; decoding is "
                                           "batch 1 in our engine.",
                models_table=table, comparisons=comparisons, charts=_lm_charts(card["models"]))


def publish_lm(out_dir: str | Path, card: dict) -> dict:
    """Write report.json and report.html, print the tables and where the report is; returns the summary."""
    return publish(out_dir, card, summarize=summarize_lm, render=render_lm_html, table=format_lm_table)
