"""Quantize an fp32 ONNX model with onnxruntime, optionally keeping sensitive layers in float.

One entry point, `quantize`, applies a `QuantizationSpec`:

* ``dynamic_int8``: int8 weights, activations quantized at run time (MatMul / Gemm, LSTM,
  fused Attention, Gather embeddings). Conv is left in float: ORT's ConvInteger has no fast CPU
  kernel, use ``static_int8`` for conv nets.
* ``static_int8``: weights and activations int8 with ranges calibrated on a data sample (min-max,
  percentile or entropy), per-channel weights, written as a QDQ graph that onnxruntime fuses.
  The graph outputs stay float (no requantized logits or embeddings). For transformers
  prefer ``dynamic_int8``: static per-tensor activations lose too much there (bench: MiniLM cosine
  0.81 static vs 0.991 dynamic).
* ``weight_only_int8`` / ``int4``: MatMul weights in blocks of ``block_size`` as onnxruntime
  ``MatMulNBits`` (8 or 4 bits); embedding tables (Gather) as int8 + DequantizeLinear, or as
  int4 ``GatherBlockQuantized``. Activations stay float in the graph.
* ``none``: a copy.

The CPU-specific choices (formats, signedness, ``reduce_range``) live in `CPU_CHOICES` below with
the measurements behind them.

Accuracy-aware mode (``spec.max_metric_drop`` with an ``evaluate`` callback): when the fully
quantized model loses more than the tolerance, every weight-bearing node is scored by the metric
of the model in which *only that node* is quantized (``cost`` = metric lost against fp32). The
table is written next to the output as ``<name>.sensitivity.csv``; nodes are then kept in float,
costliest first, until the drop is within tolerance. This costs one quantize-and-evaluate per
candidate node plus one per fallback step; static calibration runs once (its ranges are cached).
Quantizing one node alone, rather than keeping one node alone in float, is what finds a broken
tensor shared by two nodes: a QDQ graph quantizes it on both sides (the producer's output and the
consumer's input), so keeping either one in float recovers nothing and both would score zero.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from ..errors import Cancelled, CompressionError, InputError, ModelFileError, SpecError
from ..measure.export import onnx_size_bytes
from ..spec import QuantizationSpec
from ..types import CancelFn, Progress, ProgressFn, never_cancel, no_progress

# --- CPU choices -----------------------------------------------------------------------
# Measured on this project's CPU (AMD EPYC, AVX2, no VNNI), onnxruntime 1.32, 1 thread, by
# bench/quantize.py (section "CPU choices"; latency = int8 p50 / fp32 p50, ranges over two runs on
# this shared machine). Without VNNI, MLAS multiplies u8 activations by s8 weights with VPMADDUBSW,
# whose int16 pair sums saturate; 7-bit weights (reduce_range) avoid that at no cost in speed,
# u8 weights (the u8u8 kernel) avoid it too but run slower.
# * static, QDQ u8 activations / s8 weights / reduce_range: digits-MLP logits off by 0.3-0.4 %
#   (mean relative error), random ResNet at 0.54-0.62× fp32 (batch 1 and 16). Full-range s8
#   weights: 4.9-5.0 % error (saturation) at the same speed; s8 activations (s8s8): the same error
#   and 1.06-1.25× (slower than fp32); u8u8: 0.3 % but 0.78-0.91×; QOperator instead of QDQ:
#   0.57-0.72× on the ResNet. Per-channel weights (spec default) cost small-batch Gemm time: the
#   digits MLP ran 0.69× at batch 1 against 0.53× per-tensor (≈ onnxruntime's default, 0.55×).
# * dynamic, s8 weights with reduce_range: MLP error 0.3-0.4 % vs 4.8-5.0 % full range, same speed;
#   u8 weights 0.2 % but 0.88-0.91× / 0.80-0.82× (batch 1 / 64) against 0.78-0.80× / 0.66-0.72×.
#   On all-MiniLM-L6-v2 (18-token sentences) reduce_range left the cosine at 0.991 and s8 ran 0.80×
#   against u8's 0.87×.
# A rerun on 2026-11-29 (less load) kept the same ranking with lower ratios: static QDQ u8s8
# reduce_range ResNet 0.33× (b1 and b16), digits MLP 0.69× / 0.34× (b1 / b64); s8s8 0.93× and
# u8u8 0.84× on the ResNet; dynamic s8 reduce_range 0.65× / 0.36× against u8u8's 0.76× / 0.80×.
CPU_CHOICES: dict[str, dict[str, Any]] = {
    "dynamic": {"weight_type": "QInt8", "reduce_range": True},
    "static": {"quant_format": "QDQ", "activation_type": "QUInt8", "weight_type": "QInt8",
               "reduce_range": True},
    "weight_only": {"accuracy_level": 4, "is_symmetric": True},
}
"""``accuracy_level`` 4 lets MatMulNBits compute with int8 activations: at batch 1 it ran a
384×1536 MatMul at 0.42× (int4) / 0.58× (int8) of fp32, against 1.6× / 28× with level 0."""

DYNAMIC_OPS = ["MatMul", "Attention", "LSTM", "Gather", "EmbedLayerNormalization"]
STATIC_OPS = [
    "Conv", "ConvTranspose", "Gemm", "MatMul", "Gather", "Relu", "Clip", "MaxPool", "AveragePool",
    "GlobalAveragePool", "Concat", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze",
    "Resize", "Pad", "Split", "Slice",
]
"""Static QDQ op types. Left out on purpose: Add, Mul, Div, Where, Softmax, LayerNormalization,
Sigmoid: in transformers they carry the attention mask (≈ -3.4e38, which also breaks the histogram
calibrators) and the residual stream's outlier channels. Leaving Add out cost ResNet nothing
measurable: onnxruntime still fuses its residual adds into QLinearAdd (bench, CPU choices)."""
CALIBRATION_BATCH = 32
_LARGE_MODEL_BYTES = 1_500_000_000


@dataclass
class QuantizationResult:
    """What `quantize` wrote and measured; ``to_dict()`` is the JSON form for reports."""

    path: Path
    method: str
    options: dict[str, Any]
    """The exact onnxruntime options used."""
    fp32_size: int
    quant_size: int
    size_ratio: float
    metric_fp32: float | None = None
    metric_quant: float | None = None
    drop: float | None = None
    """Metric lost (positive = worse), in the metric's own units."""
    tolerance: float | None = None
    """The allowed drop in the metric's units (relative tolerances already multiplied out)."""
    met: bool | None = None
    fp32_nodes: list[str] = field(default_factory=list)
    sensitivity: list[dict[str, Any]] = field(default_factory=list)
    sensitivity_path: Path | None = None
    calibration: dict[str, Any] | None = None
    seconds: float = 0.0
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["path"] = str(self.path)
        out["sensitivity_path"] = None if self.sensitivity_path is None else str(self.sensitivity_path)
        return out


