"""``/v1/me`` (who a key is) and ``/v1/webhooks/secret`` (the team's webhook signing secret),
and ``/v1/jobs/{id}/deliveries`` (a job's webhook attempts)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from ...core.models import WebhookDelivery
from ...core.quotas import usage_of
from ...core.webhooks import (
    PREVIOUS_SECRET_VALID,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    rotate_secret,
    secret_info,
)
from ..deps import PROTECTED, Auth, Ctx, blocking
from ..problems import AUTH_RESPONSES, ProblemError, responses
from .jobs import load_job

router = APIRouter(prefix="/v1", dependencies=PROTECTED, responses=AUTH_RESPONSES)


class Usage(BaseModel):
    stored_bytes: int
    """Models, datasets and artifacts the team stores (each upload as listed)."""
    max_stored_bytes: int
    unfinished_jobs: int
    """Queued, running or cancelling."""
    max_unfinished_jobs: int
    max_submissions_per_minute: int
    job_time_budget_s: float
    """The most training time one of the team's jobs gets (``distillation.time_budget_s`` below it wins)."""

    model_config = ConfigDict(use_attribute_docstrings=True)


class Me(BaseModel):
    team_id: str
    """The team this key acts for (what it creates belongs to this team)."""
    scope: Literal["team", "admin"]
    """``admin`` keys read every team's resources."""
    auth: Literal["keys", "none"]
    """``none``: the service runs without keys (a local ``kdq serve --no-auth``)."""
    usage: Usage
    """The team's use of its quotas."""

    model_config = ConfigDict(use_attribute_docstrings=True)


class WebhookSecret(BaseModel):
    model_config = ConfigDict(use_attribute_docstrings=True)

    version: int
    rotated_at: datetime
    secret: str | None = None
    """Only in the answer that made it: keep it where your receiver can read it."""
    signature_header: str = SIGNATURE_HEADER
    timestamp_header: str = TIMESTAMP_HEADER
    previous_valid_until: datetime | None = None
    """Deliveries are signed with the previous secret too until then (a rotation's overlap)."""


class DeliveryOut(BaseModel):
    model_config = ConfigDict(from_attributes=True, use_attribute_docstrings=True)

    id: str
    url: str
    event: str
    state: Literal["pending", "delivered", "failed"]
    attempts: list[dict[str, Any]] = Field(description="at, status, error, duration_ms of each attempt")
    next_attempt_at: datetime | None
    created_at: datetime
    finished_at: datetime | None


class DeliveryList(BaseModel):
    items: list[DeliveryOut]


@router.get("/me", response_model=Me, tags=["account"], summary="Who this key is, and its team's usage",
            operation_id="get_me")  # fmt: skip
@blocking
def get_me(ctx: Ctx, who: Auth) -> Me:
    with ctx.db.read() as s:
        usage = usage_of(s, ctx.settings, who.team_id)
    return Me(team_id=who.team_id, scope=who.scope, auth=ctx.settings.auth, usage=Usage(**usage))


def _secret_out(info: Any) -> WebhookSecret:
    until = info.rotated_at + PREVIOUS_SECRET_VALID if info.version > 1 else None
    return WebhookSecret(version=info.version, rotated_at=info.rotated_at, secret=info.secret,
                         previous_valid_until=until)  # fmt: skip


@router.get(
    "/webhooks/secret",
    response_model=WebhookSecret,
    tags=["webhooks"],
    summary="The team's webhook secret (its version; never the secret)",
    responses=responses(404),
    operation_id="get_webhook_secret",
)
@blocking
def get_webhook_secret(ctx: Ctx, who: Auth) -> WebhookSecret:
    with ctx.db.read() as s:
        info = secret_info(s, who.team_id)
    if info is None:
        raise ProblemError(404, "your team has no webhook secret yet: POST /v1/webhooks/secret makes one",
                           code="not_found")  # fmt: skip
    return _secret_out(info)


@router.post(
    "/webhooks/secret",
    status_code=201,
    response_model=WebhookSecret,
    tags=["webhooks"],
    summary="Make or rotate the team's webhook secret (shown once)",
    operation_id="rotate_webhook_secret",
)
@blocking
def post_webhook_secret(ctx: Ctx, who: Auth, response: Response) -> WebhookSecret:
    """The new secret is in this answer only. After a rotation, deliveries carry a signature with
    the previous secret too for a day, so receivers can switch without losing any."""
    with ctx.db.write() as s:
        info = rotate_secret(s, ctx.settings, who.team_id)
    response.headers["Cache-Control"] = "no-store"
    return _secret_out(info)


@router.get(
    "/jobs/{job_id}/deliveries",
    response_model=DeliveryList,
    tags=["webhooks"],
    summary="A job's webhook deliveries and their attempts",
    responses=responses(404),
    operation_id="list_deliveries",
)
@blocking
def list_deliveries(job_id: str, ctx: Ctx, who: Auth) -> DeliveryList:
    with ctx.db.read() as s:
        load_job(s, job_id, who)
        rows = s.scalars(
            select(WebhookDelivery).where(WebhookDelivery.job_id == job_id).order_by(WebhookDelivery.created_at)
        ).all()
        return DeliveryList(items=[DeliveryOut.model_validate(r) for r in rows])
