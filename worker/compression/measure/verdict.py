"""Which model a job delivers, and whether it is worth shipping.

Delivery: every model the job measured (the distilled student and the labels-only baseline, each
in fp32 and quantized) is a candidate; the candidates within ``tolerance`` of the best metric are
equally good, and among them the fastest at the evaluation batch wins (within ``SAME_SPEED`` of
it, the better metric, then the smaller file). So a job
never delivers a slower int8 because the spec named int8, nor a distilled student that lost to the
baseline trained on labels alone.

Verdict: ``ship``, ``ship_with_caution`` or ``do_not_ship``, the worst of its reasons' severities.
Every reason has a code a program reads (`REASONS`) and a sentence a person reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .metrics import higher_is_better

SHIP, CAUTION, DO_NOT_SHIP = "ship", "ship_with_caution", "do_not_ship"
SEVERITY_ORDER = (SHIP, CAUTION, DO_NOT_SHIP)
REASONS = {
    "at_chance": DO_NOT_SHIP,
    "worse_than_mean": DO_NOT_SHIP,
    "slower_than_teacher": DO_NOT_SHIP,
    "larger_than_teacher": DO_NOT_SHIP,
    "metric_drop_large": DO_NOT_SHIP,
    "metric_drop": DO_NOT_SHIP,
    "metric_drop_uncertain": CAUTION,
    "target_missed": CAUTION,
    "below_baseline": CAUTION,
    "int8_slower_than_fp32": CAUTION,
    "int8_larger_than_fp32": CAUTION,
    "int8_metric_drop": CAUTION,
    "unlabelled": CAUTION,
    "return_drop": CAUTION,
    "eval_is_training_data": CAUTION,
    "input_scale": CAUTION,
}
"""Reason code → severity. A metric further from the teacher's than the tolerance is not a replacement
for it: do not ship (``metric_drop``; ``metric_drop_large`` past 3× the tolerance). The int8 and
baseline reasons are cautions only: the better model was delivered instead, and the reason says so.
A drop past the tolerance by less than ``EVIDENCE_Z`` standard errors of the paired difference is
``metric_drop_uncertain``: a caution, not proof (the eval split is too small to tell)."""
DEFAULT_TOLERANCE = {"accuracy": 0.01, "macro_f1": 0.01, "cosine": 0.005, "mse": 0.10, "mae": 0.10, "r2": 0.01,
                     "auc": 0.005, "log_loss": 0.05, "entity_f1": 0.01}
"""A drop the job accepts without comment: 1 point of accuracy or F1 (entity F1 too), 0.005 of AUC, 10 % more
MSE or MAE, 5 % more log-loss."""
RELATIVE = ("mse", "mae", "log_loss")
LARGE = 3.0
"""A drop past this many tolerances is too large to ship."""
SAME_SPEED = 0.05
"""Delivery: latencies within this fraction of the fastest are a tie, and the better metric wins it (the
student and its labels-only baseline are twins whose timings differ by noise: a baseline 0.6 points
worse was delivered for being 2 % faster, and the verdict flipped to do_not_ship)."""
EVIDENCE_Z = 1.645
"""How many standard errors of the paired student-teacher difference a drop must clear the tolerance
by to count as one (one-sided 95 %). On 23 eval rows one flower is 4.3 points of accuracy, past 3×
the 1-point tolerance; on 120 images, 1.2 images are the tolerance."""


@dataclass
class Candidate:
    name: str
    """e.g. ``student int8``, ``baseline fp32``."""
    role: str
    """``student`` (distilled), ``baseline`` (labels only) or ``teacher``."""
    precision: str
    path: Path
    metrics: dict[str, Any]
    size_bytes: int
    latency: dict[str, Any]
    parameters: int | None = None

    @property
    def label(self) -> str:
        """For people: ``the distilled student (int8)``, ``the labels-only baseline (fp32)``."""
        who = {"student": "the distilled student", "baseline": "the labels-only baseline",
               "teacher": "the teacher"}.get(self.role, self.role)
        return f"{who} ({self.precision})"

    def value(self, metric: str) -> float | None:
        v = self.metrics.get(metric)
        return float(v) if isinstance(v, (int, float)) else None

    def p50(self, batch: int) -> float | None:
        for b in self.latency.get("batches", []):
            if int(b["batch"]) == batch:
                return float(b["p50_ms"])
        return None


def drop(metric: str, reference: float, value: float) -> float:
    """How much worse ``value`` is than ``reference`` (relative for MSE/MAE), ≥ 0 when worse."""
    if metric in RELATIVE:
        return (value - reference) / reference if reference > 0 else (0.0 if value <= reference else float("inf"))
    return reference - value if higher_is_better(metric) else value - reference


def choose(candidates: Sequence[Candidate], metric: str, tolerance: float, batch: int) -> tuple[Candidate, str]:
    """The candidate to deliver, and why (module doc)."""
    scored = [c for c in candidates if c.value(metric) is not None]
    if not scored:
        return candidates[0], "no candidate has a metric"
    sign = 1 if higher_is_better(metric) else -1
    best = max(scored, key=lambda c: sign * c.value(metric))  # type: ignore[operator]
    good = [c for c in scored if drop(metric, best.value(metric), c.value(metric)) <= tolerance]  # type: ignore[arg-type]

    def speed(c: Candidate) -> tuple[float, int]:
        return (c.p50(batch) if c.p50(batch) is not None else float("inf"), c.size_bytes)

    fastest = speed(min(good, key=speed))[0]
    tied = [c for c in good if speed(c)[0] <= fastest * (1 + SAME_SPEED)]  # twins differ by timing noise
    chosen = max(tied, key=lambda c: (sign * c.value(metric), -c.size_bytes))  # type: ignore[operator]
    tie = f" (latencies within {SAME_SPEED:.0%} of the fastest are a tie the better {metric} wins)" \
        if len(tied) > 1 else ""
    if chosen is best:
        why = f"it has the best {metric} ({_fmt(best.value(metric))})"
        if len(good) > 1:
            why += f" and is the fastest of the {len(good)} within tolerance at batch {batch}{tie}"
    else:
        why = (f"it is the fastest at batch {batch} ({_fmt(chosen.p50(batch))} ms) of the models whose {metric} is "
               f"within {tolerance:g} of the best ({best.name}: {_fmt(best.value(metric))}){tie}")
    return chosen, why


def verdict(delivered: Candidate, teacher: Candidate, candidates: Sequence[Candidate], *, metric: str,
            tolerance: float, batch: int, chance: float | None, labelled: bool,
            missed_targets: Sequence[str] = (), noise: float | None = None, eval_rows: int | None = None,
            eval_given: bool = True, eval_is_train: bool = False, input_hint: str | None = None,
            ) -> dict[str, Any]:  # fmt: skip
    """``{"verdict", "reasons": [{code, severity, message}], "delivered", "headline"}``.

    ``noise``: the standard error of the drop on these eval rows (``metrics.paired_drop_noise``);
    ``eval_given``: False when the eval rows were held out from the upload, where a teacher that
    trained on them scores optimistically (a drop's message says so); ``eval_is_train``: the eval
    dataset holds the training rows themselves (in-sample metrics); ``input_hint``: the teacher check's
    word on inputs of raw 0–255 values (`teacher_check`)."""
    reasons: list[dict[str, Any]] = []

    def reason(code: str, message: str) -> None:
        reasons.append({"code": code, "severity": REASONS[code], "message": message})

    value, ref = delivered.value(metric), teacher.value(metric)
    if metric == "accuracy" and chance is not None and value is not None and value <= chance + 0.02:
        reason("at_chance", f"its accuracy {value:.3f} is no better than chance ({chance:.3f})")
    if delivered.value("r2") is not None and delivered.value("r2") <= 0:  # type: ignore[operator]
        reason("worse_than_mean", f"its R² is {delivered.value('r2'):.3f}: no better than predicting the mean")
    if value is not None and ref is not None:
        _metric_drop(metric, drop(metric, ref, value), value, ref, tolerance, noise, eval_rows, eval_given, reason)
    dp, tp = delivered.p50(batch), teacher.p50(batch)
    if dp is not None and tp is not None and dp >= tp:
        reason("slower_than_teacher", f"at batch {batch} it takes {dp:.3g} ms, the teacher {tp:.3g} ms")
    if delivered.size_bytes >= teacher.size_bytes:
        reason("larger_than_teacher", f"its file is {delivered.size_bytes:,} B, the teacher's {teacher.size_bytes:,} B")
    _compared_forms(delivered, candidates, metric, tolerance, batch, reason)
    for target in missed_targets:
        reason("target_missed", f"it misses the target {target}")
    if not labelled:
        reason("unlabelled", "the data has no labels: every metric is agreement with the teacher, not accuracy")
    if eval_is_train:
        reason("eval_is_training_data", "the eval dataset is the training dataset: every metric is in-sample "
                                        "(on rows the student trained on) and overstates how it does on new data; "
                                        "give rows it never saw as the eval dataset, or none to hold rows out")
    if input_hint:
        reason("input_scale", input_hint)
    worst = max((SEVERITY_ORDER.index(r["severity"]) for r in reasons), default=0)
    return {"verdict": SEVERITY_ORDER[worst], "reasons": reasons,
            "delivered": {"name": delivered.name, "role": delivered.role, "precision": delivered.precision,
                          "label": delivered.label},
            "headline": headline(delivered, teacher, metric, batch, SEVERITY_ORDER[worst])}


def _metric_drop(metric: str, d: float, value: float, ref: float, tolerance: float, noise: float | None,
                 rows: int | None, eval_given: bool, reason: Any) -> None:
    """The drop's reason, if any: ``metric_drop_large`` / ``metric_drop`` when the drop clears 3× / 1×
    the tolerance by ``EVIDENCE_Z`` standard errors, ``metric_drop_uncertain`` when only the raw drop
    is past the tolerance."""
    if d <= tolerance:
        return
    unit = " relative" if metric in RELATIVE else ""
    sure = d - EVIDENCE_Z * noise if noise is not None else d
    on = f" on {rows:,} eval rows" if rows else ""
    plus = f" (± {_fmt(noise)} standard error{on})" if noise is not None else ""
    where = "" if eval_given else (
        "; these rows were held out from the uploaded data: if the teacher trained on them its score there is "
        "optimistic, so give rows it never saw as the eval dataset for a fair comparison")
    head = f"its {metric} {_fmt(value)} is {_fmt(d)}{unit} worse than the teacher's {_fmt(ref)}"
    if sure > LARGE * tolerance:
        reason("metric_drop_large", f"{head} (more than {LARGE:g}× the tolerance {tolerance:g}){plus}{where}")
    elif sure > tolerance:
        reason("metric_drop", f"{head}{plus}{where}")
    else:
        reason("metric_drop_uncertain", f"{head}{on}: past the tolerance {tolerance:g}, but within the noise of so "
                                        f"few rows (± {_fmt(noise)} standard error); a larger eval set would tell{where}")


def _compared_forms(delivered: Candidate, candidates: Sequence[Candidate], metric: str, tolerance: float,
                    batch: int, reason: Any) -> None:  # fmt: skip
    """The cautions about what was not delivered: a distilled student that lost to its baseline, an
    int8 model slower, larger or worse than its own fp32 graph."""
    by = {(c.role, c.precision): c for c in candidates}
    students = [c for c in candidates if c.role == "student"]
    baselines = [c for c in candidates if c.role == "baseline"]
    if students and baselines:
        def score(c: Candidate) -> float:
            v = c.value(metric)
            return -float("inf") if v is None else (v if higher_is_better(metric) else -v)

        best_student, best_base = max(students, key=score), max(baselines, key=score)
        sv, bv = best_student.value(metric), best_base.value(metric)
        if sv is not None and bv is not None and drop(metric, bv, sv) > tolerance:
            reason("below_baseline", f"distillation did not pay: the student's best {metric} {_fmt(sv)} is below the "
                                     f"labels-only baseline's {_fmt(bv)}" + (
                                         "; the baseline was delivered" if delivered.role == "baseline" else ""))
    for role in ("student", "baseline"):
        fp32, q = by.get((role, "fp32")), by.get((role, "int8"))
        if fp32 is None or q is None or (role == "baseline" and delivered.role != "baseline"):
            continue
        fp, qp = fp32.p50(batch), q.p50(batch)
        if fp is not None and qp is not None and qp >= fp:
            reason("int8_slower_than_fp32", f"the {role}'s int8 graph takes {qp:.3g} ms at batch {batch}, its fp32 "
                                            f"graph {fp:.3g} ms" + (
                                                "; fp32 was delivered" if delivered is fp32 else ""))
        qv, fv = q.value(metric), fp32.value(metric)
        if qv is not None and fv is not None and drop(metric, fv, qv) > tolerance:
            reason("int8_metric_drop", f"the {role}'s int8 graph scores {metric} {_fmt(qv)} against its fp32 graph's "
                                       f"{_fmt(fv)}: quantization costs too much" + (
                                           "; fp32 was delivered" if delivered is fp32 else ""))
        if q.size_bytes >= fp32.size_bytes:
            reason("int8_larger_than_fp32", f"the {role}'s int8 file is {q.size_bytes:,} B, its fp32 file "
                                            f"{fp32.size_bytes:,} B")


def headline(delivered: Candidate, teacher: Candidate, metric: str, batch: int, verdict: str = SHIP) -> str:
    """One line: what to deploy (or, when it should not ship, the best there is), how much smaller and
    faster, what it costs."""
    parts = [f"deploy {delivered.label}" if verdict != DO_NOT_SHIP else f"do not ship: the best is {delivered.label}"]
    if delivered.size_bytes:
        parts.append(f"{teacher.size_bytes / delivered.size_bytes:.1f}× smaller")
    dp, tp = delivered.p50(batch), teacher.p50(batch)
    if dp and tp:
        parts.append(f"{tp / dp:.1f}× faster at batch {batch}")
    value, ref = delivered.value(metric), teacher.value(metric)
    if value is not None and ref is not None:
        parts.append(f"{metric} {_fmt(value)} vs the teacher's {_fmt(ref)}")
    return ", ".join(parts)


def tolerance_for(metric: str, max_metric_drop: float | None = None) -> float:
    return max_metric_drop if max_metric_drop is not None else DEFAULT_TOLERANCE.get(metric, 0.01)


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.4g}"
