"""``/metrics`` for a scaled-out fleet, read at scrape time so every API replica reports the same:

* ``kdq_queue_oldest_age_seconds{queue}``: how long the oldest job waiting in each queue has waited
  (since its message was last sent), and for ``validate`` the oldest upload still validating;
* ``kdq_worker_heartbeat_age_seconds{worker,queues,host}`` and ``kdq_workers{queue}`` (workers whose
  heartbeat is fresher than three beats): a dead host shows as ages that grow;
* ``kdq_job_stage_seconds{stage}``: finished jobs' seconds per stage (queue wait, fetching inputs,
  each engine stage, storing results), a histogram kept in Redis by the workers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from datetime import datetime
from typing import TYPE_CHECKING

from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from ..core import fleet
from ..core.models import DatasetUpload, Job, ModelUpload, utcnow
from ..core.states import JobState, UploadState

if TYPE_CHECKING:
    from ..core.db import Database
    from ..core.settings import Settings

log = logging.getLogger(__name__)


class FleetCollector(Collector):
    def __init__(self, db: Database, settings: Settings) -> None:
        self.db, self.settings = db, settings
        self._redis = None

    def _client(self):  # type: ignore[no-untyped-def]
        if self._redis is None:
            self._redis = fleet.redis_client(self.settings.redis_url())
        return self._redis

    def collect(self) -> Iterator[Metric]:
        yield self._queue_ages()
        try:
            client, prefix = self._client(), self.settings.broker_key_prefix
            found = fleet.workers(client, prefix)
            histograms = fleet.stage_histograms(client, prefix)
        except Exception:  # the broker being down must not break the scrape
            log.warning("could not read the fleet's reports from Redis", exc_info=True)
            return
        yield from self._workers(found)
        hist = HistogramMetricFamily("kdq_job_stage_seconds", "Finished jobs' seconds per stage", labels=["stage"])
        for stage, (per, count, total) in sorted(histograms.items()):
            buckets = [(str(le), n) for le, n in zip(fleet.STAGE_BUCKETS, per)] + [("+Inf", count)]
            hist.add_metric([stage], buckets, sum_value=total)
        yield hist

    def _queue_ages(self) -> Metric:
        s = self.settings
        age = GaugeMetricFamily("kdq_queue_oldest_age_seconds", "Age of the oldest message waiting in each queue",
                                labels=["queue"])  # fmt: skip
        now = utcnow()
        with self.db.read() as session:
            waiting = select(Job.queue, func.min(func.coalesce(Job.enqueued_at, Job.created_at)))
            oldest: dict[str, datetime | None] = dict(
                session.execute(waiting.where(Job.state == JobState.QUEUED.value).group_by(Job.queue)).tuples().all()
            )
            uploads = [session.scalar(select(func.min(t.created_at)).where(t.state == UploadState.VALIDATING.value))
                       for t in (ModelUpload, DatasetUpload)]  # fmt: skip
        stamps = [u for u in uploads if u is not None]
        oldest[s.queue_validate] = min(stamps) if stamps else None
        for queue in (s.queue_validate, s.queue_cpu, s.queue_gpu):
            since = oldest.get(queue)
            age.add_metric([queue], max(0.0, (now - since).total_seconds()) if since is not None else 0.0)
        return age

    def _workers(self, found: dict[str, dict]) -> Iterator[Metric]:  # type: ignore[type-arg]
        now = time.time()
        age = GaugeMetricFamily("kdq_worker_heartbeat_age_seconds", "Seconds since each worker's last heartbeat",
                                labels=["worker", "queues", "host"])  # fmt: skip
        alive = GaugeMetricFamily("kdq_workers", "Workers with a fresh heartbeat, by queue", labels=["queue"])
        per_queue = dict.fromkeys((self.settings.queue_validate, self.settings.queue_cpu, self.settings.queue_gpu), 0)
        for name, info in sorted(found.items()):
            queues = [q for q in info.get("queues", []) if q]
            seconds = max(0.0, now - float(info.get("beat", 0.0)))
            age.add_metric([name, ",".join(queues), str(info.get("host", ""))], seconds)
            if seconds <= 3 * self.settings.worker_beat_s:
                for q in queues:
                    per_queue[q] = per_queue.get(q, 0) + 1
        for q, n in per_queue.items():
            alive.add_metric([q], n)
        yield age
        yield alive
