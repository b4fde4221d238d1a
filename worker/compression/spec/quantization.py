"""Quantization methods: one config class per method, holding only that method's fields, in a union
keyed by ``method`` (`QuantizationSpec`).

Each class has exactly one handler in the engine (``quantize.registry``: a registry keyed by the
config class, as torchao's ``quantize_(model, config)``); the fields every method with a
tolerance shares (``max_metric_drop``, ``drop_mode``) sit on `QuantizationConfig`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from .base import SpecModel


class QuantizationConfig(SpecModel):
    """What every quantizing method shares."""

    method: str
    """The method's name; each config class fixes it (the union's discriminator)."""
    backend: Literal["onnxruntime"] = "onnxruntime"
    """The runtime the quantized graph is for: onnxruntime on CPU (the only one)."""
    max_metric_drop: float | None = Field(default=None, ge=0, le=1e9)
    """Accuracy-aware mode: keep the costliest layers in float until the drop is within this."""
    drop_mode: Literal["absolute", "relative"] = "absolute"
    """``max_metric_drop`` in the metric's units, or as a fraction of the fp32 model's metric."""


class AutoQuantizationConfig(QuantizationConfig):
    """Dynamic int8 for transformers — token models, and graphs with attention (a ViT on images) — whose
    activations static calibration handles badly (MiniLM: cosine 0.81 static vs 0.99 dynamic; a ViT student:
    same accuracy, static larger and slower than dynamic), static int8 (its defaults) for everything else."""

    method: Literal["auto"] = "auto"


class NoQuantizationConfig(SpecModel):
    """No quantization: the fp32 ONNX graph is the result."""

    method: Literal["none"] = "none"


class DynamicInt8Config(QuantizationConfig):
    """int8 weights, activations quantized at run time (MatMul / Gemm, LSTM, attention, embeddings).
    Conv stays float: onnxruntime's ConvInteger has no fast CPU kernel (use ``static_int8``)."""

    method: Literal["dynamic_int8"] = "dynamic_int8"
    per_channel: bool = True
    """One weight scale per output channel (else one per tensor)."""
    fuse_transformer: bool = False
    """Fuse attention, skip LayerNorm, GELU and embedding LayerNorm with onnxruntime's transformer
    optimizer before quantizing (BERT- and ViT-style graphs; others are left as they are). ``auto``
    measures both ways on a transformer and keeps the faster: on an AVX2 CPU without VNNI it was the
    slower one."""


class StaticInt8Config(QuantizationConfig):
    """int8 weights and activations, activation ranges calibrated on a sample of the training data."""

    method: Literal["static_int8"] = "static_int8"
    calibration: Literal["minmax", "percentile", "entropy"] = "percentile"
    percentile: float = Field(default=99.99, gt=90, le=100)
    """The activation percentile kept by ``percentile`` calibration."""
    calibration_samples: int = Field(default=256, ge=1, le=100_000)
    per_channel: bool = True
    """One weight scale per output channel (else one per tensor)."""


class WeightOnlyInt8Config(QuantizationConfig):
    """int8 MatMul weights in blocks (onnxruntime ``MatMulNBits``) and int8 embedding tables;
    activations stay float."""

    method: Literal["weight_only_int8"] = "weight_only_int8"
    block_size: Literal[16, 32, 64, 128, 256] = 32
    """Weights per quantization block."""


class Int4Config(QuantizationConfig):
    """int4 MatMul weights in blocks (``MatMulNBits``) and int4 embedding tables where the graph
    allows; activations stay float."""

    method: Literal["int4"] = "int4"
    block_size: Literal[16, 32, 64, 128, 256] = 32
    """Weights per quantization block."""


class QatConfig(QuantizationConfig):
    """Quantization-aware distillation: the trained student is fine-tuned for ``qat_epochs`` under
    simulated int8 with the teacher as target, then quantized with static int8 on the grid it trained
    on (min-max calibration, ``calibration_samples``, ``per_channel``). Needs a student."""

    method: Literal["qat"] = "qat"
    qat_epochs: int = Field(default=3, ge=1, le=1000)
    calibration_samples: int = Field(default=256, ge=1, le=100_000)
    per_channel: bool = True

    def static(self) -> StaticInt8Config:
        """The static int8 step that follows the training."""
        return StaticInt8Config(calibration="minmax", calibration_samples=self.calibration_samples,
                                per_channel=self.per_channel, max_metric_drop=self.max_metric_drop,
                                drop_mode=self.drop_mode)


QuantizationMethod = (AutoQuantizationConfig | NoQuantizationConfig | DynamicInt8Config | StaticInt8Config
                      | WeightOnlyInt8Config | Int4Config | QatConfig)
QuantizationSpec = Annotated[QuantizationMethod, Field(discriminator="method")]
"""How to quantize the (student or teacher) model for deployment: one of the method configs, by ``method``."""
