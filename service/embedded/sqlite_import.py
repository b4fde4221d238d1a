"""Copy a data dir made by the SQLite-based kdq of before into PostgreSQL (``kdq migrate
--from-sqlite``; `kdq serve` does it by itself when it finds one).

Teams, API keys, uploads, jobs (with their events) and artifacts are copied row by row, in
foreign-key order, through the current tables' own column types; the blobs stay where they are
(``store/``, the same content-addressed layout). Rows already present are left alone, so a copy
that was interrupted can simply run again. Afterwards:

* QUEUED jobs lose their outbox mark, so the relay sends them to Redis (the SQLite broker's
  messages are not copied); RUNNING ones are taken over by the reaper, as after any lost worker;
* validating uploads are sent for validation again by the relay.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from sqlalchemy import MetaData, create_engine, func, select, text, update
from sqlalchemy.dialects.postgresql import insert

from ..core.models import (
    ApiKey,
    Artifact,
    DatasetUpload,
    IdempotencyKey,
    Job,
    JobEvent,
    ModelUpload,
    Team,
)
from .layout import Layout

log = logging.getLogger("kdq.serve")
TABLES = [Team, ApiKey, ModelUpload, DatasetUpload, Job, JobEvent, Artifact, IdempotencyKey]
"""In foreign-key order."""
BATCH = 1000
LEGACY_FILES = ("kdq.sqlite", "kdq.sqlite-wal", "kdq.sqlite-shm", "broker.sqlite", "broker.sqlite-wal",
                "broker.sqlite-shm", "kdq.sqlite.wake", "broker.sqlite.wake")  # fmt: skip
KEPT_IN = "sqlite-before-postgres"


class ImportRefused(Exception):
    pass


def import_sqlite(source: Path, database_url: str) -> dict[str, int]:
    """Copy every row of ``source`` into the (migrated) PostgreSQL database; rows copied per table."""
    if not source.is_file():
        raise ImportRefused(f"{source}: no such file")
    reader = create_engine(f"sqlite:///file:{source}?mode=ro&uri=true")
    writer = create_engine(database_url)
    try:
        found = MetaData()
        try:
            found.reflect(reader)
        except Exception as exc:  # noqa: BLE001 -- not a database at all
            raise ImportRefused(f"{source} is not a SQLite database ({exc})") from None
        if "jobs" not in found.tables or "teams" not in found.tables:
            raise ImportRefused(f"{source} is not a kdq database (it has no jobs or teams table)")
        counts: dict[str, int] = {}
        with reader.connect() as src, writer.begin() as dst:
            for model in TABLES:
                table = model.__table__
                if table.name not in found.tables:
                    continue
                present = set(found.tables[table.name].columns.keys())
                columns = [c for c in table.columns if c.name in present]
                counts[table.name] = _copy(src, dst, table, columns)
            dst.execute(update(Job).where(Job.state == "QUEUED").values(enqueued_at=None))
            dst.execute(text("SELECT setval(pg_get_serial_sequence('job_events', 'id'), "
                             "GREATEST((SELECT max(id) FROM job_events), 1))"))  # fmt: skip
        return counts
    finally:
        reader.dispose()
        writer.dispose()


def _copy(src, dst, table, columns) -> int:  # type: ignore[no-untyped-def]
    copied = 0
    result = src.execution_options(stream_results=True).execute(select(*columns))
    while rows := result.fetchmany(BATCH):
        values = [dict(row._mapping) for row in rows]
        done = dst.execute(insert(table).values(values).on_conflict_do_nothing())
        copied += done.rowcount or 0
    return copied


def import_legacy_data_dir(layout: Layout, database_url: str) -> dict[str, int] | None:
    """`kdq serve`'s check at start: when the data dir holds an old ``kdq.sqlite``, copy it over and
    move the old files aside (to ``sqlite-before-postgres/``), so nothing a team stored is lost."""
    source = layout.legacy_sqlite
    if not source.is_file():
        return None
    log.warning("found the SQLite database of an earlier kdq in %s; copying it into PostgreSQL", layout.root)
    try:
        counts = import_sqlite(source, database_url)
    except ImportRefused as exc:
        raise SystemExit(f"kdq serve: {exc}. Move it away, or copy it yourself with "
                         f"`kdq migrate --from-sqlite {source} --data-dir {layout.root}` while kdq serve "
                         "is stopped") from None  # fmt: skip
    kept = layout.root / KEPT_IN
    kept.mkdir(exist_ok=True)
    for name in LEGACY_FILES:
        if (layout.root / name).exists():
            shutil.move(str(layout.root / name), str(kept / name))
    log.warning("copied %s; the old files are kept in %s",
                ", ".join(f"{n} {t}" for t, n in counts.items()), kept)  # fmt: skip
    return counts


def row_count(database_url: str, model: type) -> int:
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(model)).scalar_one())
    finally:
        engine.dispose()
