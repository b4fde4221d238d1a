"""Quantization of an fp32 ONNX graph for onnxruntime on CPU, one handler per method.

Import the modules themselves (this package re-exports nothing).
"""
