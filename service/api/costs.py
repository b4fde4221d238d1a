"""What a job would cost, estimated from its spec and its uploads' summaries before it is queued: a
job that could only die of its memory limit is refused now (422, naming the estimate and the
limit), not after a worker has spent minutes on it. (Any job still runs inside its limits,
`worker.confine`: these are the cases the summaries make certain.)"""

from __future__ import annotations

import math
from typing import Any

from worker.compression.spec import CompressSpec
from worker.compression.spec.sizes import (
    TEACHER_BATCH,
    TRAINING_BYTES_PER_PARAMETER,
    describe_bytes,
    hf_parameters,
    zoo_parameters,
)

from ..core.settings import Settings
from .problems import FieldError


def cost_errors(spec: CompressSpec, teacher: dict[str, Any], dataset: dict[str, Any],
                settings: Settings) -> list[FieldError]:  # fmt: skip
    limit = settings.job_memory_bytes
    errors: list[FieldError] = []
    student = spec.student
    try:
        if student is not None and student.kind == "zoo":
            params = zoo_parameters(student.architecture, teacher.get("input_shape"), teacher.get("output_dim"))
            pointer = "#/student/architecture"
        elif student is not None and student.kind == "hf_config":
            params, pointer = hf_parameters(student.hf_config), "#/student/hf_config"
        else:
            params, pointer = 0, ""
    except (ValueError, TypeError, OverflowError) as exc:
        return [FieldError(pointer="#/student", detail=f"the student's config cannot be sized: {exc}")]
    params = params or 0  # (an architecture `sizes` does not count: the job's memory cap still holds)
    need = params * TRAINING_BYTES_PER_PARAMETER
    if need > limit:
        errors.append(FieldError(pointer=pointer, detail=f"this student has about {params:,} parameters: training "
                                                         f"it needs about {describe_bytes(need)}, past a job's limit "
                                                         f"of {describe_bytes(limit)}"))  # fmt: skip
    shape = (dataset.get("inputs") or {}).get("x") or teacher.get("input_shape") or []
    samples = int(dataset.get("samples") or 0)
    data_bytes = samples * math.prod(shape) * 4 * 2  # (inputs as float32, and the split copies)
    if data_bytes > limit:
        errors.append(FieldError(pointer="#/dataset_id", detail=f"{samples:,} samples of shape {shape} take about "
                                                                f"{describe_bytes(data_bytes)} in memory, past a job's limit of "
                                                                f"{describe_bytes(limit)}"))  # fmt: skip
    largest = max(spec.evaluation.latency_batch_sizes)
    if spec.targets is not None:
        largest = max(largest, spec.targets.latency_batch_size)
    batch_bytes = largest * math.prod(shape) * 4 * 8  # (a batch through the biggest graph, with room for its layers)
    if batch_bytes > limit:
        errors.append(FieldError(pointer="#/evaluation/latency_batch_sizes",
                                 detail=f"a batch of {largest} takes about {describe_bytes(batch_bytes)} to time, past a job's "
                                        f"limit of {describe_bytes(limit)}"))  # fmt: skip
    activations = teacher.get("activation_bytes")
    if isinstance(activations, dict):  # an ONNX teacher's tensors, from shape inference at validation
        batch = max(spec.distillation.batch_size, TEACHER_BATCH)
        need = int(activations.get("fixed") or 0) + int(activations.get("per_sample") or 0) * batch
        if need > limit // 2:
            errors.append(FieldError(pointer="#/distillation/batch_size",
                                     detail=f"the teacher runs batches of {batch}, whose tensors take about "
                                            f"{describe_bytes(need)}, past half of a job's limit of "
                                            f"{describe_bytes(limit)}"))  # fmt: skip
    return errors
