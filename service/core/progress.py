"""A job's progress, recorded from the engine's callback as job_event rows without ever making
the engine wait for the database (`ProgressRecorder`)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from sqlalchemy import update

from .db import Database
from .dberrors import database_unavailable
from .lifecycle import Fence, owner
from .models import Job, JobEvent, utcnow
from .outcomes import jsonable

log = logging.getLogger(__name__)


class ProgressRecorder:
    """The engine's progress callback: records progress at most every ``interval`` seconds, but
    always the first and last report of each stage, as job_event rows. A report's message (the
    engine may put one on every training step) rides with the report: the latest one not yet
    written becomes a ``log`` row when a report is handed over, so messages are throttled with
    the reports and never fill the table with steps; `log` lines are always written.

    The engine never waits for the database: reports are handed to a writer thread, which
    writes at most once every ``interval``, everything handed over since its last write in
    one transaction (the database's load does not grow with the number of stages or log
    lines). Before the final transition, `take` (the rows go in that transaction) or `flush`
    (writes now, returns once written), so the events keep their order; `close` at the end.
    An error the writer meets is raised in the engine's thread at its next report.

    Each write is fenced (`Fence`); a database that is briefly away only delays the rows (they
    are kept and written with the next write) instead of stopping the job."""

    def __init__(self, db: Database, job_id: str, interval: float, fence: Fence | None = None) -> None:
        self.db, self.job_id, self.interval = db, job_id, interval
        self.fence = fence or Fence(job_id, None)
        self.stage: str | None = None
        self.pending: Any = None
        self.logs: list[dict[str, Any]] = []
        self.message: dict[str, Any] | None = None
        """The latest report's message not yet handed over (written with the next handoff)."""
        self.last_handoff = 0.0
        self.database_away = False
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._batch: list[tuple[Any, list[dict[str, Any]]]] = []
        """(progress or None, log lines) handed over and not yet written, oldest first."""
        self._writing = threading.Lock()  # one write at a time, batches in the order handed over
        self._writer: threading.Thread | None = None
        self._closed = False
        self._error: BaseException | None = None

    def __call__(self, p: Any) -> None:
        self._raise_writer_error()
        with self._lock:
            first = p.stage != self.stage
            if first:
                self._handoff()  # the last report of the previous stage, before this one's lines
                self.stage = p.stage
            if p.message:
                self.message = {"stage": p.stage, "message": p.message}
            self.pending = p
            if first or time.monotonic() - self.last_handoff >= self.interval:
                self._handoff()

    def log(self, message: str, **data: Any) -> None:
        self._raise_writer_error()
        with self._lock:
            self._take_message()  # (an earlier report's message comes before this line)
            self.logs.append({"stage": self.stage, "message": message, **data})
            self._handoff()

    def flush(self) -> None:
        """Write everything reported so far and return once it is written (or kept for later,
        when the database is away)."""
        with self._lock:
            self._handoff()
        self._drain()

    def take(self) -> list[tuple[str, dict[str, Any]]]:
        """Everything reported and not yet written, as (kind, data) rows, for the caller to write
        itself (with the final transition, `finish`); nothing is written here after that."""
        with self._writing:
            with self._lock:
                self._handoff()
                batch, self._batch = self._batch, []
                self._closed = True
                self._wake.notify()
            if self.fence.lost.is_set():
                return []
            return [(row.kind, row.data) for row in self._rows(batch)[1]]

    def close(self) -> None:
        """Write what is left, then stop the writer thread."""
        with self._lock:
            self._handoff()
            self._closed = True
            self._wake.notify()
        if self._writer is not None:
            self._writer.join()

    def _handoff(self) -> None:
        """(lock held) Hand the pending report and log lines to the writer thread."""
        self._take_message()
        if (self.pending is None and not self.logs) or self.fence.lost.is_set() or self._closed:
            return
        self._batch.append((self.pending, self.logs))
        self.pending, self.logs = None, []
        self.last_handoff = time.monotonic()
        if self._writer is None:
            self._writer = threading.Thread(target=self._run, daemon=True, name=f"progress-{self.job_id}")
            self._writer.start()
        self._wake.notify()

    def _take_message(self) -> None:
        if self.message is not None:
            self.logs.append(self.message)
            self.message = None

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._closed and not self._batch:
                    self._wake.wait()
                if self._closed and not self._batch:
                    return
            try:
                self._drain()
            except BaseException as exc:  # raised in the engine's thread at its next report
                self._error = exc
                return
            with self._lock:
                if self._closed and (self.database_away or not self._batch):
                    return  # (what the database did not take ends with the attempt)
                # at most one write per interval: what is handed over meanwhile goes in the next
                deadline = time.monotonic() + self.interval
                while not self._closed and (left := deadline - time.monotonic()) > 0:
                    self._wake.wait(left)

    def _drain(self) -> None:
        with self._writing:
            with self._lock:
                batch, self._batch = self._batch, []
            if not batch or self.fence.lost.is_set():
                return
            try:
                self._write(batch)
                if self.database_away:
                    log.info("job %s: the database is back; progress is written again", self.job_id)
                self.database_away = False
            except Exception as exc:
                if not database_unavailable(exc):
                    raise
                if not self.database_away:
                    log.warning("job %s: progress kept for later, the database is unavailable (%s)",
                                self.job_id, type(exc).__name__)  # fmt: skip
                self.database_away = True
                with self._lock:  # written with the next write, throttled reports folded together
                    self._batch = fold(batch + self._batch)

    def _raise_writer_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _write(self, batch: list[tuple[Any, list[dict[str, Any]]]]) -> None:
        values, rows = self._rows(batch)
        with self.db.write() as s:
            if s.execute(update(Job).where(*self.fence.where()).values(**values)).rowcount != 1:
                self.fence.lose(*owner(s, self.job_id), "progress")
                return
            s.add_all(rows)

    def _rows(self, batch: list[tuple[Any, list[dict[str, Any]]]]) -> tuple[dict[str, Any], list[JobEvent]]:
        """The job's new column values and the event rows for a batch."""
        now = utcnow()
        values: dict[str, Any] = {"heartbeat_at": now, "updated_at": now}
        rows: list[JobEvent] = []
        for p, logs in batch:
            rows += [JobEvent(job_id=self.job_id, kind="log", data=entry, created_at=now) for entry in logs]
            if p is None:
                continue
            data = jsonable(
                {
                    "stage": p.stage,
                    "step": p.step,
                    "total": p.total,
                    "fraction": p.fraction,
                    "loss": p.loss,
                    "metric": p.metric,
                    "eta_s": p.eta_s,
                }
            )
            values |= {
                "stage": p.stage,
                "progress_step": p.step,
                "progress_total": p.total,
                "eta_s": data["eta_s"],
            }
            rows.append(JobEvent(job_id=self.job_id, kind="progress", data=data, created_at=now))
        return values, rows


