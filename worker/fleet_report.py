"""What a worker reports about itself to ``/metrics`` (through `service.core.fleet`): a heartbeat
from the worker's main process, and each finished job's seconds per stage (`StageClock`)."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from service.core import fleet
from service.core.settings import Settings

log = logging.getLogger(__name__)


class Heartbeat(threading.Thread):
    """Writes this worker's heartbeat every ``worker_beat_s`` until `stop` (which removes it)."""

    def __init__(self, settings: Settings, name: str, queues: list[str]) -> None:
        super().__init__(daemon=True, name="fleet-heartbeat")
        self.settings, self.name = settings, name
        self.info = {"queues": queues, "host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        self.done = threading.Event()
        self.client = fleet.redis_client(settings.redis_url())

    def run(self) -> None:
        while True:
            try:
                fleet.beat(self.client, self.settings.broker_key_prefix, self.name, self.info)
            except Exception as exc:  # the broker is away: the next beat tries again
                log.debug("heartbeat not recorded: %s", exc)
            if self.done.wait(self.settings.worker_beat_s):
                return

    def stop(self) -> None:
        self.done.set()
        try:
            fleet.forget(self.client, self.settings.broker_key_prefix, self.name)
        except Exception:
            pass


class StageClock:
    """Seconds per stage of one attempt: the engine's stages (from its progress reports), and the
    worker's own (`timed`)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.current: str | None = None
        self.since = time.monotonic()

    def enter(self, stage: str | None) -> None:
        now = time.monotonic()
        if self.current is not None:
            self.seconds[self.current] = self.seconds.get(self.current, 0.0) + now - self.since
        self.current, self.since = stage, now

    def wrap(self, progress: Callable[[Any], None]) -> Callable[[Any], None]:
        def report(p: Any) -> None:
            if p.stage != self.current:
                self.enter(p.stage)
            progress(p)

        return report

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        self.enter(None)
        started = time.monotonic()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.monotonic() - started
            self.since = time.monotonic()

    def report(self, settings: Settings, queued_at: datetime | None, started_at: datetime | None) -> None:
        """Add a finished job's seconds per stage (and its wait in the queue) to the histograms."""
        self.enter(None)
        seconds = dict(self.seconds)
        if queued_at is not None and started_at is not None:
            seconds["queue_wait"] = max(0.0, (started_at - queued_at).total_seconds())
        try:
            fleet.record_stages(fleet.redis_client(settings.redis_url()), settings.broker_key_prefix, seconds)
        except Exception as exc:  # metrics never fail a job
            log.warning("could not record the job's stage durations: %s", exc)
