"""`slm export`: take a model where smallmighty is not: llama.cpp and Ollama (GGUF), ONNX Runtime
(servers, no torch) and LiteRT (phones and edge boards).

Nothing heavy is imported here; the exporters load inside the handler.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from smallmighty import io
from smallmighty.errors import SlmError

FORMATS = ("gguf", "onnx", "litert")
GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0")  # the same as gguf_export.GGUF_TYPES, without importing it

EXAMPLES = """\
examples:
  slm export --format gguf                                  # the default SmolLM2-135M-Instruct, f16
  slm export runs/pretrain/model --format gguf --type q8_0 --out model.q8_0.gguf
  slm export runs/distill/student --format onnx --int8      # model.onnx + model.int8.onnx + classify.py
  slm export runs/distill/student --format litert --out runs/student-litert

gguf (causal LMs: Llama, SmolLM, Mistral, Qwen2): one file for llama.cpp (`llama-cli -m FILE`) or
Ollama (`FROM ./FILE` in a Modelfile), with the tokenizer and chat template inside. --type f32/f16
keep the weights; q8_0/q4_0 quantize them (q4_0 keeps the embedding and output matrix at q8_0).

onnx and litert (classifiers from `slm distill` / `slm finetune`): a folder with the model, its
tokenizer.json, labels.json and classify.py, which runs with only `pip install onnxruntime
tokenizers numpy` (litert: ai-edge-litert instead of onnxruntime), no torch:
  python runs/export/student-onnx/classify.py "my card has not arrived"
litert installs its converter (litert-torch) once into an environment of its own in the cache
($SLM_CACHE_DIR/envs, about 2 GB), so nothing in this environment changes.

Every export is checked against torch before it is written (GGUF: in tests and bench/export.py,
against our engine in llama.cpp).
"""


def register(subparsers) -> None:
    sub = subparsers.add_parser("export", help="export a model to GGUF (llama.cpp, Ollama), ONNX or LiteRT",
                                description="Write a model in a format other runtimes load: GGUF for causal "
                                            "language models, ONNX (fp32 and int8) or LiteRT for classifiers.",
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub.add_argument("model", nargs="?", default=None,
                     help="model folder (a .gguf file or hub id also works for --format gguf; default for gguf: "
                          "SmolLM2-135M-Instruct)")
    sub.add_argument("--format", required=True, choices=FORMATS, help="what to write")
    sub.add_argument("--type", default="f16", choices=GGUF_TYPES, dest="gguf_type",
                     help="gguf only: weight type (default: f16)")
    sub.add_argument("--int8", action="store_true",
                     help="onnx only: also write model.int8.onnx (dynamic int8 quantization), which classify.py prefers")
    sub.add_argument("--out", default=None,
                     help="output file (gguf) or folder (onnx, litert); default: runs/export/<model>.<type>.gguf "
                          "or runs/export/<model>-<format>")
    sub.set_defaults(handler=run)


def default_out(model: str | None, fmt: str, gguf_type: str) -> Path:
    name = Path(model).stem if model and model.endswith(".gguf") else Path(model or "SmolLM2-135M-Instruct").name
    name = name or "model"
    return Path("runs/export") / (f"{name}.{gguf_type}.gguf" if fmt == "gguf" else f"{name}-{fmt}")


def check_writable(out: Path, fmt: str) -> None:
    """Fail now, in one line, if `out` cannot take this format's output (rather than after minutes of
    converting): a .gguf is a file, the other formats write a folder."""
    if fmt == "gguf" and out.is_dir():
        raise SlmError(f"--out {out} is a folder; give the .gguf file to write")
    if fmt != "gguf" and out.exists() and not out.is_dir():
        raise SlmError(f"--out {out} is a file; --format {fmt} writes a folder")
    io.check_writable(out)


def _size_mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2**20


def run(args: argparse.Namespace) -> int:
    if args.format != "gguf" and args.model is None:
        raise SlmError(f"name the classifier folder to export: slm export DIR --format {args.format}")
    if args.int8 and args.format != "onnx":
        raise SlmError("--int8 applies to --format onnx only")
    out = Path(args.out) if args.out else default_out(args.model, args.format, args.gguf_type)
    check_writable(out, args.format)
    if args.format == "gguf":
        from smallmighty.compress.gguf_export import export_gguf

        export_gguf(args.model, out, gguf_type=args.gguf_type)
        print(f"wrote {out} ({_size_mb(out):.1f} MB). Run it with llama.cpp: llama-cli -m {out}", file=sys.stderr)
        return 0
    if args.format == "onnx":
        from smallmighty.compress.classifier_export import export_classifier_onnx

        export_classifier_onnx(args.model, out, int8=args.int8)
    else:
        from smallmighty.compress.litert_export import export_classifier_litert

        export_classifier_litert(args.model, out)
    print(f"wrote {out}/ ({_size_mb(out):.1f} MB). Classify without torch: python {out / 'classify.py'} \"some text\"",
          file=sys.stderr)
    return 0