def calibration_sample(
    inputs: Mapping[str, torch.Tensor | np.ndarray], n: int, seed: int
) -> tuple[dict[str, np.ndarray], list[int]]:
    """A seeded random subset of ``n`` rows (all rows when there are fewer), with their indices."""
    if not inputs:
        raise InputError("calibration needs at least one input array")
    arrays = {k: v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
              for k, v in inputs.items()}
    sizes = {k: a.shape[0] for k, a in arrays.items()}
    if len(set(sizes.values())) != 1:
        raise InputError(f"calibration inputs have different row counts: {sizes}")
    total = next(iter(sizes.values()))
    if total == 0:
        raise InputError("calibration inputs are empty")
    ids = sorted(np.random.default_rng(seed).permutation(total)[: min(n, total)].tolist())
    return {k: a[ids] for k, a in arrays.items()}, ids


# --- helpers ---------------------------------------------------------------------------

@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """onnxruntime's quantizers log hundreds of harmless warnings on the root logger (int64 shape
    tensors they skip), numpy divide warnings and calibrator prints; keep them out of the worker's log."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


def _load(path: Path) -> onnx.ModelProto:
    try:
        return onnx.load(str(path))
    except Exception as exc:  # protobuf DecodeError and friends
        raise ModelFileError(f"{path.name} is not a readable ONNX model: {exc}") from exc


def _save(model: onnx.ModelProto, path: Path) -> None:
    large = model.ByteSize() > _LARGE_MODEL_BYTES
    onnx.save_model(model, str(path), save_as_external_data=large,
                    location=path.name + ".data" if large else None)


def _np_dtype(value_info: onnx.ValueInfoProto) -> np.dtype:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(value_info.type.tensor_type.elem_type))


def _feeds(model: onnx.ModelProto, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The graph's inputs from ``inputs`` in the graph's dtypes; extra keys are ignored."""
    initializers = {t.name for t in model.graph.initializer}
    graph_inputs = [i for i in model.graph.input if i.name not in initializers]
    missing = [i.name for i in graph_inputs if i.name not in inputs]
    if missing:
        raise InputError(f"calibration data lacks model inputs {missing}; it has {sorted(inputs)}")
    return {i.name: np.asarray(inputs[i.name]).astype(_np_dtype(i), copy=False) for i in graph_inputs}


