"""Which queue a job goes to: ``gpu`` for ``device: cuda``, and for ``device: auto`` when the job is
big enough to be worth a GPU (``KDQ_GPU_AUTO_MIN_WORK``: teacher parameters x training samples x
epochs, a proxy for its training FLOPs); everything else to ``cpu``. A worker consuming ``gpu``
refuses to start without CUDA (`worker.gpu`), so a job routed there never runs on a CPU by mistake."""

from __future__ import annotations

from typing import Any

from .settings import Settings


def training_work(spec: Any, teacher_summary: dict[str, Any], dataset_summary: dict[str, Any]) -> float:
    """Teacher parameters x training samples x epochs (0 when a summary lacks them)."""
    params = teacher_summary.get("num_parameters") or 0
    samples = dataset_summary.get("samples") or 0
    epochs = getattr(spec.distillation, "epochs", 1) or 1
    return float(params) * float(samples) * float(epochs)


def job_queue(settings: Settings, spec: Any, teacher_summary: dict[str, Any] | None,
              dataset_summary: dict[str, Any] | None) -> str:  # fmt: skip
    device = getattr(spec.distillation, "device", "auto")
    if device == "cuda":
        return settings.queue_gpu
    if device == "auto" and settings.gpu_auto_min_work is not None:
        if training_work(spec, teacher_summary or {}, dataset_summary or {}) >= settings.gpu_auto_min_work:
            return settings.queue_gpu
    return settings.queue_cpu
