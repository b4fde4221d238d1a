"""The embedded broker's doorbell: a waiting worker wakes when a message is sent, not at its next poll."""

from __future__ import annotations

import socket
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection, Exchange, Queue

from service import broker
from service.doorbell import Doorbell


def test_a_ring_ends_the_wait_of_every_listener(tmp_path: Path) -> None:
    folder = tmp_path / "broker.sqlite.wake"
    listeners = [Doorbell(folder), Doorbell(folder)]
    for bell in listeners:
        bell._listen()
    threads = [threading.Thread(target=bell.wait, args=(30.0,)) for bell in listeners]
    for t in threads:
        t.start()
    time.sleep(0.2)
    Doorbell(folder).ring()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)
    for bell in listeners:
        bell.close()
    assert list(folder.iterdir()) == []


def test_a_ring_removes_the_sockets_of_processes_that_are_gone(tmp_path: Path) -> None:
    folder = tmp_path / "wake"
    folder.mkdir()
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    dead.bind(str(folder / "123-dead.sock"))
    dead.close()  # bound, never unlinked: what a killed process leaves
    Doorbell(folder).ring()
    assert list(folder.iterdir()) == []


def test_a_published_message_wakes_a_worker_that_would_poll_only_every_30_s(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker.register()
    monkeypatch.setattr(broker.Transport, "polling_interval", 30.0)
    url = f"{broker.ALIAS}+sqlite:///{tmp_path / 'broker.sqlite'}"
    queue = Queue("cpu", Exchange("cpu", type="direct"), routing_key="cpu")
    got: list[Any] = []

    def on_message(body: Any, message: Any) -> None:
        got.append(body)
        message.ack()

    with Connection(url) as consumer_conn, consumer_conn.Consumer(queue, callbacks=[on_message]):
        waiting = threading.Thread(target=consumer_conn.drain_events, kwargs={"timeout": 25})
        waiting.start()
        time.sleep(0.5)  # it has looked once, found nothing, and sleeps
        with Connection(url) as producer_conn:
            producer_conn.Producer().publish(
                {"job": "j1"}, exchange=queue.exchange, routing_key="cpu", declare=[queue]
            )
        waiting.join(10)
        assert not waiting.is_alive(), "the worker slept through the ring"
    assert got == [{"job": "j1"}]
    with sqlite3.connect(tmp_path / "broker.sqlite") as db:  # acknowledged: nothing kept
        assert db.execute("SELECT count(*) FROM kombu_message").fetchone() == (0,)
