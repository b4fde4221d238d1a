"""Logging for every kdq process: one handler on stderr, text or JSON lines
(``KDQ_LOG_FORMAT`` / ``--log-format``), each line carrying the job id and team where it has
one (`job_context`), and the chatty libraries (alembic, httpx, transformers, Celery's own
start-up) quiet unless asked for."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime

_JOB: ContextVar[str | None] = ContextVar("kdq_job", default=None)
_TEAM: ContextVar[str | None] = ContextVar("kdq_team", default=None)
QUIET = {
    "alembic": logging.WARNING,
    "httpx": logging.WARNING,
    "httpcore": logging.WARNING,
    "transformers": logging.ERROR,
    "huggingface_hub": logging.ERROR,
    "uvicorn.error": logging.WARNING,
    "celery.worker.consumer.connection": logging.WARNING,
    "celery.apps.worker": logging.WARNING,
}
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s%(where)s"


@contextmanager
def job_context(job_id: str | None, team: str | None = None) -> Iterator[None]:
    """Every line logged in this context (this thread or task) names the job and team."""
    job_token, team_token = _JOB.set(job_id), _TEAM.set(team)
    try:
        yield
    finally:
        _JOB.reset(job_token)
        _TEAM.reset(team_token)


class _Context(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        job = getattr(record, "job_id", None) or _JOB.get()
        team = getattr(record, "team", None) or _TEAM.get()
        record.job_id, record.team = job, team
        parts = [f"job {job}" if job else "", f"team {team}" if team else ""]
        record.where = f" [{', '.join(p for p in parts if p)}]" if job or team else ""
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("job_id", "team"):
            if getattr(record, key, None):
                line[key] = getattr(record, key)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def configure(log_format: str = "text", level: str | int = "INFO") -> None:
    """Replace the root logger's handlers with ours (idempotent)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_Context())
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level if isinstance(level, int) else level.upper())
    verbose = root.level <= logging.DEBUG
    for name, quiet in QUIET.items():
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else quiet)
