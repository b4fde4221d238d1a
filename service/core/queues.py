"""Sending work to the workers by task name, and asking the broker how it is doing.

The API never builds the worker's Celery app (`worker.celery_app`), which imports the tasks:
it sends by name through a sender app with the same broker settings (`celery_config`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from celery import Celery
from kombu import Exchange, Queue

from . import redis_transport
from .settings import Settings

RUN_JOB = "kdq.run_job"
VALIDATE_UPLOAD = "kdq.validate_upload"

UploadKind = Literal["model", "dataset"]
REDIS_PRIORITY_SEP = "\x06\x16"
REDIS_PRIORITY_STEPS = tuple(range(10))
"""How kombu's Redis transport names a queue's lists: ``queue`` for priority 0, else
``queue + SEP + step`` (kombu.transport.redis ``Channel._q_for_pri``)."""


class BrokerUnavailable(Exception):
    pass


def celery_config(settings: Settings) -> dict[str, Any]:
    """What the senders and the workers agree on: late acknowledgement, one task per worker slot,
    explicit queues, JSON only, no result backend (the job row is the truth)."""
    redis_transport.register()
    transport_options: dict[str, object] = {"visibility_timeout": settings.broker_visibility_timeout_s,
                                            "priority_steps": list(REDIS_PRIORITY_STEPS),
                                            "queue_order_strategy": "priority"}
    if settings.broker_key_prefix:
        transport_options["global_keyprefix"] = settings.broker_key_prefix
    queues = (settings.queue_validate, settings.queue_cpu, settings.queue_gpu)
    return {
        "broker_url": settings.broker_url,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_ignore_result": True,
        "task_store_errors_even_if_ignored": False,
        "task_queues": [Queue(q, Exchange(q, type="direct"), routing_key=q) for q in queues],
        "task_default_queue": settings.queue_cpu,
        "task_create_missing_queues": False,
        "task_routes": {VALIDATE_UPLOAD: {"queue": settings.queue_validate}},
        "task_serializer": "json",
        "accept_content": ["json"],
        "broker_transport_options": transport_options,
        "task_default_priority": 0,
        "broker_connection_retry_on_startup": True,
        "task_publish_retry_policy": {"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5},
        "worker_enable_remote_control": False,
        "worker_send_task_events": False,
        # A pool process imports the engine (torch, onnxruntime, transformers) before it reports
        # itself up (worker.celery_app._preload): 3-10 s on a loaded machine. Celery's default 4 s
        # killed every replacement of a lost pool process, forever, and the requeued job waited.
        "worker_proc_alive_timeout": 120.0,
    }


def make_sender(settings: Settings) -> Celery:
    """A Celery app that only sends (no tasks, not the current app)."""
    app = Celery("kdq-sender", set_as_current=False)
    app.conf.update(celery_config(settings))
    return app


class Queues:
    def __init__(self, settings: Settings, celery: Celery | None = None) -> None:
        self.settings = settings
        self.celery = celery or make_sender(settings)
        self._inspector: Any = None

    def send_job(self, job_id: str, queue: str, priority: int = 0) -> None:
        """Queue a job run; the task id is the job id. ``priority`` 0 is taken first, then 3, 6, 9
        (`service.core.fairness`)."""
        self._send(RUN_JOB, [job_id], task_id=job_id, queue=queue, priority=priority)

    def send_validation(self, kind: UploadKind, upload_id: str, priority: int = 0) -> None:
        """Queue an upload's validation (``priority`` as for jobs, `service.core.fairness`)."""
        self._send(VALIDATE_UPLOAD, [kind, upload_id], task_id=f"validate-{upload_id}",
                   queue=self.settings.queue_validate, priority=priority)  # fmt: skip

    def _send(self, name: str, args: list[str], *, task_id: str, queue: str, priority: int = 0) -> None:
        try:
            self.celery.send_task(name, args=args, task_id=task_id, queue=queue, priority=priority)
        except Exception as exc:  # kombu raises transport-specific errors
            raise BrokerUnavailable(str(exc)) from exc

    def ping(self) -> None:
        with self.celery.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=3)

    def depths(self) -> dict[str, int]:
        """Messages waiting in each queue (not counting those a worker holds)."""
        s = self.settings
        out = {}
        with self.celery.connection_for_read() as conn, conn.channel() as channel:
            for queue in (s.queue_validate, s.queue_cpu, s.queue_gpu):
                out[queue] = channel.queue_declare(
                    queue, passive=False, durable=True, auto_delete=False
                ).message_count
        return out

    def held_messages(self) -> Held:
        """The task messages the broker holds (see `Held`)."""
        if self._inspector is None:
            self._inspector = _RedisInspector(self.settings)
        return self._inspector.held()


