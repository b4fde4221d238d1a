"""Offline transformer fusion: onnxruntime's transformer optimizer (attention, skip LayerNorm, GELU and
embedding LayerNorm fused into its contrib ops) applied to a graph before dynamic int8.

Whether it pays depends on the CPU and the model, so the engine never assumes it does: ``quantization:
auto`` on a transformer measures dynamic int8 with and without it and keeps the faster
(``quantize_choice``, ``search.recipes``). On this project's CPU (AVX2, no VNNI, onnxruntime 1 thread)
a 3-layer BERT (hidden 256, batch 32 × 64 tokens) fused 3 Attention, 6 SkipLayerNormalization, 3
BiasGelu and 1 EmbedLayerNormalization nodes and ran *slower*: fp32 104 ms against 88 ms unfused,
dynamic int8 60 ms against 45 ms (onnxruntime's own session-time fusions already cover most of it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
from onnx import numpy_helper

from .graph import quiet

FUSED_OPS = ("Attention", "MultiHeadAttention", "SkipLayerNormalization", "EmbedLayerNormalization",
             "LayerNormalization", "BiasGelu", "FastGelu", "Gelu")


def fuse_transformer(src: Path, dst: Path) -> dict[str, Any]:
    """Write ``src`` fused by onnxruntime's transformer optimizer to ``dst`` (heads and hidden size
    read from the graph; ``vit`` patterns for a graph of float inputs, ``bert`` for token ids).
    Returns the fused node counts by op type (all zero when no pattern matched: ``dst`` is then the
    same computation as ``src``)."""
    from onnxruntime.transformers.optimizer import optimize_model  # only when fusing

    graph = onnx.load(str(src)).graph
    floats = all(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for i in graph.input)
    heads, hidden = attention_shape(graph)
    with quiet():
        model = optimize_model(str(src), model_type="vit" if floats else "bert", num_heads=heads,
                               hidden_size=hidden, opt_level=0)
        stats = model.get_fused_operator_statistics()
        model.save_model_to_file(str(dst))
    return {op: int(stats.get(op, 0)) for op in FUSED_OPS if stats.get(op)}


def attention_shape(graph: onnx.GraphProto) -> tuple[int, int]:
    """(heads, hidden size) of the first attention in ``graph``, (0, 0) when not found (the optimizer
    then guesses, and without them it fuses no attention in torch's exports). Read from the query's
    reshape before the scores' MatMul: ``view(batch, seq, heads | -1, head_dim)`` of a projection whose
    bias (or weight) gives the hidden size."""
    producer = {o: n for n in graph.node for o in n.output}
    arrays = {t.name: t for t in graph.initializer}
    arrays.update({n.output[0]: n.attribute[0].t for n in graph.node if n.op_type == "Constant" and n.attribute})

    def const(name: str) -> list[int] | None:
        while name not in arrays and (n := producer.get(name)) is not None and n.op_type == "Identity":
            name = n.input[0]  # the exporter shares equal tensors (zero biases) through Identity nodes
        t = arrays.get(name)
        return None if t is None else [int(v) for v in numpy_helper.to_array(t).reshape(-1)[:4096]]

    scores = next((n for n in graph.node if n.op_type == "MatMul" and not set(n.input) & set(arrays)), None)
    node = producer.get(scores.input[0]) if scores is not None else None
    while node is not None and node.op_type == "Transpose":
        node = producer.get(node.input[0])
    if node is None or node.op_type != "Reshape" or len(node.input) < 2:
        return 0, 0
    shape = const(node.input[1])
    if shape is None and (concat := producer.get(node.input[1])) is not None and concat.op_type == "Concat":
        parts = [const(i) for i in concat.input]
        shape = [p[0] if p is not None and len(p) == 1 else 0 for p in parts]
    proj = producer.get(node.input[0])
    widths = [len(v) for v in (const(i) for i in (proj.input if proj is not None else [])) if v is not None]
    if not shape or len(shape) != 4 or shape[3] <= 0 or not widths:
        return 0, 0
    hidden = widths[0] if proj is not None and proj.op_type == "Add" else 0
    if hidden <= 0 or hidden % shape[3]:
        return 0, 0
    return hidden // shape[3], hidden
