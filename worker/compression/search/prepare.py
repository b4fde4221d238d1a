"""The search's first two phases: the teacher, measured once (its metric resolves the goal, its
outputs on the training split are cached for every candidate), and the ladder, each student built,
exported untrained and timed (``ready``), and pruned when even int8 could not bring it under a cap.

Lazy preparation (``prepare(..., lazy=True)``, the convergence search's): students are built and
ordered by their multiply-accumulates per sample (``count_macs``) and each is exported and timed
only when the training reaches it. A search that stops after two candidates of a forty-rung
ladder used to export and time all forty first: on a tiny data set that was most of its wall time
(issue 18: 35× a plain script's)."""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from ..distill.teacher_cache import TeacherCache
from ..distill.trainer import resolve_device
from ..errors import SpecError
from ..fields import monitored_metric
from ..measure.export import onnx_size_bytes
from ..measure.meter import latency_at
from ..measure.metrics import TASK_METRICS
from ..pipeline import Measurement
from ..spec import LOWER_IS_BETTER
from ..students.zoo import count_parameters
from .goal import Goal
from .ladder import TEACHER, Candidate, embedding_parameters
from .rungs import measure_estimate
from .state import Entry, SearchState

INT8_SIZE_BOUND = 0.25
"""int8 weights take a quarter of fp32's bytes: no int8 graph is smaller than this share of its fp32 twin."""
INT8_SPEED_BOUND = 0.4
"""The best int8 speed-up over fp32 seen on this CPU was 0.42× (bench/quantize.py); 0.4 is a safe floor."""
EVAL_BATCH = 256


def measure_teacher(s: SearchState) -> None:
    """The teacher's graph over the eval split (the reference of every metric), the goal, the
    teacher's row, and its outputs on the training split (the shared teacher cache)."""
    s.tick(0, 1, "measuring the teacher")
    t0 = time.monotonic()
    out = s.pipe.meter.use_teacher(s.teacher_onnx)
    metrics = s.pipe.meter.score(out)
    targets = s.spec.targets
    assert targets is not None
    default = {"classification": "accuracy", "embedding": "cosine", "regression": "mse"}[s.task]
    metric = targets.metric or monitored_metric(s.task, s.pipe.evald.meta, default)  # a CTR job's: auc
    targets = targets.model_copy(update={"metric": metric})
    if metric not in TASK_METRICS[s.task] and metric not in metrics:  # (a field's metrics: `fields`)
        raise SpecError(f"targets.metric {metric!r} is not measured for {s.task}; "
                        f"use one of {', '.join(TASK_METRICS[s.task])}")
    if metric in ("auc", "log_loss") and metric not in metrics:
        raise SpecError(f"targets.metric {metric!r} measures binary labels (two classes, 0 / 1); the evaluation "
                        "split has no such labels to score")
    lower = metric in LOWER_IS_BETTER
    if (lower and targets.min is not None) or (not lower and targets.max is not None):
        raise SpecError(f"targets: {metric} is {'lower' if lower else 'higher'}-is-better; "
                        f"give '{'max' if lower else 'min'}'")
    s.goal = Goal.resolve(targets, s.task, metrics.get(metric), s.spec.evaluation.threads)
    s.pipe.metric = s.goal.metric
    latency = s.latency(s.teacher_onnx)
    n = s.teacher.num_parameters or (count_parameters(s.teacher.module) if s.teacher.module else 0)
    s.teacher_row = s.row(TEACHER, "fp32", Measurement(s.teacher_onnx, metrics, onnx_size_bytes(s.teacher_onnx),
                                                       latency), n)
    s.device = resolve_device(s.spec.distillation.device)
    s.cache = TeacherCache.build(
        s.teacher, s.train, batch_size=max(s.spec.distillation.batch_size, EVAL_BATCH),
        top_k=s.spec.distillation.top_k, path=s.work / "teacher_cache.safetensors", device=s.device,
        cancel=s.cancel)
    s.teacher_eval = out
    s.phase_s["teacher"] = time.monotonic() - t0


