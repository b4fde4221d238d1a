"""Keyset pagination, newest first: ``page_token`` is an opaque cursor (created_at, id)."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import Select, and_, or_
from sqlalchemy.orm import Session

from .problems import FieldError, unprocessable

T = TypeVar("T")
MAX_PAGE_SIZE = 200


def encode_token(created_at: datetime, ident: str) -> str:
    raw = json.dumps([created_at.isoformat(), ident]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(token: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        created, ident = json.loads(raw)
        when = datetime.fromisoformat(created)
        if when.tzinfo is None or not isinstance(ident, str) or "\x00" in ident:
            raise ValueError
        when.astimezone(UTC)  # a forged offset near the calendar's ends overflows here, not in the database
        return when, ident
    except (ValueError, TypeError, OverflowError, json.JSONDecodeError):
        raise unprocessable(
            [FieldError(parameter="page_token", detail="not a page token from this API")]
        ) from None


def paginate(
    session: Session, stmt: Select[tuple[T]], entity: Any, page_size: int, page_token: str | None
) -> tuple[list[T], str | None]:
    """One page of ``stmt`` (which selects ``entity``), newest first, and the next token."""
    if page_token:
        created, ident = decode_token(page_token)
        stmt = stmt.where(
            or_(entity.created_at < created, and_(entity.created_at == created, entity.id < ident))
        )
    rows = list(
        session.scalars(stmt.order_by(entity.created_at.desc(), entity.id.desc()).limit(page_size + 1))
    )
    if len(rows) <= page_size:
        return rows, None
    last = rows[page_size - 1]
    return rows[:page_size], encode_token(last.created_at, last.id)
