"""Names and tags of jobs and uploads, and the list filters that use them.

A tag is a short word a team chooses (``team:vision``, ``nightly``, ``v2.1``); a job or an upload
has up to `MAX_TAGS`. Lists filter by state, name prefix, tags (all given must be present),
teacher and creation time, and page with the same cursors whatever the filter
(`service.api.pagination`: newest first, by creation time and id).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any

from fastapi import Query
from pydantic import AfterValidator, BeforeValidator, Field
from sqlalchemy import Select

from .problems import FieldError, unprocessable

MAX_TAGS = 20
TAG_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/=+-]{0,63}$"


def _split(value: Any) -> Any:
    """Form fields are text: accept ``a,b``, ``["a", "b"]`` or a list."""
    if isinstance(value, str):
        value = value.strip()
        if value.startswith("["):
            return json.loads(value)
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def _unique(tags: list[str]) -> list[str]:
    return list(dict.fromkeys(tags))


Tag = Annotated[str, Field(pattern=TAG_PATTERN, description="letters, digits and . _ : / = + - (64 at most)")]
Tags = Annotated[list[Tag], BeforeValidator(_split), AfterValidator(_unique), Field(max_length=MAX_TAGS)]
Name = Annotated[str, Field(min_length=1, max_length=255)]


class ListFilters:
    """The query parameters every list shares (a FastAPI dependency)."""

    def __init__(
        self,
        name: Annotated[str | None, Query(max_length=255, description="names starting with this")] = None,
        tag: Annotated[list[str] | None, Query(max_length=MAX_TAGS, description="has every tag given")] = None,
        created_after: Annotated[datetime | None, Query(description="created at or after (ISO 8601)")] = None,
        created_before: Annotated[datetime | None, Query(description="created before (ISO 8601)")] = None,
    ) -> None:
        for when, param in ((created_after, "created_after"), (created_before, "created_before")):
            if when is not None and when.tzinfo is None:
                raise unprocessable([FieldError(parameter=param, detail="give a time zone (Z or +hh:mm)")])
        self.name, self.tags = name, tag or []
        self.created_after, self.created_before = created_after, created_before

    def apply(self, stmt: Select[Any], table: Any) -> Select[Any]:
        if self.name:
            stmt = stmt.where(table.name.startswith(self.name, autoescape=True))
        if self.tags:
            stmt = stmt.where(table.tags.contains(self.tags))
        if self.created_after is not None:
            stmt = stmt.where(table.created_at >= self.created_after)
        if self.created_before is not None:
            stmt = stmt.where(table.created_at < self.created_before)
        return stmt


class JobFilters(ListFilters):
    """`ListFilters` plus the job's uploads."""

    def __init__(
        self,
        name: Annotated[str | None, Query(max_length=255, description="names starting with this")] = None,
        tag: Annotated[list[str] | None, Query(max_length=MAX_TAGS, description="has every tag given")] = None,
        created_after: Annotated[datetime | None, Query(description="created at or after (ISO 8601)")] = None,
        created_before: Annotated[datetime | None, Query(description="created before (ISO 8601)")] = None,
        teacher: Annotated[str | None, Query(max_length=40, description="the teacher's model id")] = None,
        dataset: Annotated[str | None, Query(max_length=40, description="the dataset's id")] = None,
    ) -> None:
        super().__init__(name, tag, created_after, created_before)
        self.teacher, self.dataset = teacher, dataset

    def apply(self, stmt: Select[Any], table: Any) -> Select[Any]:
        stmt = super().apply(stmt, table)
        if self.teacher:
            stmt = stmt.where(table.teacher_model_id == self.teacher)
        if self.dataset:
            stmt = stmt.where(table.dataset_id == self.dataset)
        return stmt
