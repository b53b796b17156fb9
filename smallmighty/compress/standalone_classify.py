"""Classify text with an exported smallmighty classifier, without torch or smallmighty.

Needs only `numpy`, `tokenizers` and the runtime of the model file: `onnxruntime` for model.onnx
or model.int8.onnx, `ai-edge-litert` for model.tflite.

    pip install onnxruntime tokenizers numpy
    python classify.py "my card has not arrived" "how do I top up?"
    cat questions.txt | python classify.py --json        # one text per line

In Python:

    from classify import Classifier
    clf = Classifier("path/to/export")
    clf.predict(["my card has not arrived"])             # -> ["card_arrival"]

The folder holds the model file, tokenizer.json (truncation and padding already set to what the
model expects) and labels.json (label names in the order of the model's outputs). smallmighty
writes this file beside every `slm export --format onnx|litert`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
#: Model files in the order they are picked when none is named: the int8 model is the fastest.
MODEL_FILES = ("model.int8.onnx", "model.onnx", "model.tflite")


def _onnx_runner(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def run(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return session.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0]

    return run


def _litert_runner(path: Path, threads: int):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path), num_threads=threads)
    # One signature per fixed length ("len16", "len32", ...), batch 1, inputs (ids, mask) as int32.
    lengths = sorted(int(name[3:]) for name in interpreter.get_signature_list())
    runners = {n: interpreter.get_signature_runner(f"len{n}") for n in lengths}

    def run(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        rows = []
        for row_ids, row_mask in zip(ids, mask):
            used = int(row_mask.sum())
            n = next(n for n in lengths if n >= used)  # the shortest that fits; padding is masked out
            padded_ids, padded_mask = np.zeros((2, 1, n), dtype=np.int32)
            padded_ids[0, :used], padded_mask[0, :used] = row_ids[row_mask == 1][:n], 1
            out = runners[n](args_0=padded_ids, args_1=padded_mask)
            rows.append(next(iter(out.values())))
        return np.concatenate(rows)

    return run


class Classifier:
    """The exported model with its tokenizer and label names."""

    def __init__(self, folder: str | Path = HERE, model_file: str | None = None, threads: int = 1) -> None:
        from tokenizers import Tokenizer

        folder = Path(folder)
        if model_file is None:
            model_file = next((name for name in MODEL_FILES if (folder / name).is_file()), None)
            if model_file is None:
                raise SystemExit(f"error: no model file in {folder} (expected one of {', '.join(MODEL_FILES)})")
        path = folder / model_file
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.labels = json.loads((folder / "labels.json").read_text(encoding="utf-8"))
        self._run = (_litert_runner if path.suffix == ".tflite" else _onnx_runner)(path, threads)

    def logits(self, texts: list[str]) -> np.ndarray:
        """Scores [len(texts), len(labels)]: the higher, the more likely that label."""
        encodings = self.tokenizer.encode_batch(list(texts))
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        return self._run(ids, mask)

    def predict(self, texts: list[str]) -> list[str]:
        """The most likely label of each text."""
        return [self.labels[i] for i in self.logits(texts).argmax(axis=1)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Classify texts with this exported model (no torch needed).")
    parser.add_argument("texts", nargs="*", help="texts to classify (default: one per line on standard input)")
    parser.add_argument("--model", default=None, help=f"model file in this folder (default: first of {', '.join(MODEL_FILES)})")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: fastest for one text at a time)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per text, with every label's score")
    args = parser.parse_args(argv)
    texts = args.texts or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not texts:
        parser.error("give texts as arguments or on standard input")
    clf = Classifier(HERE, args.model, args.threads)
    for text in texts:  # one at a time, so each answer appears as soon as it is ready
        scores = clf.logits([text])[0]
        label = clf.labels[int(scores.argmax())]
        if args.json:
            print(json.dumps({"text": text, "label": label,
                              "scores": dict(zip(clf.labels, map(float, scores)))}), flush=True)
        else:
            print(label, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
