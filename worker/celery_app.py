"""The Celery application: late acknowledgement, one task per worker slot, explicit queues.

Queues: ``validate`` (light: upload validation, so an upload never waits behind a long
job), ``cpu`` and ``gpu`` (compression jobs). The job id is the task id; tasks store
nothing in a result backend — the job row is the truth.

Run a worker with ``kdq worker --queues cpu`` (or ``celery -A worker.celery_app worker -Q cpu``).
"""

from __future__ import annotations

from celery import Celery
from kombu import Exchange, Queue

from service import broker
from service.settings import Settings, get_settings

RUN_JOB = "kdq.run_job"
VALIDATE_UPLOAD = "kdq.validate_upload"


def make_celery(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    broker.register()
    app = Celery("kdq", broker=settings.broker_url, include=["worker.tasks"])
    transport_options: dict[str, object] = {}
    if settings.broker_url.startswith(("redis://", "rediss://")):
        transport_options["visibility_timeout"] = settings.broker_visibility_timeout_s
        if settings.broker_key_prefix:
            transport_options["global_keyprefix"] = settings.broker_key_prefix
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_store_errors_even_if_ignored=False,
        task_queues=[
            Queue(q, Exchange(q, type="direct"), routing_key=q)
            for q in (settings.queue_validate, settings.queue_cpu, settings.queue_gpu)
        ],
        task_default_queue=settings.queue_cpu,
        task_create_missing_queues=False,
        task_routes={VALIDATE_UPLOAD: {"queue": settings.queue_validate}},
        task_serializer="json",
        accept_content=["json"],
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        task_publish_retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5},
        worker_enable_remote_control=False,
        worker_send_task_events=False,
    )
    return app


app = make_celery()
