"""Search: the smallest, fastest model that meets a team's targets.

Steps (``search``), all inside ``targets.time_budget_s``:

1. **Teacher, once.** The teacher's ONNX graph is run over the eval split (its metric resolves a
   ``max_drop`` target into a bound, ``search_goal.Goal``) and timed; its outputs on the training
   split are computed once (``TeacherCache``) and every candidate distils from them.
2. **Ladder** (``search_ladder``): student sizes from the teacher's down, plus the teacher itself.
   Each student is built and its untrained fp32 ONNX exported and timed at the goal's batch size:
   an architecture's latency and size do not depend on its weights. A candidate that would break
   the size or latency cap even after the best int8 gain seen on this CPU (``INT8_SIZE_BOUND``,
   ``INT8_SPEED_BOUND``) is pruned before any training.
3. **Successive halving.** Rungs train the candidates (cheapest first) to ``rung_fractions`` of
   ``distillation.epochs`` (each rung continues from the last one's weights with a fresh warm-up
   and cosine schedule, so every rung ends annealed). After each rung but the last, a candidate
   is *hopeless* when even twice the log-linear trend of its eval metric (metric against log
   training steps, from the end of the previous rung, or the untrained student, to the end of
   this one), carried on to the full training length, stays short of the metric bound by more
   than ``HOPELESS_MARGIN``; hopeless candidates stop. Of the rest at most ``ceil(n / eta)`` go
   on (``search_halving.keep_order``): the ``MEET_KEEP`` cheapest of those already meeting the bound, then,
   among those cheaper than any of them, by non-dominated rank on (metric, fp32 latency) and
   closest to the bound first.
4. **Measurement** of the finalists (and the teacher): each one's fp32 ONNX and its int8 twins
   (the quantization recipes of ``recipes_for``) are scored on the eval split in onnxruntime,
   sized on disk, and timed (``search_measure``) at every evaluation batch size and the goal's,
   in ``rounds`` interleaved rounds (median of the rounds' p50 / p95) with repeats sized so each
   model runs for at least ``min_timed_s`` per batch size. An int8 twin slower than its fp32 twin at the goal's batch
   size is reported as such and not chosen (fp32 kept), unless only it meets the size cap.
   Quantization-aware distillation (QAT) is tried when every post-training int8 twin of a
   candidate loses the metric bound its fp32 meets, and int8 would pay (faster, or needed for
   the size cap); always when the quantization method is ``qat``.
5. **Choice** (``search_goal.choose``) and the Pareto front of (metric, latency, size).

When the budget runs out the search stops training, measures what it has (at least one model),
and reports which targets the chosen model meets and which it does not.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..distill.distill import distill
from ..distill.qat import qat_distill
from ..distill.teacher_cache import TeacherCache
from ..distill.trainer import resolve_device, steps_per_epoch
from ..errors import Cancelled, SpecError
from ..measure.export import export_onnx, onnx_size_bytes
from ..measure.metrics import TASK_METRICS, evaluate_outputs
from ..quantize.api import quantize
from ..quantize.calibration import calibration_sample
from ..spec import (
    AutoQuantizationConfig,
    CompressSpec,
    DynamicInt8Config,
    NoQuantizationConfig,
    QatConfig,
    QuantizationMethod,
    StaticInt8Config,
)
from ..students.factory import Student
from ..students.zoo import count_parameters
from ..types import CancelFn, Progress, ProgressFn, Teacher, TensorData, never_cancel, no_progress, trim_padding
from .goal import Choice, Goal, choose, describe_check, front
from .halving import extrapolate, hopeless, keep_order
from .ladder import TEACHER, Candidate, build_ladder, embedding_parameters
from .measure import Measured, Meter, latency_at

INT8_SIZE_BOUND = 0.25
"""int8 weights take a quarter of fp32's bytes: no int8 graph is smaller than this share of its fp32 twin."""
INT8_SPEED_BOUND = 0.4
"""The best int8 speed-up over fp32 seen on this CPU was 0.42× (bench/quantize.py); 0.4 is a safe floor."""
QUANT_S = (0.5, 20e6)
"""Time budgeting: quantizing an ONNX graph takes about 0.5 s plus a second per 20 MB."""
EVAL_BATCH = 256
SMALL_STUDENT = 100_000
"""Students with fewer parameters train on one torch thread: their ops are too small to split, and
with two threads on a busy 2-core machine a 16-unit MLP trained at 855 samples/s against 28,600
with one (each tiny op waited for the other thread)."""