def _prepare(src: Path, dst: Path, *, gemm_to_matmul: bool) -> onnx.ModelProto:
    """quant_pre_process (ORT basic graph optimisation: constant folding, Conv+BN fusion; then
    ONNX shape inference), and for dynamic / weight-only methods Gemm -> MatMul + Add so that
    linear layers on 2-D inputs are quantized under their own node names.

    Symbolic shape inference is skipped: it fails on transformers' BERT exports and then writes
    a temp file into the working directory; ONNX shape inference suffices for our exports.
    """
    from onnxruntime.quantization.onnx_model import ONNXModel
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with _quiet():
        try:
            quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
        except Exception as exc:  # onnx / onnxruntime raise many types for a bad graph
            raise ModelFileError(f"cannot prepare {src.name} for quantization: {exc}") from exc
    model = onnx.load(str(dst))
    if gemm_to_matmul and any(n.op_type == "Gemm" for n in model.graph.node):
        wrapped = ONNXModel(model)
        wrapped.replace_gemm_with_matmul()
        model = onnx.shape_inference.infer_shapes(wrapped.model)
        _save(model, dst)
    return model


def _weight_nodes(model: onnx.ModelProto, op_types: set[str]) -> list[tuple[str, str]]:
    """(name, op_type) of nodes of ``op_types`` that read a float initializer (their weights)."""
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}
    weights = {t.name for t in model.graph.initializer if t.data_type in floats}
    out = []
    for node in model.graph.node:
        if node.op_type in op_types and node.name and any(i in weights for i in node.input):
            if node.op_type == "Gather" and node.input[0] not in weights:
                continue  # Gather over a computed tensor (shapes), not an embedding table
            out.append((node.name, node.op_type))
    return out


