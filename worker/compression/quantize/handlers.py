"""The post-training handlers: ``auto`` (picks dynamic or static int8 from the graph), ``none`` (a
copy), and onnxruntime's dynamic int8, static int8, weight-only int8 and int4, each with the
accuracy-aware fallback (`accuracy`) when the config sets ``max_metric_drop``."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx

from ..errors import Cancelled, CompressionError, InputError, SpecError
from ..spec import (
    AutoQuantizationConfig,
    DynamicInt8Config,
    Int4Config,
    NoQuantizationConfig,
    QuantizationMethod,
    StaticInt8Config,
    WeightOnlyInt8Config,
)
from ..types import CancelFn, Progress
from .accuracy import AccuracyAware
from .calibration import calibration_sample
from .fusion import fuse_transformer
from .graph import copy_model, graph_feeds, inlined, prepare_graph, quiet
from .input_scales import raw_scale_nodes
from .ort_methods import (
    DynamicMethod,
    OrtMethod,
    PostTrainingConfig,
    StaticMethod,
    WeightOnlyMethod,
)
from .registry import (
    QuantizationResult,
    QuantizeJob,
    register_quantize_handler,
    run_handler,
)

UNCALIBRATED: dict[str, Any] = {"method": None, "samples": 0, "sample_ids": []}
Setup = Callable[[onnx.ModelProto], tuple[dict[str, Any], dict[str, Any]]]
"""From the prepared graph: the method class's extra arguments and the calibration record."""


def resolve_method(config: QuantizationMethod, onnx_fp32: Path) -> QuantizationMethod:
    """Turn ``auto`` into a concrete method: dynamic int8 for transformers — graphs fed token ids, or
    with attention (`has_attention`: a ViT on images), whose attention activations static calibration
    handles badly — static int8 for the rest; the shared fields (tolerance) carry over, the rest are the
    method's defaults. (A 2-layer ViT student on 32×32 images, onnxruntime, 1 thread: dynamic int8 was
    smaller and faster than static at batch 1 and 64, at the same accuracy; `bench/fields.py --cases vit`.)"""
    if not isinstance(config, AutoQuantizationConfig):
        return config
    graph = onnx.load(str(onnx_fp32), load_external_data=False).graph
    tokens = any(i.type.tensor_type.elem_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32)
                 for i in graph.input)
    shared = config.model_dump(exclude={"method"})
    return DynamicInt8Config(**shared) if tokens or has_attention(graph) else StaticInt8Config(**shared)


