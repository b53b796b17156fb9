"""Export a saved classifier as a folder that runs without torch or smallmighty.

The folder holds the model file (ONNX, or LiteRT through `litert_export`), the tokenizer as one
`tokenizer.json` with truncation and padding set the way the model was trained, `labels.json` (label
names in output order), `classify.py` (a copy of `standalone_classify.py`: a command and a class that
need only numpy, tokenizers and the model's runtime) and `export.json` saying what was exported from
where and how far it was checked against torch.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from smallmighty.errors import SlmError
from smallmighty.io import atomic_path, read_json

#: The standalone example shipped beside every export, under this name.
EXAMPLE_NAME = "classify.py"
_EXAMPLE_SOURCE = Path(__file__).with_name("standalone_classify.py")


def check_classifier_dir(model_dir: str | Path, fmt: str) -> Path:
    """The folder of a saved sequence classifier, or a one-line error saying what it is instead."""
    path = Path(model_dir)
    config = path / "config.json"
    if not config.is_file():
        raise SlmError(f"{path}: not a saved model folder (config.json is missing)")
    architectures = read_json(config).get("architectures") or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        if any(a.endswith("ForCausalLM") for a in architectures):
            raise SlmError(f"{path} is a causal language model; --format {fmt} exports classifiers "
                           "(export it with --format gguf)")
        raise SlmError(f"{path} is not a sequence classifier (architectures: {architectures}); "
                       f"--format {fmt} exports classifiers")
    if not (path / "model.safetensors").is_file():
        raise SlmError(f"{path}: model.safetensors is missing")
    return path


def label_names(model_dir: Path) -> list[str]:
    """Label names in the order of the model's outputs, from config.json's id2label."""
    labels = {int(i): name for i, name in (read_json(model_dir / "config.json").get("id2label") or {}).items()}
    if not labels:
        raise SlmError(f"{model_dir / 'config.json'}: no id2label, so the label names are unknown")
    return [labels[i] for i in sorted(labels)]


def max_length(model_dir: Path) -> int:
    """Longest input the classifier takes, in tokens: its position table less any offset (MPNet's)."""
    from smallmighty.models.bert_encoder import position_offset

    config = read_json(model_dir / "config.json")
    return config["max_position_embeddings"] - position_offset(config.get("model_type"), config.get("pad_token_id"))


def standalone_tokenizer(model_dir: Path, max_length: int, fixed_length: int | None = None):
    """The model's fast tokenizer (a `tokenizers.Tokenizer`) set to truncate at `max_length` tokens and
    pad to the longest text of a batch, or to exactly `fixed_length` tokens for runtimes with fixed shapes."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as err:
        raise SlmError(f"{model_dir}: cannot load its tokenizer ({err})") from None
    if not getattr(hf, "is_fast", False):
        raise SlmError(f"{model_dir}: the tokenizer has no fast (tokenizers) version to export")
    tokenizer = Tokenizer.from_str(hf.backend_tokenizer.to_str())
    max_length = min(max_length, hf.model_max_length)
    tokenizer.enable_truncation(max_length=fixed_length or max_length)
    pad_id = hf.pad_token_id if hf.pad_token_id is not None else 0
    tokenizer.enable_padding(pad_id=pad_id, pad_token=hf.pad_token or "[PAD]", length=fixed_length)
    return tokenizer


def write_runtime_files(model_dir: Path, folder: Path, *, max_length: int, fixed_length: int | None = None,
                        info: dict) -> None:
    """Everything beside the model file: tokenizer.json, labels.json, classify.py and export.json."""
    standalone_tokenizer(model_dir, max_length, fixed_length).save(str(folder / "tokenizer.json"))
    (folder / "labels.json").write_text(json.dumps(label_names(model_dir), indent=1) + "\n", encoding="utf-8")
    shutil.copyfile(_EXAMPLE_SOURCE, folder / EXAMPLE_NAME)
    (folder / "export.json").write_text(json.dumps({"source": str(model_dir.resolve()), **info}, indent=2) + "\n",
                                        encoding="utf-8")


def export_classifier_onnx(model_dir: str | Path, out_dir: str | Path, *, int8: bool = False) -> Path:
    """Write `out_dir` with model.onnx (verified against torch), model.int8.onnx when `int8` (dynamic
    quantization), and the runtime files. The folder appears whole or not at all."""
    from smallmighty.compress.onnx_export import (
        EXPORT_TOLERANCE,
        export_onnx,
        max_logit_diff,
        quantize_onnx_int8,
    )
    from smallmighty.models.bert_encoder import load_classifier_forward

    model_dir = check_classifier_dir(model_dir, "onnx")
    out = Path(out_dir)
    forward = load_classifier_forward(model_dir)  # for the checks against torch below
    with atomic_path(out) as tmp:
        tmp.mkdir()
        export_onnx(model_dir, tmp / "model.onnx")
        info = {"format": "onnx", "inputs": ["input_ids", "attention_mask"], "output": "logits",
                "fp32_max_logit_diff_vs_torch": max_logit_diff(forward, tmp / "model.onnx", threads=1),
                "tolerance": EXPORT_TOLERANCE}
        if int8:
            quantize_onnx_int8(tmp / "model.onnx", tmp / "model.int8.onnx")
            info["int8_max_logit_diff_vs_torch"] = max_logit_diff(forward, tmp / "model.int8.onnx", threads=1)
        write_runtime_files(model_dir, tmp, max_length=max_length(model_dir), info=info)
    return out
