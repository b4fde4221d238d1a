"""Quantize an fp32 ONNX model for onnxruntime on CPU, optionally keeping sensitive layers in float.

One entry point, `quantize`, applies one method config of ``spec.quantization`` through the handler
registered for its class (`registry`):

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
* ``auto``: dynamic int8 for graphs fed token ids or with attention (ViT), static int8 for the rest.
* ``qat``: quantization-aware distillation of the float model the graph came from (``training``),
  then static int8 (`qat`).
* ``none``: a copy.

The CPU-specific choices (formats, signedness, ``reduce_range``) live in `cpu_choices` with the
measurements behind them; the accuracy-aware fallback (``max_metric_drop`` with an ``evaluate``
callback) in `accuracy`. The fallback costs one quantize-and-evaluate per candidate node plus one
per fallback step; static calibration runs once (its ranges are cached).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch

from ..errors import ModelFileError
from ..spec import QuantizationMethod
from ..types import ProgressFn, never_cancel, no_progress
from . import handlers, qat  # noqa: F401  (importing them registers their handlers)
from .registry import QuantizationResult, QuantizeJob, TrainingInputs, run_handler


def quantize(
    onnx_fp32: Path,
    out_path: Path,
    spec: QuantizationMethod,
    *,
    calibration_inputs: Mapping[str, np.ndarray | torch.Tensor] | None = None,
    evaluate: Callable[[Path], float] | None = None,
    higher_is_better: bool = True,
    progress: ProgressFn | None = None,
    cancel: Callable[[], bool] | None = None,
    seed: int = 0,
    training: TrainingInputs | None = None,
) -> QuantizationResult:
    """Quantize ``onnx_fp32`` into ``out_path`` as the method config ``spec`` says (module doc).

    ``calibration_inputs`` (static_int8, qat) are sampled down to the config's
    ``calibration_samples`` rows with ``seed``; ``evaluate(path)`` scores a model (accuracy, cosine,
    ...) for the accuracy-aware mode and the reported drop; ``training`` is what ``qat`` trains.
    """
    src = Path(onnx_fp32)
    if not src.is_file():
        raise ModelFileError(f"ONNX model {src} does not exist")
    job = QuantizeJob(src, Path(out_path), calibration_inputs, evaluate, higher_is_better,
                      progress or no_progress, cancel or never_cancel, seed, training)
    return run_handler(spec, job)
