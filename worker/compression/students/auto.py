"""``auto`` students: the widest student that fits a parameter budget.

Zoo teachers get the same architecture, narrowed (and, when deep, shortened) to fit; Hugging Face
teachers half their layers, then a narrower feed-forward; black-box (ONNX) teachers a fresh MLP /
CNN / 1-D CNN / transformer for their input kind.
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from ..errors import SpecError
from ..types import Teacher
from . import zoo
from .derive import derive_zoo_student, fresh_zoo_student, hf_student, kept_hf_layers
from .hf_derive import derive_hf_student
from .hf_model import hf_layer_count
from .student import Student
from .zoo_layers import (
    MIN_WIDTH,
    NO_VOCAB,
    derive_zoo_config,
    describe_config,
    even_layers,
    input_keys,
    largest_fitting,
    layer_count,
    meta_count,
    min_layer_count,
)

ZOO_RATIOS = [i / 128 for i in range(129)]
"""Width ratios the zoo auto search tries; 0 means every layer at its minimum width."""
HF_RATIOS = [i / 16 for i in range(1, 17)]


def auto_student(teacher: Teacher, budget: int, *, strict: bool = True) -> Student:
    """The widest student within ``budget``; ``strict=False`` (a default budget, not the user's):
    when none fits, a black box's smallest student of its kind while it is smaller than the teacher."""
    if teacher.kind == "hf":
        return _auto_hf(teacher, budget)
    if teacher.kind == "zoo" and teacher.module is not None:
        return _auto_zoo(teacher, budget)
    return _auto_blackbox(teacher, budget, strict)


def _auto_zoo(teacher: Teacher, budget: int) -> Student:
    """Same architecture, widest that fits; deep teachers (3+ layers) may lose half their layers
    when full depth would leave under half the width; fewer layers still only if nothing else fits."""
    cfg = zoo.validate_config(teacher.config)
    depth, min_depth = layer_count(cfg), min_layer_count(cfg)

    def widest(d: int) -> tuple[list[int], float | None]:
        kept = even_layers(cfg, d)
        return kept, largest_fitting(ZOO_RATIOS, lambda r: meta_count(derive_zoo_config(cfg, kept, r)), budget)

    depths = [depth] if depth < 3 else [depth, max(min_depth, math.ceil(depth / 2))]
    fitting: list[tuple[float, list[int]]] = []
    for d in depths:
        kept, ratio = widest(d)
        if ratio is not None and ratio >= 0.5:
            return derive_zoo_student(teacher, kept, ratio, "auto", budget)
        if ratio is not None:
            fitting.append((ratio, kept))
    if fitting:
        ratio, kept = max(fitting, key=lambda f: f[0])
        return derive_zoo_student(teacher, kept, ratio, "auto", budget)
    for d in range(depths[-1] - 1, min_depth - 1, -1):
        kept, ratio = widest(d)
        if ratio is not None:
            return derive_zoo_student(teacher, kept, ratio, "auto", budget)
    smallest = meta_count(derive_zoo_config(cfg, even_layers(cfg, min_depth), 0.0))
    raise SpecError(f"no {cfg['architecture']} student fits {budget:,} parameters: the smallest "
                    f"({min_depth} layer(s), minimum widths) has {smallest:,}; raise the budget")


def _auto_hf(teacher: Teacher, budget: int) -> Student:
    """Half the layers (at least 1) with the widest feed-forward that fits, else 1 layer; if nothing
    fits (the embedding table may dominate), the smallest derived student, said so in its description."""
    def build(n: int, r: float) -> tuple[nn.Module, dict[int, int]]:
        return derive_hf_student(teacher, num_layers=n, width_ratio=None if r == 1.0 else r)

    sizes: dict[tuple[int, float], int] = {}

    def size(n: int, r: float) -> int:  # only the counts are kept: real transformers are large
        if (n, r) not in sizes:
            sizes[(n, r)] = zoo.count_parameters(build(n, r)[0])
        return sizes[(n, r)]

    layer_counts = list(dict.fromkeys((max(1, hf_layer_count(teacher) // 2), 1)))
    for n in layer_counts:
        ratio = largest_fitting(HF_RATIOS, lambda r, n=n: size(n, r), budget)
        if ratio is not None:
            module, layer_map = build(n, ratio)
            return hf_student(module, layer_map, "auto",
                               f"derived from teacher layers {kept_hf_layers(layer_map)}, feed-forward width "
                               f"×{ratio:g}, within {budget:,} parameters, initialised from teacher")
    module, layer_map = build(layer_counts[-1], HF_RATIOS[0])
    return hf_student(module, layer_map, "auto",
                       f"derived from teacher layers {kept_hf_layers(layer_map)}, feed-forward width "
                       f"×{HF_RATIOS[0]:g}: the smallest derived student, still over the budget of {budget:,} "
                       "parameters (the embedding table dominates), initialised from teacher")


def _auto_blackbox(teacher: Teacher, budget: int, strict: bool = True) -> Student:
    """A fresh student for a black box: MLP (2 hidden layers) for vectors, 3-block CNN for images,
    3-block 1-D CNN for signals, a small transformer for token ids; widths fitted to the budget. A graph
    with no convolution (an MLP over a flattened image or window) gets an MLP student, as it is."""
    kind = teacher.input_kind
    base = {"task": teacher.task, "output_dim": teacher.output_dim}
    if kind == "tokens":
        return _auto_tokens(teacher, budget, base)
    clicks = _auto_clicks(teacher, budget, base)
    if clicks is not None:
        return clicks
    arch = {"vector": "mlp", "image": "cnn", "signal": "cnn1d"}[kind]
    if teacher.config.get("convolutional") is False:
        arch = "mlp"
    base.update(architecture=arch, **input_keys(teacher, arch))
    # onnxruntime's CPU convolutions work in blocks of 8 channels: measured at batch 64 on 1×28×28
    # images, channels [16, 32, 64] ran in 2.6 ms and [11, 22, 44] in 3.5 ms (students.speed_fit)
    widths = list(range(MIN_WIDTH, 1025)) if arch == "mlp" else [MIN_WIDTH, *range(8, 129, 8)]

    def family(w: int) -> dict[str, Any]:
        if arch == "mlp":
            return {**base, "hidden": [w, w]}
        return {**base, "channels": [w, 2 * w, 4 * w], "kernel_size": 3 if arch == "cnn" else 5}

    width = largest_fitting(widths, lambda w: meta_count(family(w)), budget)
    if width is None:  # a small teacher: the smallest student, while it is still smaller than the teacher
        smallest = meta_count(family(widths[0]))
        if strict or not teacher.num_parameters or smallest >= teacher.num_parameters:
            raise SpecError(f"no {arch} student fits {budget:,} parameters: the smallest has {smallest:,}"
                            + (f" (the teacher {teacher.num_parameters:,})" if teacher.num_parameters else "")
                            + "; raise the budget")
        cfg = zoo.validate_config(family(widths[0]))
        return fresh_zoo_student(cfg, f"auto for a black-box teacher: {describe_config(cfg)}, the smallest of its "
                                      f"kind ({smallest:,} parameters, over the budget of {budget:,})")
    cfg = zoo.validate_config(family(width))
    return fresh_zoo_student(cfg, f"auto for a black-box teacher: {describe_config(cfg)}, within {budget:,} parameters")


def _auto_clicks(teacher: Teacher, budget: int, base: dict[str, Any]) -> Student | None:
    """A click ONNX teacher whose id inputs look up tables of known sizes (`io.onnx_inputs`): a zoo ``ctr``
    with a table per id column, the widest of embedding dim 16, 8, 4, 2 or 1 that keeps an MLP [w] with w ≥ 32
    within the budget (else embedding dim 1 at any width: tables are most of a click model's parameters). One
    hidden layer: a black box's depth is unknown, and two layers timed slower than a one-layer teacher.
    None: not such a teacher, or nothing fits."""
    layout = teacher.config.get("ids_layout")
    if not layout or any(spec.get("size") is None for spec in layout["ids"]):
        return None
    categorical = [{"column": spec["name"], "index": j, "kind": "ids", "size": int(spec["size"])}
                   for j, spec in enumerate(layout["ids"])]
    base = {**base, "architecture": "ctr", "input_dim": math.prod(teacher.input_shape), "categorical": categorical}
    for dim in (16, 8, 4, 2, 1):
        def family(w: int, dim: int = dim) -> dict[str, Any]:
            return {**base, "embedding_dim": dim, "hidden": [w]}

        width = largest_fitting(list(range(MIN_WIDTH, 1025)), lambda w: meta_count(family(w)), budget)
        if width is not None and (width >= 32 or dim == 1):
            cfg = zoo.validate_config(family(width))
            return fresh_zoo_student(cfg, f"auto for a click ONNX teacher: {describe_config(cfg)}, within "
                                          f"{budget:,} parameters")
    return None


def _auto_tokens(teacher: Teacher, budget: int, base: dict[str, Any]) -> Student:
    """4 layers when that still allows dim ≥ 128, else 2, else 1; dim the largest that fits (≤ 512)."""
    base = {**base, "architecture": "transformer", **input_keys(teacher, "transformer"), "pooling": "mean"}
    if "vocab_size" not in base:
        raise SpecError(NO_VOCAB)

    def cfg(layers: int, dim: int) -> dict[str, Any]:
        heads = next(h for h in (8, 4, 2, 1) if dim % h == 0 and (dim // h >= 32 or h == 1))
        return {**base, "dim": dim, "num_layers": layers, "num_heads": heads, "ffn_dim": 4 * dim}

    dims = list(range(MIN_WIDTH, 513, 4))
    for layers, min_dim in ((4, 128), (2, MIN_WIDTH), (1, MIN_WIDTH)):
        dim = largest_fitting(dims, lambda d, n=layers: meta_count(cfg(n, d)), budget)
        if dim is not None and dim >= min_dim:
            chosen = zoo.validate_config(cfg(layers, dim))
            return fresh_zoo_student(
                chosen, f"auto for a black-box teacher: {describe_config(chosen)}, within {budget:,} parameters")
    raise SpecError(f"no transformer student fits {budget:,} parameters: the smallest (1 layer, dim "
                    f"{MIN_WIDTH}, vocabulary {base['vocab_size']:,}) has {meta_count(cfg(1, MIN_WIDTH)):,}; "
                    "raise the budget")