def fold(batch: list[tuple[Any, list[dict[str, Any]]]]) -> list[tuple[Any, list[dict[str, Any]]]]:
    """Reports kept while the database is away, with each run of one stage's reports folded into
    its last (every log line stays), so the backlog stays small however long the wait."""
    out: list[tuple[Any, list[dict[str, Any]]]] = []
    for p, logs in batch:
        if out and (out[-1][0] is None or (p is not None and out[-1][0].stage == p.stage)):
            prev, prev_logs = out[-1]
            out[-1] = (p if p is not None else prev, prev_logs + logs)
        else:
            out.append((p, logs))
    return out


STAGE_PLANS: dict[str, list[tuple[str, float]]] = {
    "single": [("load", 3), ("distill", 55), ("baseline", 10), ("qat", 5), ("quantize", 4), ("quantizing", 1),
               ("sensitivity", 4), ("fallback", 2), ("export", 4), ("evaluate", 8), ("report", 4)],
    "search": [("load", 2), ("export", 2), ("search", 86), ("evaluate", 6), ("report", 4)],
}  # fmt: skip
"""A job's stages in order with their share of its time (rough, measured on the small jobs of the
tests), from which one overall fraction is shown: `overall`."""


def plan_of(spec: dict[str, Any] | None) -> str:
    """``search`` for a job with targets (or a ``search`` student), else ``single``."""
    spec = spec or {}
    student = spec.get("student") or {}
    return "search" if spec.get("targets") or student.get("kind") == "search" else "single"


def overall(plan: str, stage: str | None, fraction: float) -> float | None:
    """The job's overall fraction done (0..1) in ``stage`` at ``fraction`` of it; None for a stage
    the plan does not know (clients then keep the last value they showed)."""
    stages = STAGE_PLANS.get(plan, STAGE_PLANS["single"])
    total = sum(w for _, w in stages)
    before = 0.0
    for name, weight in stages:
        if name == stage:
            return round(min(1.0, (before + weight * max(0.0, min(1.0, fraction))) / total), 4)
        before += weight
    return None