def _float_graph_outputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop the QuantizeLinear -> DequantizeLinear pair a QDQ graph puts on each graph output, so
    logits, regression values and embeddings keep float precision (onnxruntime then runs the last
    Gemm / MatMul with a float output); it also ran the digits MLP slightly faster."""
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    boundary = {v.name for v in (*graph.input, *graph.output)} | {t.name for t in graph.initializer}
    for output in graph.output:
        dq = producer.get(output.name)
        q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        if q is None or q.op_type != "QuantizeLinear" or len(readers.get(q.output[0], [])) != 1:
            continue
        source = q.input[0]
        if source in boundary or source not in producer:
            continue
        for node in readers.get(source, []):
            node.input[:] = [output.name if i == source else i for i in node.input]
        src_node = producer[source]
        src_node.output[:] = [output.name if o == source else o for o in src_node.output]
        graph.node.remove(q)
        graph.node.remove(dq)
        used = {i for node in graph.node for i in node.input}
        for init in [t for t in graph.initializer if t.name in {*q.input[1:], *dq.input[1:]} - used]:
            graph.initializer.remove(init)  # the pair's scale and zero point
    return model


def _matmul_nbits_quantizer() -> type:
    """onnxruntime's MatMulNBitsQuantizer, imported without keeping the ``logging.basicConfig(
    level=INFO)`` that its module runs on import (it would take over the process's root logger)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    root.handlers[:] = handlers
    root.setLevel(level)
    return MatMulNBitsQuantizer


class _Reader:
    """onnxruntime CalibrationDataReader over in-memory arrays, in equal batches (the histogram
    calibrators stack batch outputs and fail on a short last batch): the largest size ≤ 32 that
    divides the sample count."""

    def __init__(self, feeds: dict[str, np.ndarray], cancel: CancelFn) -> None:
        n = next(iter(feeds.values())).shape[0]
        size = max(b for b in range(1, min(CALIBRATION_BATCH, n) + 1) if n % b == 0)
        self._batches = iter([{k: v[i : i + size] for k, v in feeds.items()} for i in range(0, n, size)])
        self._cancel = cancel

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._cancel():
            raise Cancelled("quantization cancelled during calibration")
        return next(self._batches, None)


# --- one quantizer per method ------------------------------------------------------------

class _Method:
    """Builds the quantized model for a given set of nodes kept in float."""

    op_types: set[str] = set()
    gemm_to_matmul = False

    def __init__(self, spec: QuantizationSpec, pre: Path, model: onnx.ModelProto, work: Path) -> None:
        self.spec, self.pre, self.model, self.work = spec, pre, model, work
        self.large = model.ByteSize() > _LARGE_MODEL_BYTES
        self.options: dict[str, Any] = {}

    def candidates(self) -> list[tuple[str, str]]:
        return _weight_nodes(self.model, self.op_types)

    def run(self, dst: Path, exclude: list[str], only: list[str] | None) -> None:
        """Write the model quantized except ``exclude``; with ``only``, quantize just those nodes."""
        raise NotImplementedError


class _Dynamic(_Method):
    """quantize_dynamic: int8 weights, activation ranges computed at run time."""

    op_types = {"MatMul", "Gather", "LSTM", "Attention", "EmbedLayerNormalization"}
    gemm_to_matmul = True

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        choice = CPU_CHOICES["dynamic"]
        self.options = {
            "function": "quantize_dynamic",
            "op_types_to_quantize": DYNAMIC_OPS,
            "per_channel": self.spec.per_channel,
            "reduce_range": choice["reduce_range"],
            "weight_type": choice["weight_type"],
            "extra_options": {"MatMulConstBOnly": True},
        }

    def run(self, dst: Path, exclude: list[str], only: list[str] | None) -> None:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        o = self.options
        quantize_dynamic(
            self.pre, dst, op_types_to_quantize=o["op_types_to_quantize"], per_channel=o["per_channel"],
            reduce_range=o["reduce_range"], weight_type=QuantType[o["weight_type"]], nodes_to_quantize=only,
            nodes_to_exclude=exclude, use_external_data_format=self.large, extra_options=o["extra_options"],
        )


class _Static(_Method):
    """quantize_static on a calibration sample; the ranges are cached for the sensitivity runs."""

    op_types = {"Conv", "ConvTranspose", "Gemm", "MatMul", "Gather"}

    def __init__(self, *args: Any, feeds: dict[str, np.ndarray], cancel: CancelFn) -> None:
        super().__init__(*args)
        from onnxruntime.quantization import CalibrationMethod

        choice = CPU_CHOICES["static"]
        method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                  "entropy": CalibrationMethod.Entropy}[self.spec.calibration]
        extra: dict[str, Any] = {"MatMulConstBOnly": True}
        if self.spec.calibration == "percentile":
            extra.update(CalibPercentile=self.spec.percentile, CalibTensorRangeSymmetric=False)
        self.method = method
        self.feeds, self.cancel = feeds, cancel
        self.cache = self.work / "calibration.json"
        self.options = {
            "function": "quantize_static",
            "quant_format": choice["quant_format"],
            "op_types_to_quantize": STATIC_OPS,
            "per_channel": self.spec.per_channel,
            "reduce_range": choice["reduce_range"],
            "activation_type": choice["activation_type"],
            "weight_type": choice["weight_type"],
            "calibrate_method": method.name,
            "extra_options": extra,
            "graph_outputs": "float (their QuantizeLinear/DequantizeLinear pair removed)",
        }

    def run(self, dst: Path, exclude: list[str], only: list[str] | None) -> None:
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

        o = self.options
        quantize_static(
            self.pre, dst, _Reader(self.feeds, self.cancel), quant_format=QuantFormat[o["quant_format"]],
            op_types_to_quantize=o["op_types_to_quantize"], per_channel=o["per_channel"],
            reduce_range=o["reduce_range"], activation_type=QuantType[o["activation_type"]],
            weight_type=QuantType[o["weight_type"]], nodes_to_quantize=only,
            nodes_to_exclude=exclude, use_external_data_format=self.large,
            calibrate_method=self.method, extra_options=o["extra_options"], calibration_cache_path=self.cache,
        )
        _save(_float_graph_outputs(_load(dst)), dst)


