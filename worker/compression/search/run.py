"""Search: the smallest, fastest model that meets a team's targets.

Steps (``search``), all inside ``targets.time_budget_s``:

1. **Teacher, once.** The teacher's ONNX graph is run over the eval split (its metric resolves a
   ``max_drop`` target into a bound, ``goal.Goal``) and timed; its outputs on the training
   split are computed once (``TeacherCache``) and every candidate distils from them.
2. **Ladder** (``ladder``): student sizes from the teacher's down, plus the teacher itself.
   Each student is built and its untrained fp32 ONNX exported and timed at the goal's batch size:
   an architecture's latency and size do not depend on its weights. The convergence search does
   this lazily, when its training reaches a candidate (ordered meanwhile by multiply-accumulates
   per sample): a search that stops early prepares only what it trained. A candidate that would break
   the size or latency cap even after the best int8 gain seen on this CPU (``INT8_SIZE_BOUND``,
   ``INT8_SPEED_BOUND``) is pruned before any training.
3. **Training** (``SearchOptions.training``). By default (``converge``, module ``converge``) each
   candidate, cheapest first, trains to its own plateau (length from its measured step cost and the
   budget, its own warm-up and cosine schedule, early stop on the eval metric; temperature and α
   tried on the cheapest) until the cheapest that meets the metric bound is found (galloping up the
   ladder, then back down). ``halving`` is the earlier successive halving: rungs train the
   candidates (cheapest first) to ``rung_fractions`` of ``distillation.epochs`` (each rung continues from the last one's weights with a fresh warm-up
   and cosine schedule, so every rung ends annealed). After each rung but the last, a candidate
   is *hopeless* when even twice the log-linear trend of its eval metric (metric against log
   training steps, from the end of the previous rung, or the untrained student, to the end of
   this one), carried on to the full training length, stays short of the metric bound by more
   than ``HOPELESS_MARGIN``; hopeless candidates stop. Of the rest at most ``ceil(n / eta)`` go
   on (``halving.keep_order``): the ``MEET_KEEP`` cheapest of those already meeting the bound, then,
   among those cheaper than any of them, by non-dominated rank on (metric, fp32 latency) and
   closest to the bound first.
4. **Measurement** of the finalists (and the teacher): each one's fp32 ONNX and its int8 twins
   (the quantization recipes of ``recipes.recipes_for``) go through the candidate pipeline's
   export, quantize and measure stages (``pipeline.CandidatePipeline``, the same as a single run's):
   scored on the eval split in onnxruntime, sized on disk, and timed at every evaluation batch size
   and the goal's, in ``rounds`` interleaved rounds (median of the rounds' p50 / p95) with repeats
   sized so each model runs for at least ``min_timed_s`` per batch size. An int8 twin slower than
   its fp32 twin at the goal's batch size is reported as such and not chosen (fp32 kept), unless
   only it meets the size cap. Quantization-aware distillation (QAT) is tried, as the ``qat``
   quantization handler, when every post-training int8 twin of a candidate loses the metric bound
   its fp32 meets, and int8 would pay (faster, or needed for the size cap); always when the
   quantization method is ``qat``.
5. **Choice** (``goal.choose``) and the Pareto front of (metric, latency, size).

When the budget runs out the search stops training, measures what it has (at least one model),
and reports which targets the chosen model meets and which it does not.

Phases 1-2 are ``prepare``, 3 ``rungs``, 4 ``finalists``; they share a ``state.SearchState``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import SpecError
from ..measure.meter import Meter
from ..pipeline import CandidatePipeline
from ..spec import CompressSpec
from ..students.student import Student
from ..types import CancelFn, ProgressFn, Teacher, TensorData, never_cancel, no_progress
from .converge import tolerance, train_converge, with_margin
from .finalists import measure_finalists
from .goal import Choice, Goal, choose, describe_check, front
from .ladder import Candidate, build_ladder
from .measure import Measured
from .prepare import measure_teacher, prepare
from .rungs import train_rungs
from .state import SearchOptions, SearchState

__all__ = ["SearchOptions", "SearchResult", "search"]


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
    pipeline: CandidatePipeline | None = None,
) -> SearchResult:
    """Find the smallest, fastest model for ``spec.targets`` (module doc). ``candidates`` replaces the
    ladder (tests); ``teacher_onnx`` is the teacher as an fp32 ONNX graph; ``pipeline`` is the run's
    candidate pipeline (one is made for these arguments when not given)."""
    if spec.targets is None or spec.student is None:
        raise SpecError("a search needs targets and a student spec")
    task = task or teacher.task
    if pipeline is None:
        meter = Meter(task, evald, spec.evaluation, extra_batches=[spec.targets.latency_batch_size])
        pipeline = CandidatePipeline(teacher, train, evald, spec, task=task, meter=meter, progress=progress,
                                     cancel=cancel)
    run = SearchState(pipeline, workdir=Path(workdir), teacher_onnx=Path(teacher_onnx), progress=progress,
                      cancel=cancel, options=options or SearchOptions())
    measure_teacher(run)
    ladder = candidates if candidates is not None else build_ladder(teacher, train, spec.student)
    entries = prepare(run, ladder, lazy=run.options.training != "halving")
    (train_rungs if run.options.training == "halving" else train_converge)(run, entries)
    measure_finalists(run, entries)

    goal = run.goal
    pool = [m.to_dict() for m in run.measured]
    n_eval, z = len(run.evald), run.options.confidence_z
    choice = choose(pool, goal, tolerance(run, goal.bound), worse=lambda v: with_margin(v, goal.metric, n_eval, z))
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