@dataclass
class Held:
    """What the broker holds, by task id (the job id; ``validate-<upload id>``).

    A worker that dies holding a message leaves it delivered but unacknowledged (Redis keeps
    it for ``broker_visibility_timeout_s``); a Redis restarted without persistence holds nothing.
    """

    waiting: set[str] = field(default_factory=set)
    """In a queue, not yet delivered."""
    delivered: dict[str, float] = field(default_factory=dict)
    """Delivered to a worker and not acknowledged: the epoch time it was delivered, or its ETA
    when that is later (a retry waiting for its countdown)."""

    def holds(self, task_id: str, *, delivered_within: float | None = None) -> bool:
        """Waiting, or delivered (within the last ``delivered_within`` seconds, when given)."""
        if task_id in self.waiting:
            return True
        since = self.delivered.get(task_id)
        if since is None:
            return False
        return delivered_within is None or time.time() - since < delivered_within

    def add_delivered(self, task_id: str, when: float) -> None:
        self.delivered[task_id] = max(when, self.delivered.get(task_id, when))


def _task(payload: Any) -> tuple[str | None, float | None]:
    """A Celery message's task id and ETA (epoch seconds, None when it has none)."""
    headers = payload.get("headers") if isinstance(payload, dict) else None
    if not isinstance(headers, dict):
        return None, None
    eta = headers.get("eta")
    try:
        when = datetime.fromisoformat(eta).timestamp() if isinstance(eta, str) else None
    except ValueError:
        when = None
    return headers.get("id"), when


class _RedisInspector:
    """Reads kombu's Redis layout: one list per queue and priority, and the ``unacked`` hash
    (delivery tag → ``[message, exchange, routing_key]``) with its ``unacked_index`` sorted
    set (delivery tag → time delivered). All read in one MULTI/EXEC, so a message moving
    from a list to the hash is seen in one of them."""

    def __init__(self, settings: Settings) -> None:
        import redis

        self.client = redis.Redis.from_url(settings.redis_url(), socket_timeout=5, socket_connect_timeout=5)
        prefix = settings.broker_key_prefix
        queues = (settings.queue_validate, settings.queue_cpu, settings.queue_gpu)
        self.lists = [
            prefix + q + (f"{REDIS_PRIORITY_SEP}{p}" if p else "")
            for q in queues
            for p in REDIS_PRIORITY_STEPS
        ]
        self.unacked, self.unacked_index = prefix + "unacked", prefix + "unacked_index"

    def held(self) -> Held:
        pipe = self.client.pipeline(transaction=True)
        for key in self.lists:
            pipe.lrange(key, 0, -1)
        pipe.hgetall(self.unacked)
        pipe.zrange(self.unacked_index, 0, -1, withscores=True)
        *lists, unacked, index = pipe.execute()
        held = Held(waiting={tid for tid, _ in map(_task, _loads(m for lst in lists for m in lst)) if tid})
        delivered = dict(index)
        now = time.time()
        for tag, raw in unacked.items():
            entry = _loads([raw])[0]
            tid, eta = _task(entry[0] if isinstance(entry, list) and entry else None)
            if tid:
                held.add_delivered(tid, max(delivered.get(tag, now), eta or 0.0))
        return held


def _loads(raw: Iterable[bytes | str]) -> list[Any]:
    out = []
    for item in raw:
        try:
            out.append(json.loads(item))
        except (ValueError, TypeError):
            out.append(None)
    return out
