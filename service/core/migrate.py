"""Bring the database schema up to date (``kdq migrate``; also run by ``kdq serve``)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"


def alembic_config(database_url: str) -> Config:
    cfg = Config(str(MIGRATIONS / "alembic.ini"))
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["database_url"] = database_url
    return cfg


def upgrade(database_url: str, revision: str = "head") -> None:
    if not MIGRATIONS.is_dir():
        raise RuntimeError(
            f"migrations not found at {MIGRATIONS}; install kdq from a source checkout (pip install -e .)"
        )
    command.upgrade(alembic_config(database_url), revision)
