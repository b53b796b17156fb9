"""Text classification inference over a saved BERT classifier folder, on eager torch or ONNX Runtime.

`load_classifier(dir, runtime)` returns a `TextClassifier` that tokenizes with the folder's own
tokenizer (truncating to the length the model was trained with, padding only to the longest text in
the batch) and returns logits or label names. A model trained on long texts (its smallmighty.json has
`windows` > 1) reads a long text as up to that many consecutive windows of its length and averages
their logits, so it reads as much of a document as a bag-of-words model does. The runtimes give the same logits (int8: close ones);
they differ in batch-1 speed: ONNX Runtime fp32 measured 2-3.5x and int8 7-9x faster than eager torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from smallmighty.errors import SlmError
from smallmighty.io import read_json

RUNTIMES = ("torch", "onnx", "onnx-int8")
#: ONNX Runtime intra-op threads. Batch-1 BERT ops are too small to split across the 2 cores here,
#: and a second thread spin-waits against whatever else runs: 1 thread measured as fast or faster.
ORT_THREADS = 1

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")

#: (input_ids, attention_mask) int64 [batch, seq] -> logits float32 [batch, num_labels]
Backend = Callable[[np.ndarray, np.ndarray], np.ndarray]


class TextClassifier:
    """A tokenizer plus a logits backend, with the label names from config.json."""

    def __init__(self, tokenizer, backend: Backend, label_names: list[str], max_length: int,
                 runtime: str, windows: int = 1) -> None:
        self.tokenizer = tokenizer
        self.backend = backend
        self.label_names = label_names
        self.max_length = max_length
        self.runtime = runtime
        self.windows = windows

    def predict_logits(self, texts: list[str]) -> np.ndarray:
        """Logits [len(texts), num_labels] as float32 (the mean over a text's windows, see the module)."""
        if isinstance(texts, str):
            raise SlmError("predict_logits takes a list of texts, not one string")
        if not texts:
            return np.zeros((0, len(self.label_names)), dtype=np.float32)
        if self.windows > 1:
            return self._windowed_logits(list(texts))
        enc = self.tokenizer(list(texts), truncation=True, max_length=self.max_length, padding=True,
                             return_tensors="np", return_token_type_ids=False)
        return self.backend(enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64))

    def _windowed_logits(self, texts: list[str]) -> np.ndarray:
        enc = self.tokenizer(texts, truncation=True, max_length=self.max_length, padding=True,
                             return_overflowing_tokens=True, return_tensors="np", return_token_type_ids=False)
        owner = np.asarray(enc["overflow_to_sample_mapping"])
        rank = np.arange(len(owner)) - np.searchsorted(owner, owner)  # windows come grouped by text
        kept = rank < self.windows
        logits = self.backend(enc["input_ids"][kept].astype(np.int64), enc["attention_mask"][kept].astype(np.int64))
        sums = np.zeros((len(texts), logits.shape[1]), dtype=np.float64)
        np.add.at(sums, owner[kept], logits)
        return (sums / np.bincount(owner[kept], minlength=len(texts))[:, None]).astype(np.float32)

    def predict(self, texts: list[str]) -> list[str]:
        """The most likely label name for each text."""
        return [self.label_names[i] for i in self.predict_logits(texts).argmax(axis=1)]


def _read_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not path.is_file():
        raise SlmError(f"{model_dir} is not a saved classifier: config.json is missing")
    config = read_json(path)
    if not any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or []):
        raise SlmError(f"{model_dir} holds no sequence classifier (architectures: "
                       f"{config.get('architectures')}); train or distill a classifier into it first")
    return config


