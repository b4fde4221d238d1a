"""All service and worker configuration, read from the environment (prefix ``KDQ_``).

The embedded default needs nothing set: a SQLite file, a SQLite broker and a blob
directory, all under ``data_dir``. Scaled out, point ``KDQ_DATABASE_URL`` at Postgres,
``KDQ_BROKER_URL`` at Redis and ``KDQ_STORAGE_DIR`` at a shared volume.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1 << 20
GiB = 1 << 30


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KDQ_", extra="ignore")

    data_dir: Path = Path("./var")
    database_url: str = ""
    """Default: ``sqlite:///<data_dir>/kdq.sqlite``."""
    broker_url: str = ""
    """Default: the embedded SQLite broker ``kdqsqlite+sqlite:///<data_dir>/broker.sqlite``."""
    broker_key_prefix: str = ""
    """Redis only: a prefix for every broker key (isolates several deployments on one Redis)."""
    storage_dir: Path | None = None
    """Content-addressed blob store. Default: ``<data_dir>/store``."""
    work_dir: Path | None = None
    """Worker scratch space (job outputs, checkpoints). Default: ``<data_dir>/work``."""

    max_upload_bytes: int = Field(default=8 * GiB, gt=0)
    """Largest accepted upload body (checked on bytes received)."""
    max_form_field_bytes: int = Field(default=64 * 1024, gt=0)
    upload_drain_bytes: int = Field(default=64 * MiB, ge=0)
    """After a 413, read (and discard) up to this much more so the client can see the answer."""

    queue_validate: str = "validate"
    queue_cpu: str = "cpu"
    queue_gpu: str = "gpu"
    default_team: str = "default"

    progress_interval_s: float = Field(default=0.5, gt=0)
    """Fewest seconds between two progress rows a job writes (the last one is always written)."""
    cancel_poll_s: float = Field(default=0.5, gt=0)
    heartbeat_interval_s: float = Field(default=10.0, gt=0)
    stale_after_s: float = Field(default=120.0, gt=0)
    """A RUNNING job whose heartbeat is older than this is taken over or requeued."""
    reaper_interval_s: float = Field(default=30.0, ge=0)
    """How often the API looks for stale jobs (0: never)."""
    max_attempts: int = Field(default=3, ge=1)
    broker_visibility_timeout_s: int = Field(default=24 * 3600, gt=0)
    """Redis: an unacknowledged job is redelivered after this long; keep it above the longest job."""
    sse_poll_s: float = Field(default=0.25, gt=0)
    sse_keepalive_s: float = Field(default=15.0, gt=0)
    job_tmp_keep: bool = False
    """Keep a finished job's scratch folder (debugging)."""

    @model_validator(mode="after")
    def _defaults(self) -> Settings:
        self.data_dir = self.data_dir.expanduser().resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'kdq.sqlite'}"
        if not self.broker_url:
            self.broker_url = f"kdqsqlite+sqlite:///{self.data_dir / 'broker.sqlite'}"
        if self.storage_dir is None:
            self.storage_dir = self.data_dir / "store"
        if self.work_dir is None:
            self.work_dir = self.data_dir / "work"
        return self

    def job_queues(self) -> list[str]:
        return [self.queue_cpu, self.queue_gpu]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (read once from the environment)."""
    return Settings()