@dataclass
class SearchOptions:
    """Tuning knobs (the defaults are what jobs use; tests and benchmarks may change them)."""

    rung_fractions: tuple[float, ...] = (0.25, 0.5, 1.0)
    eta: int = 2
    min_keep: int = 2
    rounds: int = 3
    min_timed_s: float = 0.3


@dataclass
class _Entry:
    """A ladder candidate while the search runs."""

    cand: Candidate
    student: Student | None = None
    fp32_size: int | None = None
    cost_ms: float | None = None
    """Untrained fp32 ONNX latency at the goal's batch size (the architecture's)."""
    export_s: float = 0.0
    timing_s: float = 0.0
    """Seconds one round of timing took at the goal's batch size."""
    status: str = "candidate"
    reason: str = ""
    rung: int = -1
    steps: int = 0
    epochs: float = 0.0
    train_s: float = 0.0
    metric: float | None = None
    initial_metric: float | None = None
    predicted: float | None = None
    curve: list[dict[str, Any]] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    cut_by_budget: bool = False

    def row(self) -> dict[str, Any]:
        out = self.cand.summary()
        out.update(status=self.status, reason=self.reason, fp32_size_bytes=self.fp32_size,
                   fp32_latency_ms=self.cost_ms, rung=self.rung + 1, epochs=round(self.epochs, 3),
                   train_s=round(self.train_s, 3), metric=self.metric, predicted=self.predicted, curve=self.curve)
        return out


@dataclass
class SearchResult:
    goal: Goal
    choice: Choice
    chosen: Measured
    chosen_student: Student | None
    """The float student behind the chosen model (None when it is the teacher)."""
    chosen_history: list[dict[str, Any]]
    teacher: Measured
    measured: list[Measured]
    front: list[str]
    candidates: list[dict[str, Any]]
    rungs: list[dict[str, Any]]
    budget: dict[str, Any]
    recipes: list[str]
    notes: list[str]

    def by_name(self, name: str) -> Measured:
        return next(m for m in self.measured if m.name == name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "goal": self.goal.to_dict(),
            "targets": self.goal.describe(),
            "chosen": {**self.chosen.to_dict(), **self.choice.to_dict()},
            "chosen_checks": [describe_check(k, c, self.goal) for k, c in self.chosen.checks.items()],
            "teacher": self.teacher.to_dict(),
            "front": self.front,
            "measured": [m.to_dict() for m in self.measured],
            "candidates": self.candidates,
            "rungs": self.rungs,
            "budget": self.budget,
            "recipes": self.recipes,
            "notes": self.notes,
        }


PER_TENSOR = "_per_tensor"


def recipes_for(config: QuantizationMethod, input_kind: str) -> dict[str, QuantizationMethod]:
    """The quantized recipes each finalist is measured in (besides fp32), by name.

    ``auto``: dynamic and static int8 for vectors, static for images and signals (onnxruntime's
    dynamic path leaves Conv in float), dynamic for token models (static loses too much there);
    ``qat``: static int8 (the quantization-aware twin comes on top, see `qat_config_for`).
    Static and dynamic int8 of non-token models also come per tensor (``..._per_tensor``) when the
    config asks for per-channel weights: per-tensor scales are smaller and, for small Gemms, faster
    (``quantize.cpu_choices``: the digits MLP ran 0.53× fp32 per tensor, 0.69× per channel);
    the search measures both and keeps whichever pays.
    """
    if isinstance(config, NoQuantizationConfig):
        return {}
    shared = config.model_dump(include={"max_metric_drop", "drop_mode"})
    if isinstance(config, AutoQuantizationConfig):
        dynamic, static = DynamicInt8Config(**shared), StaticInt8Config(**shared)
        base = {"tokens": [dynamic], "vector": [dynamic, static]}.get(input_kind, [static])
    elif isinstance(config, QatConfig):
        base = [StaticInt8Config(calibration_samples=config.calibration_samples, per_channel=config.per_channel,
                                 **shared)]
    else:
        base = [config]
    out: dict[str, QuantizationMethod] = {}
    for c in base:
        out[c.method] = c
        if isinstance(c, (DynamicInt8Config, StaticInt8Config)) and c.per_channel and input_kind != "tokens":
            out[c.method + PER_TENSOR] = c.model_copy(update={"per_channel": False})
    return out


