"""What the workers report about themselves, kept in Redis (the broker every host already
reaches) so that every API replica's ``/metrics`` shows the same fleet:

* heartbeats: each worker process writes ``{queues, host, pid, started, beat}`` under its node name
  every ``worker_beat_s`` (`beat`), and removes it when it stops (`forget`); ``/metrics`` shows each
  one's age, so a host that died shows as a heartbeat growing old;
* job durations by stage: a finished job adds its seconds per stage (queue wait, fetching inputs,
  each engine stage, storing results) to cluster-wide histogram counters (`record_stages`).
Counters reset if Redis loses its data; Prometheus handles counter resets.
"""

from __future__ import annotations

import json
import time
from typing import Any

STAGE_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0)
WORKERS = "kdq:workers"
STAGE_SUM, STAGE_COUNT, STAGE_BUCKET = "kdq:stage_seconds:sum", "kdq:stage_seconds:count", "kdq:stage_seconds:le:"


def redis_client(url: str) -> Any:
    import redis

    return redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)


def beat(client: Any, prefix: str, name: str, info: dict[str, Any]) -> None:
    client.hset(prefix + WORKERS, name, json.dumps({**info, "beat": time.time()}))


def forget(client: Any, prefix: str, name: str) -> None:
    client.hdel(prefix + WORKERS, name)


def workers(client: Any, prefix: str) -> dict[str, dict[str, Any]]:
    out = {}
    for name, raw in client.hgetall(prefix + WORKERS).items():
        try:
            out[name.decode() if isinstance(name, bytes) else name] = json.loads(raw)
        except ValueError:
            continue
    return out


def record_stages(client: Any, prefix: str, seconds: dict[str, float]) -> None:
    pipe = client.pipeline(transaction=False)
    for stage, s in seconds.items():
        pipe.hincrbyfloat(prefix + STAGE_SUM, stage, s)
        pipe.hincrby(prefix + STAGE_COUNT, stage, 1)
        for le in STAGE_BUCKETS:
            if s <= le:
                pipe.hincrby(prefix + STAGE_BUCKET + repr(le), stage, 1)
    pipe.execute()


def stage_histograms(client: Any, prefix: str) -> dict[str, tuple[list[int], int, float]]:
    """stage → (cumulative counts per bucket, count, sum)."""
    pipe = client.pipeline(transaction=False)
    pipe.hgetall(prefix + STAGE_SUM)
    pipe.hgetall(prefix + STAGE_COUNT)
    for le in STAGE_BUCKETS:
        pipe.hgetall(prefix + STAGE_BUCKET + repr(le))
    sums, counts, *buckets = pipe.execute()

    def text(k: Any) -> str:
        return k.decode() if isinstance(k, bytes) else str(k)

    out = {}
    for stage, n in counts.items():
        name = text(stage)
        per = [int(b.get(stage, 0)) for b in buckets]
        out[name] = (per, int(n), float(sums.get(stage, 0.0)))
    return out
