"""All service and worker configuration, read from the environment (prefix ``KDQ_``).

The embedded default needs nothing set: `kdq serve` runs PostgreSQL and Redis on UNIX sockets
inside ``data_dir`` (`service.embedded`), with the blob directory beside them, and every
process finds them from ``data_dir`` alone. Scaled out, point ``KDQ_DATABASE_URL`` at
PostgreSQL, ``KDQ_BROKER_URL`` at Redis and ``KDQ_STORAGE_URL`` at an S3 bucket (or
``KDQ_STORAGE_DIR`` at a shared volume).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, PrivateAttr, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1 << 20
GiB = 1 << 30


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KDQ_", extra="ignore")

    data_dir: Path = Path("./var")
    database_url: str = ""
    """A PostgreSQL URL (``postgresql+psycopg://…``). Default: the embedded server's socket in
    ``data_dir`` (`service.embedded.layout`)."""
    broker_url: str = ""
    """A Redis URL (``redis://…``, or ``redis+socket:///path`` for a UNIX socket). Default: the
    embedded server's socket in ``data_dir``."""
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
    max_form_parts: int = Field(default=64, ge=2)
    """Most parts in one multipart upload: the file and every form field."""
    max_part_header_bytes: int = Field(default=16 * 1024, gt=0)
    """Largest total size of the headers of one multipart part."""
    archive_max_entries: int = Field(default=200_000, gt=0)
    """Uploaded archives (zoo / Hugging Face folders, image class folders, .npz): most entries."""
    archive_max_unpacked_bytes: int = Field(default=8 * GiB, gt=0)
    """Uploaded archives: largest total uncompressed size."""
    archive_max_ratio: float = Field(default=200.0, gt=1)
    """Uploaded archives: largest uncompressed/compressed ratio of one entry."""
    archive_scan_bytes: int = Field(default=64 * MiB, gt=0)
    """How much of a compressed tar the API decompresses to check member headers (the worker checks all)."""
    max_image_pixels: int = Field(default=50_000_000, gt=0)
    """Largest image (width x height) an image dataset may hold (decompression bombs)."""
    allow_code_checkpoints: bool = False
    """Accept TorchScript / ExportedProgram teachers, which carry code; they then load and run only
    in a sandboxed child process. Pickles are never accepted."""
    sandbox_memory_bytes: int = Field(default=4 * GiB, gt=0)
    """Address-space limit (RLIMIT_AS) of a sandboxed teacher process."""
    sandbox_cpu_seconds: int = Field(default=3600, gt=0)
    """CPU-time limit (RLIMIT_CPU) of a sandboxed teacher process over its life."""

    validate_memory_bytes: int = Field(default=3 * GiB, gt=0)
    """Memory one validation may use (its own cgroup, else RLIMIT_AS): past it the upload ends
    ``invalid`` with ``resource_limit``."""
    validate_cpu_s: int = Field(default=900, gt=0)
    validate_wall_s: float = Field(default=900.0, gt=0)
    validate_scratch_bytes: int = Field(default=16 * GiB, gt=0)
    """Scratch space of one validation (the upload unpacked, decoded)."""
    max_validation_attempts: int = Field(default=3, ge=1)
    """An upload whose validation's worker was lost this many times ends ``invalid``."""
    job_memory_bytes: int = Field(default=8 * GiB, gt=0)
    """Memory one job may use: past it the job ends ``FAILED`` with ``resource_limit``."""
    job_wall_s: float = Field(default=6 * 3600.0, gt=0)
    """Hard wall-time cap of one job (its CPU time is capped at this × the cores)."""
    job_scratch_bytes: int = Field(default=64 * GiB, gt=0)
    """Scratch space of one job (its inputs, checkpoints, caches and outputs)."""
    job_time_budget_s: float = Field(default=4 * 3600.0, gt=0)
    """The training time budget a job gets when its spec gives none or more (a team row may
    override it): past it the engine stops training and delivers the best so far."""

    queue_validate: str = "validate"
    queue_cpu: str = "cpu"
    queue_gpu: str = "gpu"
    default_team: str = "default"
    """The team every request acts as when ``auth`` is ``none``."""

    auth: Literal["keys", "none"] = "keys"
    """``keys``: every /v1 request needs ``Authorization: Bearer <team API key>`` (``kdq keys create``).
    ``none``: every request is ``default_team`` (only for an API bound to a loopback address)."""
    auth_cache_s: float = Field(default=5.0, ge=0)
    """How long an API process trusts a key it has checked; a revoked key stops working within this."""
    max_running_jobs_per_team: int = Field(default=4, ge=1)
    """A team's QUEUED + RUNNING + CANCELLING jobs at once (a team row may override it)."""
    max_stored_bytes_per_team: int = Field(default=50 * GiB, ge=0)
    """A team's uploads plus artifacts, in bytes as listed (a team row may override it)."""
    max_submissions_per_minute: int = Field(default=60, ge=1)
    """Jobs a team may submit in any 60 seconds (a team row may override it)."""
    uploads_retention_s: float | None = Field(default=None, ge=0)
    """Delete models and datasets this many seconds after upload (None or 0: keep them)."""
    artifacts_retention_s: float | None = Field(default=None, ge=0)
    """Delete a finished job's artifacts this many seconds after it finished (None or 0: keep them)."""
    retention_interval_s: float = Field(default=600.0, ge=0)
    """How often the API deletes what has expired (0: never)."""

    progress_interval_s: float = Field(default=0.5, gt=0)
    """Fewest seconds between two progress rows a job writes (the last one is always written)."""
    cancel_poll_s: float = Field(default=0.5, gt=0)
    heartbeat_interval_s: float = Field(default=10.0, gt=0)
    stale_after_s: float = Field(default=120.0, gt=0)
    """A RUNNING job whose heartbeat is older than this is taken over or requeued."""
    reaper_interval_s: float = Field(default=30.0, ge=0)
    """How often the API looks for stale jobs (0: never)."""
    relay_interval_s: float = Field(default=5.0, ge=0)
    """How often the API's outbox relay looks for QUEUED jobs whose message is missing (0: never)."""
    relay_grace_s: float = Field(default=15.0, gt=0)
    """The relay re-sends a QUEUED job only when its message has been missing (never accepted by
    the broker, or no longer held by it) for longer than this; also how long a message a worker
    received may stay unacknowledged while its job is still QUEUED (a worker begins a job within
    moments; longer means the worker died holding it)."""
    max_attempts: int = Field(default=3, ge=1)
    broker_visibility_timeout_s: int = Field(default=24 * 3600, gt=0)
    """Redis: an unacknowledged job is redelivered after this long; keep it above the longest job."""
    sse_poll_s: float = Field(default=1.0, gt=0)
    """How often an event stream reads its job's events when no notice came (`service.core.notices`
    wakes it as soon as a worker commits some; this poll is the safety net)."""
    sse_keepalive_s: float = Field(default=15.0, gt=0)
    max_event_streams: int = Field(default=500, ge=1)
    """Event streams one API process serves at once (past it: 429 with Retry-After)."""
    max_event_streams_per_team: int = Field(default=32, ge=1)
    """Event streams one team may hold open on one API process at once."""
    max_request_head_bytes: int = Field(default=64 * 1024, ge=4096)
    """Largest request line plus headers (past it: 431)."""
    job_tmp_keep: bool = False
    """Keep a finished job's scratch folder (debugging)."""

    storage_url: str = ""
    """``s3://bucket/prefix``: keep blobs and resume checkpoints in S3 (or MinIO…) instead of
    ``storage_dir``, so worker hosts share nothing but the services (`service.core.s3store`). The
    endpoint, region and credentials come from the usual AWS variables (``AWS_ENDPOINT_URL_S3``,
    ``AWS_REGION``, ``AWS_ACCESS_KEY_ID``…). Empty: the local store."""
    s3_part_bytes: int = Field(default=8 * MiB, ge=5 * MiB)
    """S3 multipart part size; an upload keeps at most a few parts in memory at once."""
    s3_addressing_style: Literal["auto", "path", "virtual"] = "auto"
    """``path`` for MinIO and other servers without per-bucket host names."""
    s3_timeout_s: float = Field(default=10.0, gt=0)
    """Connect and read timeout of one S3 request (boto3 retries a few times on top)."""
    s3_presign_min_bytes: int | None = Field(default=None, ge=0)
    """Artifacts at least this large are answered with a redirect (307) to a presigned S3 URL
    instead of passing through the API (None: always through the API)."""
    s3_presign_ttl_s: int = Field(default=300, gt=0)
    store_retry_s: float = Field(default=300.0, ge=0)
    """How long a worker keeps trying to store a job's results while the store is unreachable
    (then the job goes back to the queue, not FAILED)."""
    checkpoint_sync_s: float = Field(default=1.0, gt=0)
    """Remote store: how often a running job looks for new checkpoints to copy to the store."""
    gpu_auto_min_work: float | None = Field(default=None, gt=0)
    """A job with ``device: auto`` goes to the ``gpu`` queue when teacher parameters x training
    samples x epochs reaches this (None: only ``device: cuda`` jobs do; set it once GPU workers run)."""
    worker_beat_s: float = Field(default=10.0, gt=0)
    """How often a worker process records that it is alive (``/metrics`` shows each one's age)."""

    webhook_key: SecretStr | None = None
    """The operator's secret from which each team's webhook signing secret is derived (HMAC of the
    team and its secret's version; the database holds no secret). Default: a random key made once
    in ``<data_dir>/webhook.key`` (mode 0600); set it when API processes run on several machines."""
    webhook_allow: str = ""
    """Comma-separated networks (``10.0.0.0/8``) or host names that webhook targets may be on even
    though they are loopback, private, link-local or reserved addresses (refused otherwise)."""
    webhook_interval_s: float = Field(default=1.0, ge=0)
    """How often the API's delivery loop looks for webhooks due (0: never sends)."""
    webhook_backoff_s: float = Field(default=10.0, gt=0)
    """The wait after a webhook's first failed attempt; it doubles after each (up to an hour)."""
    webhook_retry_for_s: float = Field(default=24 * 3600.0, gt=0)
    """How long a webhook is retried after the job ended before it is given up (``failed``)."""
    webhook_timeout_s: float = Field(default=10.0, gt=0)
    """One attempt's limit (connect and answer); a slower receiver counts as a failed attempt."""

    log_format: Literal["text", "json"] = "text"
    """Log lines as text, or as one JSON object each (with the job id and team where there is one)."""

    @model_validator(mode="after")
    def _defaults(self) -> Settings:
        from ..embedded.layout import Layout

        self.data_dir = self.data_dir.expanduser().resolve()
        layout = Layout(self.data_dir)
        self._embedded = not self.database_url
        if not self.database_url:
            self.database_url = layout.database_url()
        elif not self.database_url.startswith("postgresql"):
            raise ValueError("KDQ_DATABASE_URL must be a PostgreSQL URL (postgresql+psycopg://…); SQLite is no "
                             "longer supported: `kdq migrate --from-sqlite` copies an old kdq.sqlite over")
        if not self.broker_url:
            self.broker_url = layout.broker_url()
        elif not self.broker_url.startswith(("redis://", "rediss://", "redis+socket://")):
            raise ValueError("KDQ_BROKER_URL must be a Redis URL (redis://, rediss:// or redis+socket://)")
        if self.storage_url and not self.storage_url.startswith("s3://"):
            raise ValueError("KDQ_STORAGE_URL must be an s3://bucket/prefix URL (or empty: the local store)")
        if self.storage_dir is None:
            self.storage_dir = self.data_dir / "store"
        if self.work_dir is None:
            self.work_dir = self.data_dir / "work"
        return self

    _embedded: bool = PrivateAttr(default=False)

    @property
    def embedded(self) -> bool:
        """Whether the database is the data dir's embedded one (no ``KDQ_DATABASE_URL`` given)."""
        return self._embedded

    def redis_url(self) -> str:
        """The broker as a redis-py URL (``redis+socket:///p`` → ``unix:///p``)."""
        if self.broker_url.startswith("redis+socket://"):
            return "unix://" + self.broker_url.removeprefix("redis+socket://")
        return self.broker_url

    def job_queues(self) -> list[str]:
        return [self.queue_cpu, self.queue_gpu]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (read once from the environment)."""
    return Settings()
