"""Compression and export: quantization, pruning, ONNX and GGUF."""