def prepare(s: SearchState, candidates: list[Candidate], *, lazy: bool = False) -> list[Entry]:
    """Build every student, cheapest first, and export and time it now (``ready``) or, ``lazy``, when
    the training reaches it (its MACs per sample order it meanwhile); prune the hopeless ones."""
    t0 = time.monotonic()
    entries = [Entry(c) for c in candidates]
    students = sorted((e for e in entries if not e.cand.is_teacher), key=lambda e: e.cand.num_parameters)
    sample = {k: v[:1] for k, v in s.train.inputs.items()}
    for i, e in enumerate(students):
        if s.out_of_time("preparing candidates") and any(x.student is not None for x in students):
            e.status, e.reason = "not tried", "the time budget ran out before it was built"
            continue
        s.tick(i, len(students), f"preparing candidates: building {'' if lazy else 'and timing '}{e.cand.name}")
        assert e.cand.build is not None
        e.student = e.cand.build()
        if e.cand.embedding_parameters is None:
            e.cand.embedding_parameters = embedding_parameters(e.student.module) or None
        if lazy:
            e.macs = count_macs(e.student.module, sample)
            e.status = "active"
        else:
            ready(s, e)
    goal = s.goal
    size_floor, speed_floor = _floors(s)
    teacher = next((e for e in entries if e.cand.is_teacher), None)
    if teacher is not None:
        row = s.teacher_row
        teacher.fp32_size, teacher.cost_ms = row.size_bytes, row.latency_ms
        teacher.metric = row.value
        if goal.max_size_bytes is not None and row.size_bytes * size_floor > goal.max_size_bytes:
            teacher.status, teacher.reason = "pruned", "the teacher is over the size cap even as int8"
        elif goal.max_latency_ms is not None and (row.latency_ms or 0) * speed_floor > goal.max_latency_ms:
            teacher.status, teacher.reason = "pruned", "the teacher is over the latency cap even as int8"
        else:
            teacher.status, teacher.reason = "finalist", "the teacher itself: no training"
    s.teacher_estimate = 0.0
    if teacher is not None and teacher.status == "finalist":  # only its int8 twins remain to measure
        row = s.teacher_row
        s.teacher_estimate = measure_estimate(s, row.size_bytes, row.latency_ms, 0.0, 0.0, fp32=False)
    s.phase_s["prepare"] = time.monotonic() - t0
    return entries


def _floors(s: SearchState) -> tuple[float, float]:
    """The smallest size and latency shares of fp32 a model may reach (int8, when a recipe allows it)."""
    return (INT8_SIZE_BOUND, INT8_SPEED_BOUND) if s.recipes else (1.0, 1.0)


def ready(s: SearchState, e: Entry) -> bool:
    """Export the built, untrained student and time it at the goal's batch size (an architecture's
    size and latency do not depend on its weights); prune it when even int8 could not bring it under
    a cap. True when it stays active."""
    assert e.student is not None
    goal, int8 = s.goal, bool(s.recipes)
    size_floor, speed_floor = _floors(s)
    t1 = time.monotonic()
    path = s.pipe.export(e.student.module, s.work / "candidates" / e.cand.name / "untrained.onnx")
    t2 = time.monotonic()
    e.fp32_size = onnx_size_bytes(path)
    e.cost_ms = latency_at(s.latency(path, [goal.latency_batch], rounds=1), goal.latency_batch, goal.latency_stat)
    e.export_s, e.timing_s = t2 - t1, time.monotonic() - t2
    if goal.max_size_bytes is not None and e.fp32_size * size_floor > goal.max_size_bytes:
        e.status = "pruned"
        e.reason = (f"fp32 {e.fp32_size:,} B: over the size cap of {goal.max_size_bytes:,} B"
                    + (f" even at {INT8_SIZE_BOUND:g}× as int8" if int8 else ""))
    elif goal.max_latency_ms is not None and e.cost_ms is not None and e.cost_ms * speed_floor > goal.max_latency_ms:
        e.status = "pruned"
        e.reason = (f"fp32 {goal.latency_stat} {e.cost_ms:.4g} ms at batch {goal.latency_batch}: over the "
                    f"latency cap of {goal.max_latency_ms:g} ms"
                    + (f" even at {INT8_SPEED_BOUND:g}× as int8" if int8 else ""))
    else:
        e.status = "active"
    if e.status == "pruned":
        e.student = None
    return e.status == "active"


def count_macs(module: nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """Multiply-accumulates of one forward pass over ``batch`` in the linear and convolution layers
    (a cost that orders students without exporting them; for sub-0.1 ms graphs it is steadier than a
    timing). 0 when the module has neither."""
    total = 0

    def hook(m: nn.Module, _inp: object, out: object) -> None:
        nonlocal total
        if not isinstance(out, torch.Tensor):
            return
        if isinstance(m, nn.Linear):
            total += out.numel() * m.in_features
        else:
            assert isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
            total += out.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)

    layers = [m for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    handles = [m.register_forward_hook(hook) for m in layers]
    was_training = module.training
    try:
        module.eval()
        with torch.no_grad():
            module(**batch)
    finally:
        for h in handles:
            h.remove()
        module.train(was_training)
    return total
