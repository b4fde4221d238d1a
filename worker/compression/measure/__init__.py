"""Measuring and reporting: ONNX export, task metrics, onnxruntime latency, model comparison tables,
Pareto fronts, and the report / manifest a run writes.

Import the modules themselves (this package re-exports nothing).
"""