def has_attention(graph: onnx.GraphProto) -> bool:
    """A MatMul of two activations (no weight on either side): attention's scores (Q·Kᵀ) or its mix (P·V).
    MLPs, CNNs and the classifier heads multiply by weights only."""
    consts = {t.name for t in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    return any(n.op_type == "MatMul" and not consts.intersection(n.input) for n in graph.node)


@register_quantize_handler(AutoQuantizationConfig)
def quantize_auto(config: AutoQuantizationConfig, job: QuantizeJob) -> QuantizationResult:
    return run_handler(resolve_method(config, job.onnx_fp32), job)


@register_quantize_handler(NoQuantizationConfig)
def quantize_none(config: NoQuantizationConfig, job: QuantizeJob) -> QuantizationResult:
    job.out_path.parent.mkdir(parents=True, exist_ok=True)
    copy_model(job.onnx_fp32, job.out_path)
    metric = None if job.evaluate is None else float(job.evaluate(job.out_path))
    return job.result("none", options={}, calibration=dict(UNCALIBRATED), metric_fp32=metric, metric_quant=metric,
                      drop=None if metric is None else 0.0, message="not quantized (method 'none')")


@register_quantize_handler(DynamicInt8Config)
def quantize_dynamic(config: DynamicInt8Config, job: QuantizeJob) -> QuantizationResult:
    return post_training(config, job, DynamicMethod)


@register_quantize_handler(StaticInt8Config)
def quantize_static(config: StaticInt8Config, job: QuantizeJob) -> QuantizationResult:
    if not job.calibration_inputs:
        raise InputError("static_int8 quantization needs calibration data")
    inputs = job.calibration_inputs

    def setup(model: onnx.ModelProto) -> tuple[dict[str, Any], dict[str, Any]]:
        sample, ids = calibration_sample(inputs, config.calibration_samples, job.seed)
        calibration = {"method": config.calibration, "samples": len(ids), "sample_ids": ids}
        return {"feeds": graph_feeds(model, sample), "cancel": job.cancel}, calibration

    return post_training(config, job, StaticMethod, setup)


@register_quantize_handler(WeightOnlyInt8Config)
def quantize_weight_only_int8(config: WeightOnlyInt8Config, job: QuantizeJob) -> QuantizationResult:
    return post_training(config, job, WeightOnlyMethod, lambda _: ({"bits": 8}, dict(UNCALIBRATED)))


@register_quantize_handler(Int4Config)
def quantize_int4(config: Int4Config, job: QuantizeJob) -> QuantizationResult:
    return post_training(config, job, WeightOnlyMethod, lambda _: ({"bits": 4}, dict(UNCALIBRATED)))


def post_training(config: PostTrainingConfig, job: QuantizeJob, method_class: type[OrtMethod],
                  setup: Setup | None = None) -> QuantizationResult:
    """Prepare the graph, quantize it with ``method_class``, then (with an evaluation) score it and
    fall back to float for the costliest nodes until the drop is within ``max_metric_drop``."""
    if config.max_metric_drop is not None and job.evaluate is None:
        raise SpecError("max_metric_drop needs an evaluation (labelled data or a teacher to compare with)")
    src, out = job.onnx_fp32, job.out_path
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kdq-quant-", dir=out.parent) as tmp:
        work = Path(tmp)
        job.progress(Progress("quantize", 0, 1, message="preparing the graph"))
        pre = work / "prepared.onnx"
        fused = None
        if getattr(config, "fuse_transformer", False):
            job.progress(Progress("quantize", 0, 1, message="fusing the transformer's ops"))
            fused = fuse_transformer(inlined(src, work), work / "fused.onnx")
        model = prepare_graph(work / "fused.onnx" if fused is not None else src, pre,
                              gemm_to_matmul=method_class.gemm_to_matmul)
        check_cancel(job.cancel)
        extra, calibration = setup(model) if setup is not None else ({}, dict(UNCALIBRATED))
        method = method_class(config, pre, model, work, **extra)
        sample = graph_feeds(model, job.calibration_inputs) if job.calibration_inputs else None
        method.always_float = raw_scale_nodes(model, method.candidates(), sample)

        def build(dst: Path, exclude: list[str], only: list[str] | None = None) -> Path:
            with quiet():
                try:
                    method.run(dst, [*exclude, *method.always_float], only)
                except Cancelled:
                    raise
                except Exception as exc:  # onnxruntime's quantizers raise bare ValueError/RuntimeError
                    raise CompressionError(
                        f"onnxruntime could not quantize {src.name} ({config.method}): {exc}") from exc
            return dst

        job.progress(Progress("quantize", 0, 1, message="quantizing"))
        build(out, [])
        check_cancel(job.cancel)
        job.progress(Progress("quantize", 1, 1))
        options = method.options if fused is None else {**method.options, "fused_ops": fused}
        common = {"options": options, "calibration": calibration}
        if job.evaluate is None:
            result = job.result(config.method, **common, message=f"quantized with {config.method}")
        else:
            scored = AccuracyAware(src, out, job.evaluate, job.higher_is_better, job.progress,
                                   lambda: check_cancel(job.cancel))
            result = job.result(config.method, **{**common, **scored.run(config, method, build, work)})
        return kept_for_scale(result, method.always_float)


def kept_for_scale(result: QuantizationResult, nodes: dict[str, float]) -> QuantizationResult:
    """``result`` saying which nodes stayed in float for their inputs' scales (`input_scales`)."""
    if nodes:
        result.fp32_nodes = [*nodes, *(n for n in result.fp32_nodes if n not in nodes)]
        span = max(nodes.values())
        result.message = (f"{len(nodes)} layer(s) reading the raw features kept in float ({', '.join(nodes)}): "
                          f"the features' scales span 1:{span:,.0f}, and int8 would round the small ones to 0; "
                          + (result.message or ""))
    return result


def check_cancel(cancel: CancelFn) -> None:
    if cancel():
        raise Cancelled("quantization cancelled")
