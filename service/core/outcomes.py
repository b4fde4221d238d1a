"""What a job or an upload ends with, as stored on its row: the error documents (RFC 9457
problem bodies a client reads back) and JSON-safe values. Plain data: no FastAPI, no torch."""

from __future__ import annotations

import errno
import math
from typing import Any

WORKER_LOST = {"type": "about:blank", "title": "Worker lost", "status": 500, "code": "worker_lost"}


def internal_problem(what: str) -> dict[str, Any]:
    return {
        "type": "about:blank",
        "title": "Internal error",
        "status": 500,
        "code": "internal_error",
        "detail": f"{what} failed because of an internal error; it has been logged",
    }


def input_problem(detail: str, code: str | None = None) -> dict[str, Any]:
    """The upload or the spec is at fault (``code``: the engine's error code, e.g. ``invalid_dataset``)."""
    return {
        "type": "about:blank",
        "title": "Invalid input",
        "status": 422,
        "code": code or "invalid_input",
        "detail": detail,
    }


def resource_problem(which: str, allowed: str, what: str) -> dict[str, Any]:
    """A task went past one of its limits (``which``: memory, cpu, wall, scratch)."""
    hint = {
        "memory": "a smaller model, smaller batches or a smaller dataset fits",
        "cpu": "fewer epochs or a smaller model finishes sooner",
        "wall": "fewer epochs, a time budget (distillation.time_budget_s) or a smaller model finishes sooner",
        "scratch": "it wrote more files than its scratch space holds",
    }[which]
    return {
        "type": "about:blank",
        "title": "Resource limit",
        "status": 422,
        "code": "resource_limit",
        "limit": which,
        "detail": f"{what} went past its limit of {allowed} and was stopped; {hint}",
    }


def jsonable(value: Any) -> Any:
    """JSON-safe (Postgres JSONB rejects NaN): non-finite floats become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    if hasattr(value, "item"):  # numpy / torch scalars
        return jsonable(value.item())
    return str(value)


STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def storage_full(exc: BaseException) -> OSError | None:
    """The out-of-space error behind ``exc`` (itself, or a cause it was raised from), if any."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in STORAGE_ERRNOS:
            return current
        current = current.__cause__ or current.__context__
    return None


def storage_problem(filename: str | None = None) -> dict[str, Any]:
    where = f" ({filename})" if filename else ""
    return {
        "type": "about:blank",
        "title": "Insufficient Storage",
        "status": 507,
        "code": "storage_full",
        "detail": f"the job's results could not be written: no space left on the device{where}; "
        "nothing of this job was kept; submit it again once space has been freed",
    }
