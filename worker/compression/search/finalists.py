"""Measuring the finalists: each one's fp32 graph and its quantized twins (one per recipe), through
the pipeline's export, quantize and measure stages; an int8 twin slower than its fp32 twin is not
chosen unless only it meets the size cap; a quantization-aware twin when post-training int8 loses
the metric bound its fp32 meets and int8 would pay (always when the method is ``qat``)."""

from __future__ import annotations

import time
from pathlib import Path

from ..spec import QatConfig
from ..students.zoo import count_parameters
from ..types import Progress, no_progress
from .measure import Measured
from .recipes import qat_config_for
from .state import Entry, SearchState


def measure_finalists(s: SearchState, entries: list[Entry]) -> None:
    t0 = time.monotonic()
    finalists = [e for e in entries if e.status == "finalist"]

    def priority(e: Entry) -> tuple[bool, float, float]:
        meets = s.goal.metric_ok(e.metric)
        value = e.metric if e.metric is not None else float("-inf")
        return (not meets, (e.cost_ms or 0.0) if meets else 0.0, -value if s.goal.higher_is_better else value)

    finalists.sort(key=priority)
    for i, e in enumerate(finalists):
        if s.measured and s.out_of_time("measuring finalists"):
            e.status, e.reason = "not measured", "the time budget ran out before it was measured"
            continue
        s.tick(i, len(finalists), f"measuring {e.cand.name} ({i + 1}/{len(finalists)})")
        _measure_entry(s, e)
        e.status = "measured"
    if not s.measured:  # nothing at all: the teacher, so that the result still says something
        s.measured.append(s.teacher_row)
        s.teacher_row.notes.append("measured as the fallback: no candidate could be measured in time")
    s.phase_s["measure"] = time.monotonic() - t0


def _measure_entry(s: SearchState, e: Entry) -> None:
    folder = s.work / "candidates" / e.cand.name
    name = e.cand.name
    teacher = e.cand.is_teacher  # its fp32 graph was measured first thing
    if teacher:
        fp32, params = s.teacher_onnx, s.teacher_row.parameters
    else:
        assert e.student is not None
        fp32 = s.pipe.export(e.student.module, folder / "fp32.onnx")
        params = count_parameters(e.student.module)
    models: list[tuple[str, Path]] = [] if teacher else [("fp32", fp32)]
    for recipe, config in s.recipe_configs.items():
        if s.measured and s.out_of_time(f"quantizing {name}"):
            s.notes.append(f"{name}: {recipe} skipped, the time budget ran out")
            continue
        result = s.pipe.quantize(fp32, folder / f"{recipe}.onnx", config, score=False, progress=no_progress)
        models.append((recipe, Path(result.path)))
    measured = s.measure([p for _, p in models]) if models else []
    rows = [s.row(name, recipe, m, params, e) for (recipe, _), m in zip(models, measured, strict=True)]
    if teacher:
        rows.insert(0, s.teacher_row)
    fp32_row = rows[0]
    for row in rows[1:]:
        row.twin = fp32_row.name
        judge_twin(s, row, fp32_row)
    s.measured.extend(rows)
    if _wants_qat(s, e, rows) and not s.out_of_time(f"QAT of {name}"):
        _qat_twin(s, e, fp32_row, fp32, folder)


def judge_twin(s: SearchState, row: Measured, fp32_row: Measured) -> None:
    if row.latency_ms is None or fp32_row.latency_ms is None or row.latency_ms < fp32_row.latency_ms:
        return
    row.notes.append(f"slower than its fp32 twin at batch {s.goal.latency_batch}: {s.goal.latency_stat} "
                     f"{row.latency_ms:.4g} ms vs {fp32_row.latency_ms:.4g} ms")
    size_only = (s.goal.max_size_bytes is not None and not fp32_row.checks["size"]["met"]
                 and row.checks["size"]["met"])
    if size_only:
        row.notes.append("kept eligible: only it meets the size cap")
    else:
        row.eligible = False
        row.notes.append("fp32 kept")


def _wants_qat(s: SearchState, e: Entry, rows: list[Measured]) -> bool:
    if e.cand.is_teacher or e.student is None or s.train.input_kind == "tokens":
        return False
    if "static_int8" not in s.recipes:
        return False
    if isinstance(s.spec.quantization, QatConfig):
        return True
    fp32, quantized = rows[0], rows[1:]
    static = [r for r in quantized if r.recipe.startswith("static_int8")]
    if not static or not s.goal.metric_ok(fp32.value) or any(s.goal.metric_ok(r.value) for r in quantized):
        return False  # no static twin to train for, fp32 misses anyway, or some PTQ twin already keeps it
    pays = any(r.latency_ms is not None and fp32.latency_ms is not None and r.latency_ms < fp32.latency_ms
               for r in static)
    needs_size = "size" in fp32.checks and not fp32.checks["size"]["met"] and any(
        r.checks["size"]["met"] for r in static)
    return pays or needs_size


def _qat_twin(s: SearchState, e: Entry, fp32_row: Measured, fp32: Path, folder: Path) -> None:
    """The candidate quantized by ``qat`` through the pipeline (the float student fine-tuned under
    simulated int8 within the time left, then static int8), measured as its other twins."""
    assert e.student is not None
    config = qat_config_for(s.spec.quantization)

    def inner(p: Progress) -> None:
        s.tick(0, 1, f"QAT of {e.cand.name}, step {p.step}/{p.total}", loss=p.loss)

    t0 = time.monotonic()
    dspec = s.spec.distillation.model_copy(update={"time_budget_s": max(1.0, s.clock.left())})
    result = s.pipe.quantize(fp32, folder / "qat_int8.onnx", config, module=e.student.module, score=False,
                             workdir=folder, distillation=dspec, progress=inner)
    qat_s = time.monotonic() - t0
    (m,) = s.measure([Path(result.path)])
    row = s.row(e.cand.name, "qat_int8", m, fp32_row.parameters, e)
    row.train_s = round(row.train_s + qat_s, 3)
    row.twin = fp32_row.name
    row.notes.append(f"quantization-aware distillation: {config.qat_epochs} epoch(s), {qat_s:.1f} s")
    judge_twin(s, row, fp32_row)
    s.measured.append(row)