def qat_config_for(config: QuantizationMethod) -> QatConfig:
    """The quantization-aware twin's config: ``config`` itself when it is ``qat``, else one with its
    tolerance and static calibration settings."""
    if isinstance(config, QatConfig):
        return config
    fields = config.model_dump(include={"max_metric_drop", "drop_mode", "calibration_samples", "per_channel"})
    return QatConfig(**fields)


@contextlib.contextmanager
def _threads_for(parameters: int, device: torch.device) -> Iterator[None]:
    """One torch thread while a small student trains on the CPU (``SMALL_STUDENT``), the caller's after."""
    before = torch.get_num_threads()
    single = device.type == "cpu" and parameters < SMALL_STUDENT and before > 1
    if single:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if single:
            torch.set_num_threads(before)


class _Clock:
    def __init__(self, budget_s: float) -> None:
        self.start = time.monotonic()
        self.budget_s = budget_s

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.budget_s - self.elapsed()


class _Search:
    def __init__(self, teacher: Teacher, train: TensorData, evald: TensorData, spec: CompressSpec, *,
                 workdir: Path, teacher_onnx: Path, task: str, progress: ProgressFn, cancel: CancelFn,
                 options: SearchOptions) -> None:
        assert spec.targets is not None and spec.student is not None
        self.teacher, self.train, self.evald, self.spec = teacher, train, evald, spec
        self.work, self.teacher_onnx, self.task = Path(workdir), Path(teacher_onnx), task
        self.progress_fn, self.cancel, self.options = progress, cancel, options
        self.clock = _Clock(spec.targets.time_budget_s)
        self.meter = Meter(task, evald, spec, spec.targets.latency_batch_size, rounds=options.rounds,
                           min_timed_s=options.min_timed_s)
        self.recipe_configs = recipes_for(spec.quantization, train.input_kind)
        self.recipes = list(self.recipe_configs)
        self.measured: list[Measured] = []
        self.notes: list[str] = []
        self.rungs: list[dict[str, Any]] = []
        self.stopped: str | None = None
        self.phase_s: dict[str, float] = {}
        self.work.mkdir(parents=True, exist_ok=True)

    # --- helpers ---------------------------------------------------------------------------

    def _tick(self, step: int, total: int, message: str, **kw: Any) -> None:
        if self.cancel():
            raise Cancelled("search cancelled")
        self.progress_fn(Progress("search", step, total, message=message, eta_s=max(0.0, self.clock.left()), **kw))

    def _out_of_time(self, where: str) -> bool:
        if self.clock.left() > 0:
            return False
        self.stopped = self.stopped or where
        return True

    # --- 1. teacher ---------------------------------------------------------------------------

    def teacher_once(self) -> None:
        self._tick(0, 1, "measuring the teacher")
        t0 = time.monotonic()
        out = self.meter.outputs(self.teacher_onnx)
        self.meter.teacher_out = out
        y = self.evald.y if self.task != "embedding" else None
        metrics = evaluate_outputs(self.task, out, y, out)
        targets = self.spec.targets
        assert targets is not None
        metric = targets.metric or {"classification": "accuracy", "embedding": "cosine", "regression": "mse"}[self.task]
        if metric not in TASK_METRICS[self.task]:
            raise SpecError(f"targets.metric {metric!r} is not measured for {self.task}; "
                            f"use one of {', '.join(TASK_METRICS[self.task])}")
        lower = metric == "mse"
        if (lower and targets.min is not None) or (not lower and targets.max is not None):
            raise SpecError(f"targets: {metric} is {'lower' if lower else 'higher'}-is-better; "
                            f"give '{'max' if lower else 'min'}'")
        self.goal = Goal.resolve(targets, self.task, metrics.get(metric), self.spec.evaluation.threads)
        latency = self.meter.latencies([self.teacher_onnx])[0]
        n = self.teacher.num_parameters or (count_parameters(self.teacher.module) if self.teacher.module else 0)
        self.teacher_row = self._measured(TEACHER, "fp32", self.teacher_onnx, metrics, n, latency)
        self.device = resolve_device(self.spec.distillation.device)
        self.cache = TeacherCache.build(
            self.teacher, self.train, batch_size=max(self.spec.distillation.batch_size, EVAL_BATCH),
            top_k=self.spec.distillation.top_k, path=self.work / "teacher_cache.safetensors", device=self.device,
            cancel=self.cancel)
        self.teacher_eval = out
        self.phase_s["teacher"] = time.monotonic() - t0

    def _measured(self, cand: str, recipe: str, path: Path, metrics: dict[str, Any], params: int,
                  latency: dict[str, Any], entry: _Entry | None = None) -> Measured:
        fmt = "onnx fp32" if recipe == "fp32" else ("onnx int4" if recipe == "int4" else "onnx int8")
        m = Measured(f"{cand}-{recipe}", cand, recipe, fmt, path, metrics, metrics.get(self.goal.metric),
                     onnx_size_bytes(path), params, latency,
                     latency_at(latency, self.goal.latency_batch, self.goal.latency_stat),
                     0.0 if entry is None else round(entry.train_s, 3),
                     0.0 if entry is None else round(entry.epochs, 3))
        m.checks = self.goal.check(m.value, m.latency_ms, m.size_bytes)
        return m

    # --- 2. ladder ----------------------------------------------------------------------------

    def prepare(self, candidates: list[Candidate]) -> list[_Entry]:
        t0 = time.monotonic()
        entries = [_Entry(c) for c in candidates]
        students = sorted((e for e in entries if not e.cand.is_teacher), key=lambda e: e.cand.num_parameters)
        sample = {k: v[:8] for k, v in self.evald.inputs.items()}
        goal = self.goal
        int8 = bool(self.recipes)
        size_floor = INT8_SIZE_BOUND if int8 else 1.0
        speed_floor = INT8_SPEED_BOUND if int8 else 1.0
        for i, e in enumerate(students):
            if self._out_of_time("preparing candidates") and any(x.student is not None for x in students):
                e.status, e.reason = "not tried", "the time budget ran out before it was built"
                continue
            self._tick(i, len(students), f"preparing candidates: building and timing {e.cand.name}")
            assert e.cand.build is not None
            e.student = e.cand.build()
            if e.cand.embedding_parameters is None:
                e.cand.embedding_parameters = embedding_parameters(e.student.module) or None
            folder = self.work / "candidates" / e.cand.name
            t1 = time.monotonic()
            path = export_onnx(e.student.module, sample, folder / "untrained.onnx", task=self.task)
            t2 = time.monotonic()
            e.fp32_size = onnx_size_bytes(path)
            lat = self.meter.latencies([path], [goal.latency_batch], rounds=1)[0]
            e.cost_ms = latency_at(lat, goal.latency_batch, goal.latency_stat)
            e.export_s, e.timing_s = t2 - t1, time.monotonic() - t2
            if goal.max_size_bytes is not None and e.fp32_size * size_floor > goal.max_size_bytes:
                e.status = "pruned"
                e.reason = (f"fp32 {e.fp32_size:,} B: over the size cap of {goal.max_size_bytes:,} B"
                            + (f" even at {INT8_SIZE_BOUND:g}× as int8" if int8 else ""))
            elif (goal.max_latency_ms is not None and e.cost_ms is not None
                  and e.cost_ms * speed_floor > goal.max_latency_ms):
                e.status = "pruned"
                e.reason = (f"fp32 {goal.latency_stat} {e.cost_ms:.4g} ms at batch {goal.latency_batch}: over the "
                            f"latency cap of {goal.max_latency_ms:g} ms"
                            + (f" even at {INT8_SPEED_BOUND:g}× as int8" if int8 else ""))
            else:
                e.status = "active"
            if e.status == "pruned":
                e.student = None
        teacher = next((e for e in entries if e.cand.is_teacher), None)
        if teacher is not None:
            row = self.teacher_row
            teacher.fp32_size, teacher.cost_ms = row.size_bytes, row.latency_ms
            teacher.metric = row.value
            if goal.max_size_bytes is not None and row.size_bytes * size_floor > goal.max_size_bytes:
                teacher.status, teacher.reason = "pruned", "the teacher is over the size cap even as int8"
            elif goal.max_latency_ms is not None and (row.latency_ms or 0) * speed_floor > goal.max_latency_ms:
                teacher.status, teacher.reason = "pruned", "the teacher is over the latency cap even as int8"
            else:
                teacher.status, teacher.reason = "finalist", "the teacher itself: no training"
        self.teacher_estimate = 0.0
        if teacher is not None and teacher.status == "finalist":  # only its int8 twins remain to measure
            row = self.teacher_row
            self.teacher_estimate = self._measure_estimate(row.size_bytes, row.latency_ms, 0.0, 0.0, fp32=False)
        self.phase_s["prepare"] = time.monotonic() - t0
        return entries

    # --- 3. successive halving -----------------------------------------------------------------

    def _measure_estimate(self, size: int | None, cost_ms: float | None, timing_s: float, export_s: float,
                          fp32: bool = True) -> float:
        """Seconds to measure one finalist: export, quantize, score and time its graphs (int8 twins only
        when ``fp32`` is False: the teacher's fp32 graph is measured first thing)."""
        n_recipes = len(self.recipes)
        batches = math.ceil(len(self.evald) / self.goal.latency_batch)
        score_s = (cost_ms or 0.0) / 1000 * batches
        time_s = max(timing_s, self.options.min_timed_s) * len(self.meter.batches) * self.options.rounds
        quant_s = QUANT_S[0] + (size or 0) / QUANT_S[1]
        return export_s + (n_recipes + fp32) * (score_s + time_s) + n_recipes * quant_s

    def train_rungs(self, entries: list[_Entry]) -> None:
        t0 = time.monotonic()
        base = self.spec.distillation
        epochs = base.epochs
        targets = sorted({max(1, round(f * epochs)) for f in self.options.rung_fractions if f > 0} | {epochs})
        targets = [t for t in targets if t <= epochs]
        per_epoch = steps_per_epoch(len(self.train), min(base.batch_size, len(self.train)))
        final_step = per_epoch * epochs
        active = sorted((e for e in entries if e.status == "active"),
                        key=lambda e: (e.cost_ms if e.cost_ms is not None else float("inf"), e.cand.num_parameters))
        done_epochs = 0
        quota_last = max(self.options.min_keep, math.ceil(len(active) / self.options.eta ** (len(targets) - 1)))
        for r, target in enumerate(targets):
            rung_epochs = target - done_epochs
            info = {"rung": r + 1, "epochs": target, "entered": [e.cand.name for e in active], "dropped": []}
            self.rungs.append(info)
            est = sorted((self._measure_estimate(e.fp32_size, e.cost_ms, e.timing_s, e.export_s) for e in active),
                         reverse=True)
            reserve = sum(est[:quota_last]) + self.teacher_estimate
            for i, e in enumerate(active):
                left = self.clock.left() - reserve
                trained_any = any(x.rung >= 0 for x in entries)
                if left <= 0 and (trained_any or i > 0):
                    self.stopped = self.stopped or f"training, rung {r + 1}"
                    if e.rung < r:
                        e.cut_by_budget = True
                    continue
                self._train(e, r, rung_epochs, max(left, 0.5), i, len(active), len(targets), final_step)
            if self.stopped:
                break
            done_epochs = target
            if r == len(targets) - 1:
                break
            survivors = []
            for e in active:
                if hopeless(e.predicted, self.goal):
                    e.status = "dropped"
                    e.reason = (f"hopeless after rung {r + 1}: {self.goal.metric} {e.metric:.4f}, at most "
                                f"{e.predicted:.4f} expected after full training, bound {self.goal.bound:.4f}")
                    info["dropped"].append(e.cand.name)
                else:
                    survivors.append(e)
            quota = max(self.options.min_keep, math.ceil(len(active) / self.options.eta))
            points = [{"metric": e.metric, "cost": e.cost_ms} for e in survivors]
            keep, why = keep_order(points, self.goal, quota)
            kept = [survivors[i] for i in sorted(keep)]
            for i, text in why.items():
                e = survivors[i]
                e.status = "dropped"
                e.reason = (f"after rung {r + 1} ({self.goal.metric} {e.metric:.4f}, fp32 {e.cost_ms:.4g} ms): "
                            f"{text}")
                info["dropped"].append(e.cand.name)
            info["kept"] = [e.cand.name for e in kept]
            active = kept
        for e in entries:
            if e.status == "active":
                e.status = "finalist"
                if e.rung < 0:
                    e.status, e.reason = "not trained", "the time budget ran out before its first rung"
                elif e.cut_by_budget or e.rung < len(targets) - 1:
                    e.reason = f"training stopped by the time budget after rung {e.rung + 1}"
        self.phase_s["train"] = time.monotonic() - t0

    def _train(self, e: _Entry, r: int, rung_epochs: int, budget_s: float, i: int, n: int, n_rungs: int,
               final_step: int) -> None:
        assert e.student is not None
        base = self.spec.distillation
        per_epoch = steps_per_epoch(len(self.train), min(base.batch_size, len(self.train)))
        dspec = base.model_copy(update={
            "epochs": rung_epochs, "baseline": False, "target": None, "patience": None, "checkpoint_every": None,
            "time_budget_s": min(budget_s, base.time_budget_s or budget_s)})
        label = f"rung {r + 1}/{n_rungs}: training {e.cand.name} ({i + 1}/{n})"

        def inner(p: Progress) -> None:
            self._tick(i, n, f"{label}, step {p.step}/{p.total}", loss=p.loss, metric=p.metric)

        self._tick(i, n, label)
        if r == 0:
            e.initial_metric = self._torch_metric(e.student.module)
            e.curve.append({"rung": 0, "epochs": 0.0, "metric": e.initial_metric})
        before = (max(e.steps, 1), e.initial_metric if r == 0 else e.metric)
        t0 = time.monotonic()
        with _threads_for(e.cand.num_parameters, self.device):
            result = distill(self.teacher, e.student.module, self.train, self.evald, dspec,
                             workdir=self.work / "candidates" / e.cand.name / f"rung{r + 1}", progress=inner,
                             cancel=self.cancel, task=self.task, teacher_cache=self.cache,
                             teacher_eval=self.teacher_eval, checkpoints=False)
        e.train_s += time.monotonic() - t0
        run = result.train["student"]
        history = result.history["student"] or []
        for h in history:
            h = dict(h)
            h["step"] = e.steps + h["step"]
            e.history.append(h)
        e.steps += int(run["steps"])
        e.epochs = e.steps / per_epoch
        e.rung = r
        e.metric = (result.metrics["student"] or {}).get(self.goal.metric)
        e.predicted = extrapolate(before, (e.steps, e.metric), final_step, self.goal.higher_is_better)
        e.curve.append({"rung": r + 1, "epochs": round(e.epochs, 3), "metric": e.metric, "predicted": e.predicted,
                        "train_s": round(e.train_s, 3), "stopped": run["stopped_reason"]})
        if run["stopped_reason"] == "time_budget":  # the budget cut this rung: no time for more training
            e.cut_by_budget = True
            self.stopped = self.stopped or f"training, rung {r + 1}"

    @torch.no_grad()
    def _torch_metric(self, module: torch.nn.Module) -> float | None:
        """The goal metric of a torch model on the eval split (the untrained student, before rung 1)."""
        was_training = module.training
        module.eval()
        tokens = self.evald.input_kind == "tokens"
        n = len(self.evald)
        outs = []
        for lo in range(0, n, EVAL_BATCH):
            batch = {k: v[lo:lo + EVAL_BATCH] for k, v in self.evald.inputs.items()}
            outs.append(module(**(trim_padding(batch) if tokens else batch)).float().cpu())
        module.train(was_training)
        y = self.evald.y if self.task != "embedding" else None
        return evaluate_outputs(self.task, torch.cat(outs), y, self.teacher_eval).get(self.goal.metric)

    # --- 4. measurement -----------------------------------------------------------------------

    def measure(self, entries: list[_Entry]) -> None:
        t0 = time.monotonic()
        finalists = [e for e in entries if e.status == "finalist"]

        def priority(e: _Entry) -> tuple[bool, float, float]:
            meets = self.goal.metric_ok(e.metric)
            value = e.metric if e.metric is not None else float("-inf")
            return (not meets, (e.cost_ms or 0.0) if meets else 0.0, -value if self.goal.higher_is_better else value)

        finalists.sort(key=priority)
        for i, e in enumerate(finalists):
            if self.measured and self._out_of_time("measuring finalists"):
                e.status, e.reason = "not measured", "the time budget ran out before it was measured"
                continue
            self._tick(i, len(finalists), f"measuring {e.cand.name} ({i + 1}/{len(finalists)})")
            self._measure_entry(e)
            e.status = "measured"
        if not self.measured:  # nothing at all: the teacher, so that the result still says something
            self.measured.append(self.teacher_row)
            self.teacher_row.notes.append("measured as the fallback: no candidate could be measured in time")
        self.phase_s["measure"] = time.monotonic() - t0

    def _measure_entry(self, e: _Entry) -> None:
        folder = self.work / "candidates" / e.cand.name
        name = e.cand.name
        teacher = e.cand.is_teacher  # its fp32 graph was measured first thing
        if teacher:
            fp32, params = self.teacher_onnx, self.teacher_row.parameters
        else:
            assert e.student is not None
            sample = {k: v[:8] for k, v in self.evald.inputs.items()}
            fp32 = export_onnx(e.student.module, sample, folder / "fp32.onnx", task=self.task)
            params = count_parameters(e.student.module)
        models: list[tuple[str, Path]] = [] if teacher else [("fp32", fp32)]
        for recipe in self.recipes:
            if self.measured and self._out_of_time(f"quantizing {name}"):
                self.notes.append(f"{name}: {recipe} skipped, the time budget ran out")
                continue
            models.append((recipe, self._quantize(fp32, folder / f"{recipe}.onnx", recipe)))
        metrics = [self.meter.metrics(p) for _, p in models]
        latencies = self.meter.latencies([p for _, p in models]) if models else []
        rows = [self._measured(name, recipe, path, m, params, lat, e)
                for (recipe, path), m, lat in zip(models, metrics, latencies, strict=True)]
        if teacher:
            rows.insert(0, self.teacher_row)
        fp32_row = rows[0]
        for row in rows[1:]:
            row.twin = fp32_row.name
            self._judge_twin(row, fp32_row)
        self.measured.extend(rows)
        if self._wants_qat(e, rows) and not self._out_of_time(f"QAT of {name}"):
            self._qat(e, fp32_row, folder)

    def _quantize(self, fp32: Path, out: Path, recipe: str) -> Path:
        qspec = self.recipe_configs[recipe]
        calib = None
        if isinstance(qspec, StaticInt8Config):
            calib, _ = calibration_sample(self.train.inputs, qspec.calibration_samples, self.spec.distillation.seed)
        evaluate: Callable[[Path], float] | None = None
        if qspec.max_metric_drop is not None:
            def evaluate(p: Path) -> float:
                return float(self.meter.metrics(p)[self.goal.metric])
        result = quantize(fp32, out, qspec, calibration_inputs=calib, evaluate=evaluate,
                          higher_is_better=self.goal.higher_is_better, cancel=self.cancel,
                          seed=self.spec.distillation.seed)
        return Path(result.path)

    def _judge_twin(self, row: Measured, fp32_row: Measured) -> None:
        if row.latency_ms is None or fp32_row.latency_ms is None or row.latency_ms < fp32_row.latency_ms:
            return
        row.notes.append(f"slower than its fp32 twin at batch {self.goal.latency_batch}: {self.goal.latency_stat} "
                         f"{row.latency_ms:.4g} ms vs {fp32_row.latency_ms:.4g} ms")
        size_only = (self.goal.max_size_bytes is not None and not fp32_row.checks["size"]["met"]
                     and row.checks["size"]["met"])
        if size_only:
            row.notes.append("kept eligible: only it meets the size cap")
        else:
            row.eligible = False
            row.notes.append("fp32 kept")

    def _wants_qat(self, e: _Entry, rows: list[Measured]) -> bool:
        if e.cand.is_teacher or e.student is None or self.train.input_kind == "tokens":
            return False
        if "static_int8" not in self.recipes:
            return False
        if self.spec.quantization.method == "qat":
            return True
        fp32, quantized = rows[0], rows[1:]
        static = [r for r in quantized if r.recipe.startswith("static_int8")]
        if not static or not self.goal.metric_ok(fp32.value) or any(self.goal.metric_ok(r.value) for r in quantized):
            return False  # no static twin to train for, fp32 misses anyway, or some PTQ twin already keeps it
        pays = any(r.latency_ms is not None and fp32.latency_ms is not None and r.latency_ms < fp32.latency_ms
                   for r in static)
        needs_size = "size" in fp32.checks and not fp32.checks["size"]["met"] and any(
            r.checks["size"]["met"] for r in static)
        return pays or needs_size

    def _qat(self, e: _Entry, fp32_row: Measured, folder: Path) -> None:
        assert e.student is not None
        qspec = qat_config_for(self.spec.quantization)

        def inner(p: Progress) -> None:
            self._tick(0, 1, f"QAT of {e.cand.name}, step {p.step}/{p.total}", loss=p.loss)

        t0 = time.monotonic()
        dspec = self.spec.distillation.model_copy(update={"time_budget_s": max(1.0, self.clock.left())})
        tuned = qat_distill(e.student.module, self.teacher, self.train, qspec, dspec, progress=inner,
                            cancel=self.cancel, task=self.task)
        qat_s = time.monotonic() - t0
        sample = {k: v[:8] for k, v in self.evald.inputs.items()}
        float_path = export_onnx(tuned, sample, folder / "qat_float.onnx", task=self.task)
        static = qspec.static()
        calib, _ = calibration_sample(self.train.inputs, static.calibration_samples, self.spec.distillation.seed)
        out = quantize(float_path, folder / "qat_int8.onnx", static, calibration_inputs=calib, cancel=self.cancel,
                       seed=self.spec.distillation.seed)
        path = Path(out.path)
        latency = self.meter.latencies([path])[0]
        row = self._measured(e.cand.name, "qat_int8", path, self.meter.metrics(path), fp32_row.parameters, latency, e)
        row.train_s = round(row.train_s + qat_s, 3)
        row.twin = fp32_row.name
        row.notes.append(f"quantization-aware distillation: {qspec.qat_epochs} epoch(s), {qat_s:.1f} s")
        self._judge_twin(row, fp32_row)
        self.measured.append(row)


