"""One handler per quantization method, found by the method's config class.

A handler turns ``(config, job)`` into a `QuantizationResult`: ``job`` says what to quantize (the
fp32 ONNX graph, and for quantization-aware training the float model it was exported from, with the
teacher and the training data) and with what (calibration inputs, an evaluation for the
accuracy-aware fallback, progress and cancel). As torchao's ``quantize_(model, config)``: a new
method is a new config class in ``spec.quantization`` plus one function decorated with
``@register_quantize_handler(ThatConfig)``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from ..errors import SpecError
from ..measure.export import onnx_size_bytes
from ..spec import DistillSpec, QuantizationMethod
from ..types import (
    CancelFn,
    ProgressFn,
    Task,
    Teacher,
    TensorData,
    never_cancel,
    no_progress,
)


@dataclass
class QuantizationResult:
    """What a handler wrote and measured; ``to_dict()`` is the JSON form for reports."""

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
    tried: list[dict[str, Any]] = field(default_factory=list)
    """``auto`` in a single run: every int8 format measured (metric, size, p50) and which was chosen."""

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["path"] = str(self.path)
        out["sensitivity_path"] = None if self.sensitivity_path is None else str(self.sensitivity_path)
        return out


@dataclass
class TrainingInputs:
    """What quantization-aware training needs besides the fp32 graph: the float model it was exported
    from, the teacher to follow, the training data and the training options."""

    module: nn.Module
    teacher: Teacher
    train: TensorData
    distillation: DistillSpec
    task: Task
    sample: dict[str, torch.Tensor]
    """A few input rows, to export the fine-tuned model with."""
    workdir: Path
    """Where the fine-tuned float model's graph is written."""


@dataclass
class QuantizeJob:
    """What to quantize, where to, and with what."""

    onnx_fp32: Path
    out_path: Path
    calibration_inputs: Mapping[str, np.ndarray | torch.Tensor] | None = None
    evaluate: Callable[[Path], float] | None = None
    """Scores a graph (accuracy, cosine, ...): the accuracy-aware fallback and the reported drop."""
    higher_is_better: bool = True
    progress: ProgressFn = no_progress
    cancel: CancelFn = never_cancel
    seed: int = 0
    """Seeds the calibration sample."""
    training: TrainingInputs | None = None
    """For quantization-aware training only."""
    started: float = field(default_factory=time.perf_counter)

    def result(self, method: str, **fields: Any) -> QuantizationResult:
        """The result for the graph now at ``out_path``: sizes against the fp32 graph, seconds so far."""
        fp32_size, quant_size = onnx_size_bytes(self.onnx_fp32), onnx_size_bytes(self.out_path)
        return QuantizationResult(path=self.out_path, method=method, fp32_size=fp32_size, quant_size=quant_size,
                                  size_ratio=quant_size / fp32_size, seconds=time.perf_counter() - self.started,
                                  **fields)


Handler = Callable[[Any, QuantizeJob], QuantizationResult]
HandlerFn = TypeVar("HandlerFn", bound=Handler)
HANDLERS: dict[type, Handler] = {}
"""Config class -> its handler (filled by `register_quantize_handler`)."""


def register_quantize_handler(config_class: type) -> Callable[[HandlerFn], HandlerFn]:
    """Decorator: the function quantizes with ``config_class`` configs (one handler per class)."""

    def register(handler: HandlerFn) -> HandlerFn:
        if config_class in HANDLERS:
            raise ValueError(f"{config_class.__name__} already has a quantize handler")
        HANDLERS[config_class] = handler
        return handler

    return register


def quantize_handler(config: QuantizationMethod) -> Handler:
    """The handler registered for ``config``'s class."""
    try:
        return HANDLERS[type(config)]
    except KeyError:
        raise SpecError(f"quantization method {config.method!r} has no handler") from None


def run_handler(config: QuantizationMethod, job: QuantizeJob) -> QuantizationResult:
    return quantize_handler(config)(config, job)
