"""kombu's Redis transport with one fix: an acknowledgement that fails because Redis went away
still frees the worker's prefetch slot.

Upstream (kombu 5.7), ``QoS.ack`` first removes the message from Redis's ``unacked`` set and
forgets it locally only when that worked. If Redis restarted while the task ran, that removal
fails ("Couldn't ack"), the worker keeps counting the message as unacknowledged, so with
``prefetch 1`` it never asks Redis for work again — and, issuing no command, never notices
that its connection is gone: it sits idle forever (seen in the Redis-restart fault test).

Forgetting the message regardless is safe: it is either gone with the old Redis, or Redis
redelivers it after the visibility timeout, and a redelivered job is dropped by
`service.core.lifecycle.begin` (a job is run only from QUEUED). The next poll then hits the dead
connection, and Celery reconnects as usual.

Registered for ``redis://``, ``rediss://`` and ``redis+socket://`` by `register` (`worker.celery_app`).
"""

from __future__ import annotations

from kombu.transport import redis as kombu_redis
from kombu.transport import virtual


class QoS(kombu_redis.QoS):
    def ack(self, delivery_tag: str) -> None:
        try:
            self._remove_from_indices(delivery_tag).execute()
        finally:
            virtual.QoS.ack(self, delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        try:
            if requeue:
                self.restore_by_tag(delivery_tag, leftmost=True)
            else:
                self._remove_from_indices(delivery_tag).execute()
        finally:
            virtual.QoS.ack(self, delivery_tag)


class Channel(kombu_redis.Channel):
    QoS = QoS


class Transport(kombu_redis.Transport):
    Channel = Channel


def register() -> None:
    """Make ``redis://`` and ``rediss://`` URLs use this transport (idempotent)."""
    from kombu.transport import TRANSPORT_ALIASES

    for scheme in ("redis", "rediss"):
        TRANSPORT_ALIASES[scheme] = f"{__name__}:Transport"