class _WeightOnly(_Method):
    """MatMulNBits (8 or 4 bits, blocks of ``block_size``) plus int8 / int4 embedding tables."""

    op_types = {"MatMul", "Gather"}
    gemm_to_matmul = True

    def __init__(self, *args: Any, bits: int) -> None:
        super().__init__(*args)
        self.bits = bits
        int4_gather = bits == 4 and any(op == "Gather" for _, op in self.candidates()) and self._to_opset_21()
        choice = CPU_CHOICES["weight_only"]
        self.options = {
            "function": "MatMulNBitsQuantizer",
            "bits": bits,
            "block_size": self.spec.block_size,
            "is_symmetric": choice["is_symmetric"],
            "accuracy_level": choice["accuracy_level"],
            "op_types_to_quantize": ["MatMul", "Gather"] if int4_gather else ["MatMul"],
            "embedding_tables": ("GatherBlockQuantized int4" if int4_gather else
                                 "quantize_dynamic Gather int8 + DequantizeLinear" if bits == 8 else "float"),
        }

    def _to_opset_21(self) -> bool:
        """int4 Gather needs opset 21: convert the graph properly (the quantizer would only relabel
        it, which breaks ops whose signature changed, e.g. ReduceL2). False when that fails: then
        the embedding tables stay float."""
        opset = next((o.version for o in self.model.opset_import if o.domain in ("", "ai.onnx")), 21)
        if opset >= 21:
            return True
        try:
            self.model = onnx.version_converter.convert_version(self.model, 21)
        except Exception:  # the converter raises bare RuntimeErrors for ops it cannot adapt
            return False
        _save(self.model, self.pre)
        return True

    def run(self, dst: Path, exclude: list[str], only: list[str] | None) -> None:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        o = self.options
        if only is not None:  # MatMulNBitsQuantizer's nodes_to_include adds to its op types; exclude instead
            exclude = [*exclude, *(name for name, _ in self.candidates() if name not in only)]
        quantizer = _matmul_nbits_quantizer()(
            _load(self.pre), bits=self.bits, block_size=o["block_size"], is_symmetric=o["is_symmetric"],
            accuracy_level=o["accuracy_level"], nodes_to_exclude=exclude,
            op_types_to_quantize=tuple(o["op_types_to_quantize"]),
        )
        quantizer.process()
        if self.bits == 4:
            quantizer.model.save_model_to_file(str(dst), self.large)
            return
        stage = self.work / "nbits.onnx"
        quantizer.model.save_model_to_file(str(stage), self.large)
        quantize_dynamic(stage, dst, op_types_to_quantize=["Gather"], weight_type=QuantType.QInt8,
                         nodes_to_exclude=exclude, use_external_data_format=self.large,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})


# --- the entry point -------------------------------------------------------------------

def resolve_method(spec: QuantizationSpec, onnx_fp32: Path) -> QuantizationSpec:
    """Turn ``auto`` into a concrete method: dynamic int8 for graphs fed token ids (transformers,
    whose attention activations static calibration handles badly), static int8 for the rest."""
    if spec.method != "auto":
        return spec
    graph = onnx.load(str(onnx_fp32), load_external_data=False).graph
    tokens = any(i.type.tensor_type.elem_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32)
                 for i in graph.input)
    return spec.model_copy(update={"method": "dynamic_int8" if tokens else "static_int8"})


def _check_spec(spec: QuantizationSpec, evaluate: Callable[[Path], float] | None,
                calibration_inputs: Mapping[str, np.ndarray] | None) -> None:
    if spec.method == "qat":
        raise SpecError("quantization method 'qat' trains in torch; it is not an onnxruntime "
                        "post-training method")
    if spec.backend != "onnxruntime":
        raise SpecError(f"quantization backend {spec.backend!r} supports only 'qat'; use 'onnxruntime'")
    if spec.method == "static_int8" and not calibration_inputs:
        raise InputError("static_int8 quantization needs calibration data")
    if spec.max_metric_drop is not None and evaluate is None and spec.method != "none":
        raise SpecError("max_metric_drop needs an evaluation (labelled data or a teacher to compare with)")


