"""The webhook delivery loop (one pass every ``webhook_interval_s`` in each API process).

Why in the API process and not a Celery task: a delivery is an outbound HTTP call that may wait
``webhook_timeout_s`` on a slow receiver; on the ``validate`` queue it would make uploads wait
behind it, and the API already runs the relay, reaper and retention loops the same way, off the
request path (a worker thread). Deliveries are rows (`WebhookDelivery`), made in the transaction
that ends the job, so none is lost to a restart; several API replicas share the work: a pass
claims due rows with ``FOR UPDATE SKIP LOCKED`` and moves their ``next_attempt_at`` past the
attempt (a lease), so no two processes send the same attempt.

An attempt that gets a 2xx answer delivers; anything else (another status, a redirect, which is
never followed, a timeout, a refused target) is retried after ``webhook_backoff_s`` doubling up
to an hour, until ``webhook_retry_for_s`` (24 h) after the job ended; then the delivery is
``failed``. Every attempt is recorded (``GET /v1/jobs/{id}/deliveries``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta

import httpx
from sqlalchemy import select

from .db import Database
from .models import WebhookDelivery, utcnow
from .settings import Settings
from .webhooks import (
    EVENT_HEADER,
    ID_HEADER,
    TargetRefused,
    check_target,
    operator_key,
    secret_info,
    signature_headers,
    signing_secrets,
)

log = logging.getLogger(__name__)
BATCH = 50
PARALLEL = 8
MAX_BACKOFF_S = 3600.0
ERROR_CHARS = 300


@dataclass(frozen=True)
class Due:
    id: str
    job_id: str
    team_id: str
    url: str
    event: str
    created_at: datetime
    attempt: int


def backoff_s(settings: Settings, attempt: int) -> float:
    """The wait after failed attempt number ``attempt`` (1, 2, …)."""
    return min(settings.webhook_backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S)


def claim(db: Database, settings: Settings) -> list[Due]:
    now = utcnow()
    lease = timedelta(seconds=settings.webhook_timeout_s * 2 + 30)
    with db.write() as s:
        rows = s.scalars(
            select(WebhookDelivery)
            .where(WebhookDelivery.state == "pending", WebhookDelivery.next_attempt_at <= now)
            .order_by(WebhookDelivery.next_attempt_at)
            .limit(BATCH)
            .with_for_update(skip_locked=True)
        ).all()
        for row in rows:
            row.next_attempt_at = now + lease
        return [Due(r.id, r.job_id, r.team_id, r.url, r.event, r.created_at, len(r.attempts) + 1) for r in rows]


def attempt(db: Database, settings: Settings, due: Due, render: Callable[[str], bytes | None],
            client: httpx.Client) -> dict[str, object]:  # fmt: skip
    """Send once; the attempt's record (status, error, duration_ms, at)."""
    started, at = time.monotonic(), utcnow()
    status: int | None = None
    error: str | None = None
    try:
        body = render(due.job_id)
        if body is None:
            raise TargetRefused("the job no longer exists")
        target = check_target(due.url, settings.webhook_allow)
        with db.read() as s:
            info = secret_info(s, due.team_id)
        secrets_ = signing_secrets(operator_key(settings), due.team_id, info, at)
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "kdq-webhooks/1",
            "Host": target.host if target.port in (80, 443) else f"{target.host}:{target.port}",
            ID_HEADER: due.id,
            EVENT_HEADER: f"job.{due.event.lower()}",
            **signature_headers(body, secrets_, int(at.timestamp())),
        }
        extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
        r = client.post(target.pinned_url(), content=body, headers=headers, extensions=extensions)
        status = r.status_code
        if not 200 <= status < 300:
            error = f"HTTP {status}" + (" (redirects are not followed)" if 300 <= status < 400 else "")
    except TargetRefused as exc:
        error = str(exc)
    except httpx.HTTPError as exc:
        error = f"{type(exc).__name__}: {exc}"[:ERROR_CHARS] or type(exc).__name__
    ms = round((time.monotonic() - started) * 1000, 1)
    return {"at": at.isoformat(), "status": status, "error": error, "duration_ms": ms}


def record(db: Database, settings: Settings, due: Due, result: dict[str, object]) -> str:
    """Append the attempt; the delivery's state after it."""
    now = utcnow()
    with db.write() as s:
        row = s.get(WebhookDelivery, due.id, with_for_update=True)
        if row is None:
            return "gone"
        row.attempts = [*row.attempts, result]
        if result["error"] is None:
            row.state, row.finished_at, row.next_attempt_at = "delivered", now, None
        else:
            next_at = now + timedelta(seconds=backoff_s(settings, len(row.attempts)))
            if next_at - row.created_at > timedelta(seconds=settings.webhook_retry_for_s):
                row.state, row.finished_at, row.next_attempt_at = "failed", now, None
            else:
                row.next_attempt_at = next_at
        return row.state


def deliver_due(db: Database, settings: Settings, render: Callable[[str], bytes | None]) -> dict[str, str]:
    """One pass: send every delivery due now; {delivery id: its state after the attempt}."""
    due = claim(db, settings)
    if not due:
        return {}
    timeout = httpx.Timeout(settings.webhook_timeout_s)
    with httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False) as client:

        def one(d: Due) -> tuple[str, str]:
            result = attempt(db, settings, d, render, client)
            state = record(db, settings, d, result)
            if result["error"] is not None:
                log.info("webhook %s for job %s: attempt %d failed (%s); %s", d.id, d.job_id, d.attempt,
                         result["error"], state)  # fmt: skip
            return d.id, state

        with ThreadPoolExecutor(min(PARALLEL, len(due))) as pool:
            return dict(pool.map(one, due))
