"""What can go wrong, each with the exit status the ``kdq`` command gives it.

0 done; 1 the job failed or was cancelled (`JobFailed`); 2 the service refused a request or an
upload is invalid (`Refused`, `UploadInvalid`; the problem says which field); 3 the service could
not be reached (`Unreachable`); ``kdq compress`` also exits 4 when the job succeeded with the verdict
do_not_ship (`kdq.cli.compress`). The SDK raises the same errors, so a script can exit with
``err.exit_code`` and behave like the command.
"""

from __future__ import annotations

import json
from typing import Any

import httpx


class KdqError(Exception):
    exit_code = 2

    def __init__(self, message: str, problem: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.problem: dict[str, Any] = problem or {"title": type(self).__name__, "detail": message}

    def as_json(self) -> dict[str, Any]:
        """The error as the command prints it on stdout."""
        return {"error": {**self.problem, "exit_code": self.exit_code}}


class Refused(KdqError):
    """The service answered with a problem (4xx or 5xx)."""

    def __init__(self, status: int, problem: dict[str, Any], message: str) -> None:
        super().__init__(message, problem)
        self.status = status

    @classmethod
    def of(cls, r: httpx.Response) -> Refused:
        try:
            body = r.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            text = r.text[:500] if body is None else json.dumps(body)[:500]
            body = {"status": r.status_code, "title": r.reason_phrase, "detail": text}
        return cls(r.status_code, body, describe(r.status_code, body))


class UploadInvalid(KdqError):
    """An upload the validation worker found unusable (``problem`` says why)."""


class Unreachable(KdqError):
    exit_code = 3


class JobFailed(KdqError):
    """A job that ended FAILED or CANCELLED (``job`` is its document)."""

    exit_code = 1

    def __init__(self, job: Any) -> None:
        error = dict(job.error or {}) if getattr(job, "error", None) else {}
        detail = error.get("detail") or ("cancelled" if job.state == "CANCELLED" else "no reason given")
        super().__init__(f"job {job.id} {job.state}: {detail}",
                         {"title": error.get("title", job.state), **error, "detail": detail})  # fmt: skip
        self.job = job

    def as_json(self) -> dict[str, Any]:
        return {"job_id": self.job.id, "state": self.job.state, **super().as_json()}


def describe(status: int, body: dict[str, Any]) -> str:
    """A problem as one readable block: status, title, detail, and each bad field."""
    head = f"HTTP {status} {body.get('title', '')}: {body.get('detail', '')}".rstrip(": ")
    lines = [head]
    for error in body.get("errors") or []:
        where = error.get("pointer") or error.get("parameter") or ""
        lines.append(f"  {where}: {error.get('detail', '')}")
    return "\n".join(lines)
