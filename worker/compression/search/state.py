"""What a running search holds and its phases share: the candidate pipeline, the goal, the clock of the
time budget, the recipes, the measured models, and the notes the result reports."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..distill.teacher_cache import TeacherCache
from ..errors import Cancelled
from ..measure.meter import latency_at
from ..pipeline import CandidatePipeline, Measurement
from ..students.student import Student
from ..types import CancelFn, Progress, ProgressFn
from .goal import Goal
from .ladder import Candidate
from .measure import Measured
from .recipes import recipes_for


@dataclass
class SearchOptions:
    """Tuning knobs (the defaults are what jobs use; tests and benchmarks may change them)."""

    training: str = "converge"
    """``converge``: every candidate trained to its own plateau, cheapest first (``converge``);
    ``halving``: successive halving over ``rung_fractions`` of ``distillation.epochs`` (``rungs``)."""
    confidence_z: float = 1.0
    """Convergence training: a candidate meets an accuracy or mse bound only by this many standard errors
    of its eval-split value (``converge.with_margin``); when none meets, metrics within as many
    standard errors of the best are a tie the cheaper model wins (``converge.noise_band``,
    ``goal.choose``). 0 compares raw values. On its own (seed 591887) the margin made no
    difference (13/20 wins against 14/20); with the tie rule it turns lucky passes on a 22- or
    270-sample eval split into a larger, surer student, not into the teacher (issue 18)."""
    rung_fractions: tuple[float, ...] = (0.25, 0.5, 1.0)
    eta: int = 2
    min_keep: int = 2
    rounds: int = 3
    min_timed_s: float = 0.3


@dataclass
class Entry:
    """A ladder candidate while the search runs."""

    cand: Candidate
    student: Student | None = None
    fp32_size: int | None = None
    cost_ms: float | None = None
    """Untrained fp32 ONNX latency at the goal's batch size (the architecture's); None until timed."""
    macs: int | None = None
    """Multiply-accumulates per sample (lazy preparation orders the candidates by them)."""
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
                   fp32_latency_ms=self.cost_ms, macs=self.macs, rung=self.rung + 1, epochs=round(self.epochs, 3),
                   train_s=round(self.train_s, 3), metric=self.metric, predicted=self.predicted, curve=self.curve)
        return out


class Clock:
    def __init__(self, budget_s: float) -> None:
        self.start = time.monotonic()
        self.budget_s = budget_s

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.budget_s - self.elapsed()


class SearchState:
    """The search's shared state; the phases (``prepare``, ``rungs``, ``finalists``) fill it in."""

    goal: Goal
    teacher_row: Measured
    teacher_eval: torch.Tensor
    cache: TeacherCache
    device: torch.device
    teacher_estimate: float = 0.0
    """Seconds to measure the teacher's int8 twins (reserved from training)."""

    def __init__(self, pipeline: CandidatePipeline, *, workdir: Path, teacher_onnx: Path, progress: ProgressFn,
                 cancel: CancelFn, options: SearchOptions) -> None:
        spec = pipeline.spec
        assert spec.targets is not None and spec.student is not None
        # The search plans each candidate's steps itself: a single run's minimum does not apply.
        spec = spec.model_copy(update={"distillation": spec.distillation.model_copy(update={"min_steps": None})})
        self.pipe, self.spec, self.task = pipeline, spec, pipeline.task
        self.teacher, self.train, self.evald = pipeline.teacher, pipeline.train, pipeline.evald
        self.work, self.teacher_onnx = Path(workdir), Path(teacher_onnx)
        self.progress_fn, self.cancel, self.options = progress, cancel, options
        self.clock = Clock(spec.targets.time_budget_s)
        self.recipe_configs = recipes_for(spec.quantization, self.train.input_kind)
        self.recipes = list(self.recipe_configs)
        self.measured: list[Measured] = []
        self.notes: list[str] = []
        self.rungs: list[dict[str, Any]] = []
        self.stopped: str | None = None
        self.phase_s: dict[str, float] = {}
        self.work.mkdir(parents=True, exist_ok=True)

    def tick(self, step: int, total: int, message: str, **kw: Any) -> None:
        if self.cancel():
            raise Cancelled("search cancelled")
        self.progress_fn(Progress("search", step, total, message=message, eta_s=max(0.0, self.clock.left()), **kw))

    def out_of_time(self, where: str) -> bool:
        if self.clock.left() > 0:
            return False
        self.stopped = self.stopped or where
        return True

    def measure(self, paths: Sequence[Path], batches: Sequence[int] | None = None,
                rounds: int | None = None) -> list[Measurement]:
        """The pipeline's measure stage, timed in the search's interleaved rounds."""
        return self.pipe.measure(paths, batches=batches, rounds=rounds or self.options.rounds,
                                 min_timed_s=self.options.min_timed_s)

    def latency(self, path: Path, batches: Sequence[int] | None = None, rounds: int | None = None) -> dict[str, Any]:
        """One graph's latency alone (no metric), timed as `measure` does."""
        return self.pipe.meter.latencies([path], batches, rounds=rounds or self.options.rounds,
                                         min_timed_s=self.options.min_timed_s)[0]

    def row(self, cand: str, recipe: str, m: Measurement, params: int, entry: Entry | None = None) -> Measured:
        """A measured model, checked against the goal."""
        fmt = "onnx fp32" if recipe == "fp32" else ("onnx int4" if recipe == "int4" else "onnx int8")
        out = Measured(f"{cand}-{recipe}", cand, recipe, fmt, m.path, m.metrics, m.metrics.get(self.goal.metric),
                       m.size_bytes, params, m.latency,
                       latency_at(m.latency, self.goal.latency_batch, self.goal.latency_stat),
                       0.0 if entry is None else round(entry.train_s, 3),
                       0.0 if entry is None else round(entry.epochs, 3))
        out.checks = self.goal.check(out.value, out.latency_ms, out.size_bytes)
        return out
