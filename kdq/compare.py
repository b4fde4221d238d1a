"""Jobs side by side: each job's final model (metric, size, latency) read from its report."""

from __future__ import annotations

from typing import Any

from .models import Job


def _latency(row: dict[str, Any]) -> tuple[float | None, int | None]:
    """p50 in ms at the smallest batch measured, and that batch size."""
    batches = ((row.get("latency") or {}).get("batches")) or []
    if not batches:
        return None, None
    first = min(batches, key=lambda b: b.get("batch_size") or 0)
    return first.get("p50_ms"), first.get("batch_size")


def final_row(metrics: dict[str, Any]) -> dict[str, Any] | None:
    """The report's row of the model the job delivers (``summary.final``, else the last)."""
    rows = [r for r in metrics.get("models") or [] if isinstance(r, dict)]
    if not rows:
        return None
    final = (metrics.get("summary") or {}).get("final")
    return next((r for r in rows if r.get("name") == final), rows[-1])


def compare_row(job: Job, metrics: dict[str, Any] | None) -> dict[str, Any]:
    summary = job.summary or (metrics or {}).get("summary") or {}
    metric = summary.get("metric")
    out: dict[str, Any] = {"job_id": job.id, "name": job.name, "state": job.state, "metric": metric}
    row = final_row(metrics or {})
    teacher = next((r for r in (metrics or {}).get("models") or [] if r.get("name") == "teacher"), None)
    if row is not None:
        p50, batch = _latency(row)
        out.update(model=row.get("name"), value=(row.get("metric") or {}).get(metric),
                   size_bytes=row.get("size_bytes"), parameters=row.get("parameters"),
                   latency_p50_ms=p50, latency_batch=batch)  # fmt: skip
    if teacher is not None:
        out["teacher_value"] = (teacher.get("metric") or {}).get(metric)
        out["teacher_size_bytes"] = teacher.get("size_bytes")
    verdict = job.verdict
    if verdict:
        out["verdict"] = verdict.get("label") or verdict.get("verdict")
    return out