def _copy(src: Path, dst: Path) -> None:
    model = onnx.load(str(src), load_external_data=False)
    if any(onnx.external_data_helper.uses_external_data(t) for t in model.graph.initializer):
        _save(_load(src), dst)
    else:
        shutil.copyfile(src, dst)


def quantize(
    onnx_fp32: Path,
    out_path: Path,
    spec: QuantizationSpec,
    *,
    calibration_inputs: Mapping[str, np.ndarray | torch.Tensor] | None = None,
    evaluate: Callable[[Path], float] | None = None,
    higher_is_better: bool = True,
    progress: ProgressFn | None = None,
    cancel: CancelFn | None = None,
    seed: int = 0,
) -> QuantizationResult:
    """Quantize ``onnx_fp32`` into ``out_path`` as ``spec`` says; see the module docstring.

    ``calibration_inputs`` (static_int8) are sampled down to ``spec.calibration_samples`` rows with
    ``seed``; ``evaluate(path)`` scores a model (accuracy, cosine, ...) for accuracy-aware mode.
    """
    started = time.perf_counter()
    progress = progress or no_progress
    cancel = cancel or never_cancel
    src, out_path = Path(onnx_fp32), Path(out_path)
    if not src.is_file():
        raise ModelFileError(f"ONNX model {src} does not exist")
    spec = resolve_method(spec, Path(onnx_fp32))
    _check_spec(spec, evaluate, calibration_inputs)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fp32_size = onnx_size_bytes(src)

    def finish(**fields: Any) -> QuantizationResult:
        quant_size = onnx_size_bytes(out_path)
        return QuantizationResult(
            path=out_path, method=spec.method, fp32_size=fp32_size, quant_size=quant_size,
            size_ratio=quant_size / fp32_size, seconds=time.perf_counter() - started, **fields,
        )

    calibration: dict[str, Any] = {"method": None, "samples": 0, "sample_ids": []}  # uncalibrated methods
    if spec.method == "none":
        _copy(src, out_path)
        metric = None if evaluate is None else float(evaluate(out_path))
        return finish(options={}, calibration=calibration, metric_fp32=metric, metric_quant=metric,
                      drop=None if metric is None else 0.0, message="not quantized (method 'none')")

    with tempfile.TemporaryDirectory(prefix="kdq-quant-", dir=out_path.parent) as tmp:
        work = Path(tmp)
        progress(Progress("quantize", 0, 1, message="preparing the graph"))
        method_cls = {"dynamic_int8": _Dynamic, "static_int8": _Static,
                      "weight_only_int8": _WeightOnly, "int4": _WeightOnly}[spec.method]
        pre = work / "prepared.onnx"
        model = _prepare(src, pre, gemm_to_matmul=method_cls.gemm_to_matmul)
        _check_cancel(cancel)
        if spec.method == "static_int8":
            assert calibration_inputs is not None
            sample, ids = calibration_sample(calibration_inputs, spec.calibration_samples, seed)
            method: _Method = _Static(spec, pre, model, work, feeds=_feeds(model, sample), cancel=cancel)
            calibration = {"method": spec.calibration, "samples": len(ids), "sample_ids": ids}
        elif spec.method in ("weight_only_int8", "int4"):
            method = _WeightOnly(spec, pre, model, work, bits=4 if spec.method == "int4" else 8)
        else:
            method = _Dynamic(spec, pre, model, work)

        def build(dst: Path, exclude: list[str], only: list[str] | None = None) -> Path:
            with _quiet():
                try:
                    method.run(dst, exclude, only)
                except Cancelled:
                    raise
                except Exception as exc:  # onnxruntime's quantizers raise bare ValueError/RuntimeError
                    raise CompressionError(
                        f"onnxruntime could not quantize {src.name} ({spec.method}): {exc}") from exc
            return dst

        progress(Progress("quantize", 0, 1, message="quantizing"))
        build(out_path, [])
        _check_cancel(cancel)
        progress(Progress("quantize", 1, 1))
        common = {"options": method.options, "calibration": calibration}
        if evaluate is None:
            return finish(**common, message=f"quantized with {spec.method}")
        scored = _Scored(src, out_path, evaluate, higher_is_better, progress, lambda: _check_cancel(cancel))
        return finish(**{**common, **scored.run(spec, method, build, work)})


