"""The Celery application: late acknowledgement, one task per worker slot, explicit queues.

Queues: ``validate`` (light: upload validation, so an upload never waits behind a long
job), ``cpu`` and ``gpu`` (compression jobs). The job id is the task id; tasks store
nothing in a result backend — the job row is the truth.

Run a worker with ``kdq worker --queues cpu`` (or ``celery -A worker.celery_app worker -Q cpu``).
"""

from __future__ import annotations

import logging
import os
import warnings

from celery import Celery, signals
from celery.apps import worker as celery_worker
from celery.platforms import SecurityWarning
from kombu import Exchange, Queue

from service import redis_transport
from service.logs import configure
from service.settings import Settings, get_settings

from . import shutdown

warnings.filterwarnings("ignore", category=SecurityWarning)  # root: `kdq serve` says it once, in words


def _say_when_debugging(msg: str, f: object = None) -> None:
    """Celery prints "worker: Warm shutdown (MainProcess)" and the like from its signal handlers
    straight to the terminal; ours say them only at DEBUG (and with a plain write: a signal
    handler must not take the logging lock)."""
    if logging.getLogger("kdq.worker").isEnabledFor(logging.DEBUG):
        os.write(2, (msg.strip() + "\n").encode())


celery_worker.safe_say = _say_when_debugging
RUN_JOB = "kdq.run_job"
VALIDATE_UPLOAD = "kdq.validate_upload"


def make_celery(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    redis_transport.register()
    app = Celery("kdq", broker=settings.broker_url, include=["worker.tasks"])
    transport_options: dict[str, object] = {}
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
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
    )
    return app


@signals.setup_logging.connect
def _logging(loglevel: str | int | None = None, **_: object) -> None:
    """Our log lines (text or JSON, with job ids) instead of Celery's own set-up."""
    configure(get_settings().log_format, loglevel or "INFO")


@signals.worker_ready.connect
def _ready(sender: object = None, **_: object) -> None:
    queues = ",".join(q.name for q in app.amqp.queues.consume_from.values()) if app.amqp.queues else ""
    logging.getLogger("kdq.worker").info("worker %s ready: queues %s", getattr(sender, "hostname", "?"), queues)


@signals.worker_init.connect
@signals.worker_shutdown.connect
def _clear_stop_mark(**_: object) -> None:
    shutdown.forget()


@signals.worker_shutting_down.connect
def _shutting_down(**_: object) -> None:
    shutdown.request_stop()  # the running job hands itself back (worker.shutdown)


app = make_celery()
