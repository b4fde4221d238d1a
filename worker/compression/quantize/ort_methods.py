"""onnxruntime's post-training quantizers, one class per method family: each builds the quantized
graph with a given set of nodes kept in float (the accuracy-aware fallback) or only some quantized
(the sensitivity scan).

onnxruntime.quantization is imported inside the methods: its ``matmul_nbits_quantizer`` module
reconfigures the root logger on import (`matmul_nbits_quantizer` undoes that), and a job that does
not quantize never needs it. The CPU choices are read from `cpu_choices` when a quantizer is built,
so a benchmark can swap them (bench/quantize.py).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ..spec import DynamicInt8Config, Int4Config, StaticInt8Config, WeightOnlyInt8Config
from ..types import CancelFn
from . import cpu_choices
from .calibration import CalibrationReader
from .graph import (
    LARGE_MODEL_BYTES,
    float_graph_outputs,
    graph_batch,
    load_model,
    save_model,
    weight_nodes,
)

PostTrainingConfig = DynamicInt8Config | StaticInt8Config | WeightOnlyInt8Config | Int4Config
"""The methods onnxruntime's post-training quantizers apply."""


def matmul_nbits_quantizer() -> type:
    """onnxruntime's MatMulNBitsQuantizer, imported without keeping the ``logging.basicConfig(
    level=INFO)`` that its module runs on import (it would take over the process's root logger)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        MatMulNBitsQuantizer,  # resets the root logger
    )

    root.handlers[:] = handlers
    root.setLevel(level)
    return MatMulNBitsQuantizer


class OrtMethod:
    """Builds the quantized model for a given set of nodes kept in float."""

    op_types: set[str] = set()
    gemm_to_matmul = False

    def __init__(self, spec: PostTrainingConfig, pre: Path, model: onnx.ModelProto, work: Path) -> None:
        self.spec, self.pre, self.model, self.work = spec, pre, model, work
        self.large = model.ByteSize() > LARGE_MODEL_BYTES
        self.options: dict[str, Any] = {}
        self.always_float: dict[str, float] = {}
        """Nodes never quantized (``input_scales``: they read raw features of very different scales)."""

    def candidates(self) -> list[tuple[str, str]]:
        return [c for c in weight_nodes(self.model, self.op_types) if c[0] not in self.always_float]

    def run(self, dst: Path, exclude: list[str], only: list[str] | None) -> None:
        """Write the model quantized except ``exclude``; with ``only``, quantize just those nodes."""
        raise NotImplementedError


class DynamicMethod(OrtMethod):
    """quantize_dynamic: int8 weights, activation ranges computed at run time."""

    op_types = {"MatMul", "Gather", "LSTM", "Attention", "EmbedLayerNormalization"}
    gemm_to_matmul = True

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        choice = cpu_choices.CPU_CHOICES["dynamic"]
        self.options = {
            "function": "quantize_dynamic",
            "op_types_to_quantize": cpu_choices.DYNAMIC_OPS,
            "per_channel": self.spec.per_channel,
            "reduce_range": choice["reduce_range"],
            "weight_type": choice["weight_type"],
            # fused contrib ops (``fuse_transformer``) have no ONNX shape inference: their outputs are float
            "extra_options": {"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT},
        }

    def run(self, dst: Path, exclude: list[str], only: list[str] | None) -> None:
        from onnxruntime.quantization import (  # only when quantizing (module doc)
            QuantType,
            quantize_dynamic,
        )

        o = self.options
        quantize_dynamic(
            self.pre, dst, op_types_to_quantize=o["op_types_to_quantize"], per_channel=o["per_channel"],
            reduce_range=o["reduce_range"], weight_type=QuantType[o["weight_type"]], nodes_to_quantize=only,
            nodes_to_exclude=exclude, use_external_data_format=self.large, extra_options=o["extra_options"],
        )


class StaticMethod(OrtMethod):
    """quantize_static on a calibration sample; the ranges are cached for the sensitivity runs."""

    op_types = {"Conv", "ConvTranspose", "Gemm", "MatMul", "Gather"}

    def __init__(self, *args: Any, feeds: dict[str, np.ndarray], cancel: CancelFn) -> None:
        super().__init__(*args)
        from onnxruntime.quantization import (
            CalibrationMethod,  # only when quantizing (module doc)
        )

        choice = cpu_choices.CPU_CHOICES["static"]
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
            "op_types_to_quantize": cpu_choices.STATIC_OPS,
            "per_channel": self.spec.per_channel,
            "reduce_range": choice["reduce_range"],
            "activation_type": choice["activation_type"],
            "weight_type": choice["weight_type"],
            "calibrate_method": method.name,
            "extra_options": extra,
            "graph_outputs": "float (their QuantizeLinear/DequantizeLinear pair removed)",
        }

    def run(self, dst: Path, exclude: list[str], only: list[str] | None) -> None:
        from onnxruntime.quantization import (  # only when quantizing
            QuantFormat,
            QuantType,
            quantize_static,
        )

        o = self.options
        quantize_static(
            self.pre, dst, CalibrationReader(self.feeds, self.cancel, graph_batch(self.pre)),
            quant_format=QuantFormat[o["quant_format"]],
            op_types_to_quantize=o["op_types_to_quantize"], per_channel=o["per_channel"],
            reduce_range=o["reduce_range"], activation_type=QuantType[o["activation_type"]],
            weight_type=QuantType[o["weight_type"]], nodes_to_quantize=only,
            nodes_to_exclude=exclude, use_external_data_format=self.large,
            calibrate_method=self.method, extra_options=o["extra_options"], calibration_cache_path=self.cache,
        )
        save_model(float_graph_outputs(load_model(dst)), dst)


class WeightOnlyMethod(OrtMethod):
    """MatMulNBits (8 or 4 bits, blocks of ``block_size``) plus int8 / int4 embedding tables."""

    op_types = {"MatMul", "Gather"}
    gemm_to_matmul = True

    def __init__(self, *args: Any, bits: int) -> None:
        super().__init__(*args)
        self.bits = bits
        int4_gather = bits == 4 and any(op == "Gather" for _, op in self.candidates()) and self._to_opset_21()
        choice = cpu_choices.CPU_CHOICES["weight_only"]
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
        save_model(self.model, self.pre)
        return True

    def run(self, dst: Path, exclude: list[str], only: list[str] | None) -> None:
        from onnxruntime.quantization import (  # only when quantizing (module doc)
            QuantType,
            quantize_dynamic,
        )

        o = self.options
        if only is not None:  # MatMulNBitsQuantizer's nodes_to_include adds to its op types; exclude instead
            exclude = [*exclude, *(name for name, _ in self.candidates() if name not in only)]
        quantizer = matmul_nbits_quantizer()(
            load_model(self.pre), bits=self.bits, block_size=o["block_size"], is_symmetric=o["is_symmetric"],
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