def _check_cancel(cancel: CancelFn) -> None:
    if cancel():
        raise Cancelled("quantization cancelled")


@dataclass
class _Scored:
    """Accuracy-aware quantization around an already written, fully quantized ``out``."""

    src: Path
    out: Path
    evaluate: Callable[[Path], float]
    higher_is_better: bool
    progress: ProgressFn
    check_cancel: Callable[[], None]

    def drop(self, metric_fp32: float, metric: float) -> float:
        """Metric lost against fp32, positive = worse, whichever way the metric points."""
        return (metric_fp32 - metric) if self.higher_is_better else (metric - metric_fp32)

    def run(self, spec: QuantizationSpec, method: _Method, build: Callable[..., Path],
            work: Path) -> dict[str, Any]:
        """The result fields: metrics, drop, tolerance, met, sensitivity, fp32 nodes and a message."""
        metric_fp32 = float(self.evaluate(self.src))
        metric_quant = float(self.evaluate(self.out))
        drop = self.drop(metric_fp32, metric_quant)
        fields: dict[str, Any] = {"metric_fp32": metric_fp32, "metric_quant": metric_quant, "drop": drop}
        if spec.max_metric_drop is None:
            return {**fields, "message": (f"quantized with {spec.method}; metric {metric_fp32:.4g} -> "
                                          f"{metric_quant:.4g}")}
        tolerance = spec.max_metric_drop * (abs(metric_fp32) if spec.drop_mode == "relative" else 1.0)
        fields["tolerance"] = tolerance
        if drop <= tolerance:
            return {**fields, "met": True,
                    "message": f"drop {drop:.4g} is within the tolerance {tolerance:.4g}"}

        table = self.sensitivity(method, build, work, metric_fp32)
        fields["sensitivity"] = table
        fields["sensitivity_path"] = self.out.with_name(self.out.stem + ".sensitivity.csv")
        _write_table(table, fields["sensitivity_path"])
        for k in range(1, len(table) + 1):  # keep the costliest nodes in float, one more each time
            self.check_cancel()
            kept = [r["node"] for r in table[:k]]
            metric = float(self.evaluate(build(work / "fallback.onnx", kept)))
            self.progress(Progress("fallback", k, len(table), metric=metric, message=f"{k} node(s) in float"))
            if self.drop(metric_fp32, metric) <= tolerance:
                _copy(work / "fallback.onnx", self.out)
                return {**fields, "metric_quant": metric, "drop": self.drop(metric_fp32, metric), "met": True,
                        "fp32_nodes": kept,
                        "message": (f"drop {self.drop(metric_fp32, metric):.4g} within {tolerance:.4g} with "
                                    f"{k} node(s) kept in float: {', '.join(kept)} (fully quantized drop was "
                                    f"{drop:.4g})")}
        costs = ", ".join(f"{r['node']} ({r['op_type']}): {r['cost']:+.4g}" for r in table)
        return {**fields, "met": False,
                "message": (f"cannot meet max_metric_drop {spec.max_metric_drop} ({spec.drop_mode}; "
                            f"{tolerance:.4g} in metric units): keeping 1 to all {len(table)} quantizable "
                            f"nodes in float, costliest first, never brought the drop within it. "
                            f"{self.out.name} is the fully quantized model (drop {drop:.4g}). Metric lost by "
                            f"quantizing each node alone: {costs or 'no quantizable nodes'}")}

    def sensitivity(self, method: _Method, build: Callable[..., Path], work: Path,
                    metric_fp32: float) -> list[dict[str, Any]]:
        """For each weight-bearing node: the metric with only that node quantized; costliest first."""
        nodes = method.candidates()
        rows = []
        for i, (name, op_type) in enumerate(nodes):
            self.check_cancel()
            metric = float(self.evaluate(build(work / "sensitivity.onnx", [], [name])))
            rows.append({"node": name, "op_type": op_type, "metric_when_quantized": metric,
                         "cost": self.drop(metric_fp32, metric)})
            self.progress(Progress("sensitivity", i + 1, len(nodes), metric=metric, message=name))
        return sorted(rows, key=lambda r: -r["cost"])


def _write_table(rows: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["node", "op_type", "metric_when_quantized", "cost"])
        writer.writeheader()
        writer.writerows(rows)