def search(
    teacher: Teacher,
    train: TensorData,
    evald: TensorData,
    spec: CompressSpec,
    *,
    teacher_onnx: Path,
    workdir: Path,
    task: str | None = None,
    progress: ProgressFn = no_progress,
    cancel: CancelFn = never_cancel,
    options: SearchOptions | None = None,
    candidates: list[Candidate] | None = None,
) -> SearchResult:
    """Find the smallest, fastest model for ``spec.targets`` (module doc). ``candidates`` replaces the
    ladder (tests); ``teacher_onnx`` is the teacher as an fp32 ONNX graph."""
    if spec.targets is None or spec.student is None:
        raise SpecError("a search needs targets and a student spec")
    task = task or teacher.task
    run = _Search(teacher, train, evald, spec, workdir=Path(workdir), teacher_onnx=Path(teacher_onnx), task=task,
                  progress=progress, cancel=cancel, options=options or SearchOptions())
    run.teacher_once()
    ladder = candidates if candidates is not None else build_ladder(teacher, train, spec.student)
    entries = run.prepare(ladder)
    run.train_rungs(entries)
    run.measure(entries)

    goal = run.goal
    pool = [m.to_dict() for m in run.measured]
    choice = choose(pool, goal)
    if choice is None:  # every measured model is an int8 twin slower than its fp32: cannot happen
        raise SpecError("the search measured no eligible model")
    chosen = next(m for m in run.measured if m.name == choice.name)
    entry = next((e for e in entries if e.cand.name == chosen.candidate), None)
    used = run.clock.elapsed()
    budget = {"time_budget_s": spec.targets.time_budget_s, "used_s": round(used, 3),
              "stopped_by_budget": run.stopped is not None, "stopped_while": run.stopped,
              "phases_s": {k: round(v, 3) for k, v in run.phase_s.items()}}
    if run.stopped:
        run.notes.append(f"the time budget of {spec.targets.time_budget_s:g} s ran out while {run.stopped}: "
                         "the result is the best model measured so far")
    return SearchResult(
        goal=goal, choice=choice, chosen=chosen,
        chosen_student=None if entry is None or entry.cand.is_teacher else entry.student,
        chosen_history=[] if entry is None else entry.history,
        teacher=run.teacher_row, measured=run.measured, front=front(pool, goal),
        candidates=[e.row() for e in entries], rungs=run.rungs, budget=budget, recipes=run.recipes,
        notes=run.notes,
    )
