"""A submitted job's labels and webhook, checked before the job is created."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import select

from ..core.models import Job
from ..core.webhooks import TargetRefused, check_target, secret_info
from .deps import Context
from .problems import FieldError, unprocessable
from .schemas import JobCreate, job_document


def job_labels(ctx: Context, req: JobCreate, team: str) -> dict[str, Any]:
    """The job row's ``name``, ``tags`` and ``notify``; a 422 when the webhook cannot be sent:
    its target is refused (`service.core.webhooks.check_target`), or the team has no signing
    secret yet (its receiver could not tell our deliveries from anyone's)."""
    notify = None
    if req.notify is not None:
        try:
            check_target(req.notify.url, ctx.settings.webhook_allow)
        except TargetRefused as exc:
            raise unprocessable([FieldError(pointer="#/notify/url", detail=str(exc))]) from None
        with ctx.db.read() as s:
            if secret_info(s, team) is None:
                detail = ("your team has no webhook secret yet: make one first (POST /v1/webhooks/secret, "
                          "or kdq webhooks secret), so your receiver can check that deliveries come from us")  # fmt: skip
                raise unprocessable([FieldError(pointer="#/notify", detail=detail)])
        notify = req.notify.model_dump(mode="json")
    return {"name": req.name, "tags": req.tags, "notify": notify}


def webhook_body(ctx: Context, job_id: str) -> bytes | None:
    """A webhook's body: the job as ``GET /v1/jobs/{id}`` shows it (None when it is gone)."""
    with ctx.db.read() as s:
        job = s.scalars(select(Job).where(Job.id == job_id)).one_or_none()
        return None if job is None else json.dumps(job_document(job), separators=(",", ":")).encode()
