"""Export a classifier to LiteRT (TensorFlow Lite's runtime, `.tflite`) with litert-torch.

litert-torch brings JAX, torchao and a converter of its own, and pins torch to a range; installed
beside our packages it could move torch. So it lives in an environment of its own, made once in
smallmighty's cache (`envs/litert-torch-<version>`, about 2 GB, a few minutes) with the same
torch==2.13.0 we use, and this module runs there as a child process
(`python -m smallmighty.compress.litert_export`) with our package on its path. Our main environment
never imports litert-torch, TensorFlow or JAX.

The converted file holds batch-1 signatures of fixed lengths (16, 32, 64, ... up to the model's
limit), sharing one copy of the weights: litert-torch 0.10.0 fails to lower our forward with
dynamic shapes (its JAX bridge needs concrete sizes for the embedding lookup), and one fixed
length would make every short text pay for the longest. `classify.py` picks the shortest signature
a text fits and pads it; padding is masked, so the logits equal an unpadded run (checked below
for every signature before the file is written).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from smallmighty.errors import SlmError
from smallmighty.io import atomic_path

LITERT_TORCH_VERSION = "0.10.0"
#: What the converter environment holds; torch pinned to ours so the converted graph is the one we test.
LITERT_PACKAGES = ("torch==2.13.0", f"litert-torch=={LITERT_TORCH_VERSION}", "ai-edge-litert==2.3.0")
#: Largest |LiteRT - torch| on any logit that counts as a correct conversion.
TOLERANCE = 1e-4
_DONE = ".slm-complete"
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]


def default_env_dir() -> Path:
    from smallmighty.cache import cache_dir

    return cache_dir("envs") / f"litert-torch-{LITERT_TORCH_VERSION}"


def litert_python(env_dir: str | os.PathLike | None = None, *, install: bool = True) -> Path:
    """The Python of the converter environment, installing it first if needed (and allowed)."""
    env = Path(env_dir) if env_dir else default_env_dir()
    python = env / "bin" / "python"
    if (env / _DONE).is_file() and python.exists():
        return python
    if not install:
        raise SlmError(f"the LiteRT converter environment is not installed at {env}")
    print(f"Installing litert-torch {LITERT_TORCH_VERSION} into its own environment at {env} "
          "(once; about 2 GB and a few minutes).", file=sys.stderr)
    shutil.rmtree(env, ignore_errors=True)
    steps = ([sys.executable, "-m", "venv", str(env)],
             [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *LITERT_PACKAGES])
    for command in steps:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            errors = [line for line in done.stderr.splitlines() if line.startswith("ERROR")] or done.stderr.splitlines()
            raise SlmError(f"installing the LiteRT converter failed (`{' '.join(command[:4])} ...` exited "
                           f"{done.returncode}): {errors[-1] if errors else 'no message'}")
    (env / _DONE).write_text(json.dumps({"packages": LITERT_PACKAGES}) + "\n", encoding="utf-8")
    return python


def signature_lengths(max_length: int) -> list[int]:
    """16, 32, 64, ... below `max_length`, then `max_length` itself."""
    lengths, n = [], 16
    while n < max_length:
        lengths.append(n)
        n *= 2
    return lengths + [max_length]


def export_litert_model(model_dir: Path, out_file: Path, max_length: int, *,
                        env_dir: str | os.PathLike | None = None) -> dict:
    """Convert in the converter environment; returns what the child measured (max |diff| vs torch)."""
    python = litert_python(env_dir)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(_PACKAGE_ROOT), os.environ.get("PYTHONPATH")])),
               TF_CPP_MIN_LOG_LEVEL="3")
    command = [str(python), "-m", "smallmighty.compress.litert_export", "--model", str(model_dir),
               "--out", str(out_file), "--max-length", str(max_length)]
    done = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
        raise SlmError(lines[-1].removeprefix("error: ") if lines else
                       f"the LiteRT conversion crashed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def export_classifier_litert(model_dir: str | Path, out_dir: str | Path, *,
                             env_dir: str | os.PathLike | None = None) -> Path:
    """Write `out_dir` with model.tflite (checked against torch) and the runtime files of
    `classifier_export`. The folder appears whole or not at all."""
    from smallmighty.compress.classifier_export import check_classifier_dir, max_length, write_runtime_files

    model_dir = check_classifier_dir(model_dir, "litert")
    longest = max_length(model_dir)
    out = Path(out_dir)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        measured = export_litert_model(model_dir, tmp / "model.tflite", longest, env_dir=env_dir)
        info = {"format": "litert", "converter": f"litert-torch {LITERT_TORCH_VERSION}",
                "signatures": measured["signatures"], "inputs": ["input_ids", "attention_mask"],
                "max_logit_diff_vs_torch": measured["max_logit_diff"], "tolerance": TOLERANCE}
        write_runtime_files(model_dir, tmp, max_length=longest, info=info)
    return out


# ---- the child, run inside the converter environment ---------------------------------------


def _convert(model_dir: str, out_file: str, max_length: int) -> dict:
    import numpy as np
    import torch
    import litert_torch
    from ai_edge_litert.interpreter import Interpreter

    from smallmighty.models.bert_encoder import load_classifier_forward

    model = load_classifier_forward(model_dir)
    lengths = signature_lengths(max_length)
    converter = None
    for n in lengths:
        # Two distinct sample tensors: given one tensor twice, litert-torch 0.10.0 bakes the sample ids
        # into the graph as a constant (every text then classifies as a run of token 1).
        ids, mask = torch.ones(1, n, dtype=torch.long), torch.ones(1, n, dtype=torch.long)
        converter = (litert_torch if converter is None else converter).signature(f"len{n}", model, (ids, mask))
    converted = converter.convert()
    with atomic_path(out_file) as tmp:
        converted.export(str(tmp))
        interpreter = Interpreter(model_path=str(tmp))
        gen = torch.Generator().manual_seed(0)
        worst = 0.0
        for n in lengths:  # every signature, on a full-length text and a padded short one
            runner = interpreter.get_signature_runner(f"len{n}")
            for used in {n, max(1, n // 3)}:
                ids = torch.zeros(1, n, dtype=torch.long)
                ids[0, :used] = torch.randint(1, model.shape.vocab_size, (used,), generator=gen)
                mask = (ids != 0).long()
                got = runner(args_0=ids.numpy().astype(np.int32), args_1=mask.numpy().astype(np.int32))
                with torch.inference_mode():
                    expected = model(ids[:, :used], mask[:, :used]).numpy()
                worst = max(worst, float(np.abs(next(iter(got.values())) - expected).max()))
        if not worst <= TOLERANCE:
            raise SlmError(f"the LiteRT conversion of {model_dir} disagrees with torch: max |logit diff| = "
                           f"{worst:.3g} > {TOLERANCE:g}; nothing was written")
    return {"signatures": [f"len{n}" for n in lengths], "max_logit_diff": worst}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m smallmighty.compress.litert_export",
                                     description="Convert a classifier to .tflite (run inside the converter environment).")
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-length", type=int, required=True)
    args = parser.parse_args(argv)
    try:
        result = _convert(args.model, args.out, args.max_length)
    except SlmError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
