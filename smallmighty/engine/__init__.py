"""The inference engine: how smallmighty runs models fast on a CPU.

Decoders, read like gpt-fast: `model.py` (a Llama-family model laid out for inference and the one
path that loads it), `quantize.py` (its int8/int4 weights), `native.py` + `decode.c` (each decoding
step as one C call), `generate.py` (tokens in, text out: batches, sampling, stop strings, chat
templates) and `sampling.py`. Classifiers: `classifier.py` (torch or ONNX Runtime).
"""
