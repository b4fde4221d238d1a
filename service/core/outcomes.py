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


def input_problem(exc: Exception) -> dict[str, Any]:
    return {
        "type": "about:blank",
        "title": "Invalid input",
        "status": 422,
        "code": getattr(exc, "code", "invalid_input"),
        "detail": str(exc),
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


def storage_problem(exc: OSError) -> dict[str, Any]:
    where = f" ({exc.filename})" if exc.filename else ""
    return {
        "type": "about:blank",
        "title": "Insufficient Storage",
        "status": 507,
        "code": "storage_full",
        "detail": f"the job's results could not be written: no space left on the device{where}; "
        "nothing of this job was kept; submit it again once space has been freed",
    }
