"""The worker's Celery application: the broker settings every sender shares
(`service.core.queues.celery_config`), the tasks, and our logging and shutdown hooks.

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

from service.core.logs import configure
from service.core.queues import celery_config
from service.core.settings import Settings, get_settings

from . import engine_calls, shutdown
from .fleet_report import Heartbeat

warnings.filterwarnings("ignore", category=SecurityWarning)  # root: `kdq serve` says it once, in words


def _say_when_debugging(msg: str, f: object = None) -> None:
    """Celery prints "worker: Warm shutdown (MainProcess)" and the like from its signal handlers
    straight to the terminal; ours say them only at DEBUG (and with a plain write: a signal
    handler must not take the logging lock)."""
    if logging.getLogger("kdq.worker").isEnabledFor(logging.DEBUG):
        os.write(2, (msg.strip() + "\n").encode())


celery_worker.safe_say = _say_when_debugging


def make_celery(settings: Settings | None = None) -> Celery:
    """The worker's app: the shared broker settings (`service.core.queues.celery_config`) and the tasks."""
    settings = settings or get_settings()
    app = Celery("kdq", include=["worker.tasks"])
    app.conf.update(celery_config(settings), worker_hijack_root_logger=False, worker_redirect_stdouts=False)
    return app


@signals.setup_logging.connect
def _logging(loglevel: str | int | None = None, **_: object) -> None:
    """Our log lines (text or JSON, with job ids) instead of Celery's own set-up."""
    configure(get_settings().log_format, loglevel or "INFO")


_heartbeat: list[Heartbeat] = []


@signals.worker_ready.connect
def _ready(sender: object = None, **_: object) -> None:
    queues = ",".join(q.name for q in app.amqp.queues.consume_from.values()) if app.amqp.queues else ""
    logging.getLogger("kdq.worker").info("worker %s ready: queues %s", getattr(sender, "hostname", "?"), queues)
    beat = Heartbeat(get_settings(), str(getattr(sender, "hostname", "?")), queues.split(","))
    beat.start()  # this worker's heartbeat on /metrics (worker.fleet_report)
    _heartbeat.append(beat)


@signals.worker_process_init.connect
def _preload(**_: object) -> None:
    """A pool process imports the engine once, so each task's confined child starts at once."""
    engine_calls.preload()


@signals.worker_init.connect
@signals.worker_shutdown.connect
def _clear_stop_mark(**_: object) -> None:
    shutdown.forget()


@signals.worker_shutting_down.connect
def _shutting_down(**_: object) -> None:
    shutdown.request_stop()  # the running job hands itself back (worker.shutdown)
    while _heartbeat:
        _heartbeat.pop().stop()


app = make_celery()