def _torch_backend(model_dir: Path) -> Backend:
    """The hand-written forward in eager torch: measured 10-40% faster than transformers' model at
    batch 1.

    One text runs on one torch thread: its ops are too small to split, so a second thread only
    syncs, and on a busy machine its spin-waits made MiniLM-L6 7x slower (132 vs 18 ms p50).
    Batches keep torch's thread count.
    """
    import torch

    from smallmighty.models.bert_encoder import load_classifier_forward

    model = load_classifier_forward(model_dir)

    def run(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        threads = torch.get_num_threads()
        if len(ids) == 1:
            torch.set_num_threads(1)
        try:
            with torch.inference_mode():
                return model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
        finally:
            torch.set_num_threads(threads)

    return run


def runtime_file(model_dir: Path, runtime: str) -> Path:
    """The weights file `runtime` reads: the folder's safetensors for torch; for ONNX Runtime the
    classifier exported to ONNX (and quantized to int8), made once per content of its config and
    weights and kept in smallmighty's cache, never in the model's folder."""
    from smallmighty.cache import cache_dir, content_fingerprint
    from smallmighty.compress.onnx_export import export_onnx, quantize_onnx_int8

    weights = model_dir / "model.safetensors"
    if not weights.is_file():
        raise SlmError(f"{model_dir} is not a saved classifier: model.safetensors is missing")
    if runtime == "torch":
        return weights
    int8 = runtime == "onnx-int8"
    folder = cache_dir("onnx") / content_fingerprint([model_dir / "config.json", weights])
    fp32, q8 = folder / "model.onnx", folder / "model.int8.onnx"
    try:
        if not fp32.is_file():
            export_onnx(model_dir, fp32)
        if int8 and not q8.is_file():
            quantize_onnx_int8(fp32, q8)
    except PermissionError as err:
        raise SlmError(f"cannot write the ONNX export into the cache at {folder} ({err.strerror}); "
                       "set SLM_CACHE_DIR to a writable folder") from None
    return q8 if int8 else fp32


def _onnx_backend(model_dir: Path, runtime: str) -> Backend:
    from smallmighty.compress.onnx_export import ort_session

    session = ort_session(runtime_file(model_dir, runtime), threads=ORT_THREADS)

    def run(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return session.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0]

    return run


def load_classifier(model_dir: str, runtime: str = "torch") -> TextClassifier:
    """Load a saved BERT classifier folder for inference on `runtime` ("torch", "onnx", "onnx-int8").

    "onnx" and "onnx-int8" export (and quantize) into smallmighty's cache on first use, then reuse
    the files.
    """
    from transformers import AutoTokenizer

    if runtime not in RUNTIMES:
        raise SlmError(f"unknown runtime {runtime!r}; choose one of: {', '.join(RUNTIMES)}")
    path = Path(model_dir)
    if not path.is_dir():
        raise SlmError(f"model directory not found: {model_dir}")
    config = _read_config(path)
    # Without its files, AutoTokenizer quietly builds an empty tokenizer that maps every word to [UNK].
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise SlmError(f"{model_dir} has no tokenizer: expected one of {', '.join(TOKENIZER_FILES)}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise SlmError(f"{model_dir}: cannot load its tokenizer ({err})") from None
    if len(tokenizer) > config.get("vocab_size", len(tokenizer)):
        raise SlmError(f"{model_dir}: the tokenizer has {len(tokenizer)} tokens but the model only "
                       f"{config['vocab_size']}; they do not belong together")
    labels = {int(i): name for i, name in (config.get("id2label") or {}).items()}
    if not labels:
        raise SlmError(f"{path / 'config.json'}: no id2label, so the label names are unknown")
    label_names = [labels[i] for i in sorted(labels)]
    # Tokenizers without a saved limit report a huge sentinel; positions cap the usable length.
    max_length = min(tokenizer.model_max_length,
                     config.get("max_position_embeddings", tokenizer.model_max_length))
    backend = _torch_backend(path) if runtime == "torch" else _onnx_backend(path, runtime)
    windows = int(read_json(path / "smallmighty.json", default={}).get("windows", 1))
    return TextClassifier(tokenizer, backend, label_names, max_length, runtime, windows)
