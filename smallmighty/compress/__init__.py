"""Compression and export: classifiers to ONNX (verified against torch) and dynamically quantized int8.

The engine's own int8/int4 decoder weights live with the engine (`smallmighty.engine.quantize`).
"""
