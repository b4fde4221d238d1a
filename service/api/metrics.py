"""Prometheus metrics: jobs by state, queue depth, job durations (read at scrape time from the
database and the broker, so every API replica reports the same truth) and uploaded bytes
(counted by this process)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from ..core.models import Job
from ..core.states import JobState
from .fleet_metrics import FleetCollector

if TYPE_CHECKING:
    from ..core.db import Database
    from ..core.queues import Queues

log = logging.getLogger(__name__)
DURATION_BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 24 * 3600.0)


class _StateCollector(Collector):
    def __init__(self, db: Database, queues: Queues) -> None:
        self.db = db
        self.queues = queues

    def collect(self) -> Iterator[Metric]:
        jobs = GaugeMetricFamily("kdq_jobs", "Jobs by state", labels=["state"])
        with self.db.read() as s:
            counts = dict(s.execute(select(Job.state, func.count()).group_by(Job.state)).tuples().all())
            done = Job.run_seconds.is_not(None)
            row = s.execute(
                select(
                    func.count().filter(done),
                    func.coalesce(func.sum(Job.run_seconds), 0.0),
                    *[func.count().filter(Job.run_seconds <= b) for b in DURATION_BUCKETS],
                )
            ).one()
        for state in JobState:
            jobs.add_metric([state.value], counts.get(state.value, 0))
        yield jobs

        total, total_s, *le = row
        hist = HistogramMetricFamily("kdq_job_duration_seconds", "Wall time of finished jobs (last attempt)")
        hist.add_metric(
            [],
            [(str(b), c) for b, c in zip(DURATION_BUCKETS, le)] + [("+Inf", total)],
            sum_value=float(total_s),
        )
        yield hist

        depth = GaugeMetricFamily(
            "kdq_queue_depth", "Messages waiting in each broker queue", labels=["queue"]
        )
        try:
            for queue, n in self.queues.depths().items():
                depth.add_metric([queue], n)
        except Exception:  # the broker being down must not break the scrape
            log.warning("could not read queue depths", exc_info=True)
        yield depth


class Metrics:
    def __init__(self, db: Database, queues: Queues) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.uploaded_bytes = Counter(
            "kdq_uploaded_bytes", "Bytes of accepted uploads", ["kind"], registry=self.registry
        )
        self.registry.register(_StateCollector(db, queues))
        self.registry.register(FleetCollector(db, queues.settings))  # queue ages, heartbeats, stages

    def render(self) -> bytes:
        return generate_latest(self.registry)
