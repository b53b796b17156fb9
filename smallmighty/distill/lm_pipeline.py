"""The whole causal-LM job in one call: student distilled, scratch baseline trained on the same tokens,
teacher, student and baseline evaluated side by side, report card written.

This is what `slm distill` runs when its teacher is a causal LM.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from smallmighty.distill.causal_lm import LMDistillConfig, distill_causal_lm
from smallmighty.train.loop import TrainConfig, is_main_process


def validation_text(teacher_dir: Path, data: str, config: LMDistillConfig) -> tuple[str, int]:
    """(the validation text, its number of teacher tokens): the teacher's validation rows decoded, so
    every model is scored on exactly the text the students never trained on."""
    from smallmighty.data.corpus import load_corpus
    from smallmighty.models.encoder import load_tokenizer

    tokenizer = load_tokenizer(str(teacher_dir))
    corpus = load_corpus(data, tokenizer, config.seq_len, text_field=config.text_field,
                         val_fraction=config.val_fraction, val_source=config.val_data, progress=False)
    ids = corpus.validation.flatten().tolist()
    return tokenizer.decode(ids, skip_special_tokens=False), len(ids)


def _curve(facts: dict) -> list[dict]:
    return [{"tokens": point["step"] * facts["tokens_per_step"], "val_ppl": point["val_ppl"]}
            for point in facts["history"]]


def run_lm_pipeline(teacher: str | None, data: str, out_dir: str | Path, config: LMDistillConfig, *,
                    baseline: bool = True, baseline_train: TrainConfig | None = None, speed: bool = True,
                    resume: bool = False) -> dict:
    """Distil (and train the scratch baseline unless `baseline=False`), evaluate, write the report card
    to `out_dir`; returns the card with its summary. `speed=False` skips the decode timings."""
    from smallmighty.evaluate.lm_card import build_lm_card, evaluate_causal_lm, publish_lm
    from smallmighty.models.causal_lm import resolve_causal_lm

    out_dir = Path(out_dir)
    teacher_dir = resolve_causal_lm(teacher)
    info = distill_causal_lm(str(teacher_dir), data, out_dir / "student", config, resume=resume,
                             scratch_dir=out_dir / "scratch" if baseline else None, scratch_train=baseline_train)
    if not is_main_process():
        return {}
    print("evaluating teacher, student" + (" and scratch baseline" if baseline else "") + " on the validation text")
    start = time.perf_counter()
    text, reference = validation_text(teacher_dir, data, config)

    def row(model_dir: Path, name: str, role: str, curve: list[dict] | None = None) -> dict:
        return evaluate_causal_lm(model_dir, text, name=name, role=role, reference_tokens=reference,
                                  context=config.seq_len, speed=speed, curve=curve)

    models = [row(teacher_dir, teacher_dir.name, "teacher"),
              row(out_dir / "student", f"student ({config.method})", "student", _curve(info))]
    if baseline:
        models.append(row(out_dir / "scratch", "scratch baseline", "baseline", _curve(info["scratch"])))
    info["timings_s"]["evaluate_s"] = time.perf_counter() - start
    task = {"corpus": str(data), "validation": config.val_data or f"last {config.val_fraction:g} of the corpus",
            "validation_tokens": reference, "context": config.seq_len, "train_tokens": info["train_tokens"]}
    training = {"student": {k: v for k, v in info.items() if k not in ("history", "step_ends_s", "scratch")},
                "scratch": {k: v for k, v in info.get("scratch", {}).items() if k not in ("history", "step_ends_s")},
                "config": asdict(config)}
    card = build_lm_card(models, title=f"Distillation report: {Path(str(data)).name}", task=task, training=training)
    return {**card, "summary": publish_lm(out_dir, card)}
