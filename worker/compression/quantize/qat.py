"""The ``qat`` handler: quantization-aware distillation of the float model (``distill.qat``), its
export, then static int8 on the grid it trained on (min-max calibration, `QatConfig.static`)."""

from __future__ import annotations

from dataclasses import replace

from ..distill.qat import qat_distill
from ..errors import SpecError
from ..measure.export import export_onnx
from ..spec import QatConfig
from .registry import (
    QuantizationResult,
    QuantizeJob,
    register_quantize_handler,
    run_handler,
)


@register_quantize_handler(QatConfig)
def quantize_qat(config: QatConfig, job: QuantizeJob) -> QuantizationResult:
    training = job.training
    if training is None:
        raise SpecError("quantization method 'qat' fine-tunes the float model against the teacher under "
                        "simulated int8: it needs the student, the teacher and the training data (compress() "
                        "and the search give them), not only an ONNX graph")
    tuned = qat_distill(training.module, training.teacher, training.train, config, training.distillation,
                        progress=job.progress, cancel=job.cancel, task=training.task)
    float_path = export_onnx(tuned, training.sample, training.workdir / f"{job.out_path.stem}.qat_float.onnx",
                             task=training.task)
    result = run_handler(config.static(), replace(job, onnx_fp32=float_path, training=None))
    result.method = "qat"
    result.options = {**result.options, "qat_epochs": config.qat_epochs, "then": "static_int8, min-max calibration"}
    result.message = f"quantization-aware distillation ({config.qat_epochs} epoch(s)), then {result.message}"
    return result
