"""The auto student, timed against the teacher before any training (issue 13).

A parameter budget says little about speed once convolutions or attention are involved: a CNN
teacher whose parameters sit in a dense head computes little per parameter, and a student CNN with a
quarter of those parameters spread over wide convolutions at full resolution can be *slower* than
it. So for image, signal and token teachers the auto student is timed first: its fp32 ONNX graph
(random weights: speed does not depend on them) against the teacher's, with onnxruntime at the
evaluation batch, in alternating rounds so both see the same machine load. While it is not clearly
faster (`FASTER`), the budget shrinks (`SHRINK`) and the next student is timed, at most `MAX_TRIES`
students. If none is clearly faster, the fastest is kept,
unless it is barely faster than the first: then shrinking buys nothing (the time is onnxruntime's
fixed cost, not the model's) and the widest keeps its accuracy. Vector (MLP) students are not timed:
their cost follows their parameter count.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import SpecError
from ..types import Teacher
from .student import Student

FASTER = 0.95
"""A student is fast enough when it takes at most this share of the teacher's time (the margin keeps
a student that only ties the teacher from being called faster by timing noise)."""
SHRINK = 0.5
"""Each next student's parameter budget, as a share of the one before's parameters."""
MAX_TRIES = 5
WORTH_SHRINKING = 0.9
"""When no student is fast enough, a narrower one is kept only if it takes at most this share of the
first one's time."""
TIMED_KINDS = frozenset({"image", "signal", "tokens"})


@dataclass
class SpeedFit:
    """The chosen student, the budget it was built for, and the timings behind the choice."""

    student: Student
    budget: int
    record: dict[str, Any] = field(default_factory=dict)


def needs_timing(teacher: Teacher) -> bool:
    """Whether an auto student for ``teacher`` is timed before training (module doc)."""
    return teacher.input_kind in TIMED_KINDS


def fit_speed(build: Callable[[int], Student], budget: int, timings: Callable[[Student], tuple[float, float]],
              batch: int) -> SpeedFit:
    """The first student, from ``budget`` down, that takes at most `FASTER` × the teacher's time at ``batch``.

    ``build(budget)`` makes the student for a budget (raising `SpecError` when none fits);
    ``timings`` times one against the teacher: (student p50, teacher p50) in ms, measured together.
    The record lists every student tried, for the report.
    """
    tried: list[dict[str, Any]] = []
    widest: tuple[Student, int] | None = None
    latest: tuple[Student, int] | None = None  # only these two are kept; the rest are freed
    chosen: int | None = None
    b = budget
    for _ in range(MAX_TRIES):
        try:
            student = build(b)
        except SpecError:
            break
        if latest is not None and student.num_parameters >= latest[0].num_parameters:
            break  # nothing smaller is built for a smaller budget
        ms, teacher_ms = (float(t) for t in timings(student))
        tried.append({"budget": b, "parameters": student.num_parameters, "p50_ms": round(ms, 4),
                      "teacher_p50_ms": round(teacher_ms, 4), "description": student.description})
        latest = (student, b)
        widest = widest or latest
        if ms <= FASTER * teacher_ms:
            chosen = len(tried) - 1
            break
        b = max(1, int(min(b, student.num_parameters) * SHRINK))
    if widest is None or latest is None:
        raise SpecError(f"no auto student fits {budget:,} parameters; raise the budget")
    teacher_ms = statistics.median(t["teacher_p50_ms"] for t in tried)
    last = len(tried) - 1
    if chosen is not None:
        why = (f"it takes {tried[chosen]['p50_ms']:.3g} ms at batch {batch}, the teacher "
               f"{tried[chosen]['teacher_p50_ms']:.3g} ms"
               + (f"; {chosen} wider student(s) were not faster than {FASTER:g}× the teacher" if chosen else ""))
    else:
        fastest = min(range(len(tried)), key=lambda i: tried[i]["p50_ms"])
        chosen = last if fastest == last and tried[last]["p50_ms"] <= WORTH_SHRINKING * tried[0]["p50_ms"] else 0
        why = (f"no student tried was faster than {FASTER:g}× the teacher ({teacher_ms:.3g} ms at batch {batch}); "
               + ("the narrowest is the fastest" if chosen else "narrower ones were not faster, so the widest is kept"))
    student, b = latest if chosen == last else widest
    record = {"by": "onnxruntime fp32 p50 before training", "batch": batch, "teacher_p50_ms": round(teacher_ms, 4),
              "faster_than": FASTER, "tried": tried, "chosen": chosen, "why": why}
    return SpeedFit(student, b, record)
