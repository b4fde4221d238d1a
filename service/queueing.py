"""Sending work to the workers, and asking the broker how it is doing."""

from __future__ import annotations

from typing import Literal

from celery import Celery

from worker.celery_app import RUN_JOB, VALIDATE_UPLOAD, make_celery

from .settings import Settings

UploadKind = Literal["model", "dataset"]


class BrokerUnavailable(Exception):
    pass


class Queues:
    def __init__(self, settings: Settings, celery: Celery | None = None) -> None:
        self.settings = settings
        self.celery = celery or make_celery(settings)

    def send_job(self, job_id: str, queue: str) -> None:
        """Queue a job run; the task id is the job id."""
        self._send(RUN_JOB, [job_id], task_id=job_id, queue=queue)

    def send_validation(self, kind: UploadKind, upload_id: str) -> None:
        self._send(
            VALIDATE_UPLOAD,
            [kind, upload_id],
            task_id=f"validate-{upload_id}",
            queue=self.settings.queue_validate,
        )

    def _send(self, name: str, args: list[str], *, task_id: str, queue: str) -> None:
        try:
            self.celery.send_task(name, args=args, task_id=task_id, queue=queue)
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
