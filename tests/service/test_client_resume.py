"""`kdq compress` follows a job across dropped event streams: it reconnects with
``Last-Event-ID`` and sees every event once. The peer is a real HTTP server that drops the
connection in the middle of the stream, as a restarted API or a proxy timeout would."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from service.client import Session

EVENTS = [
    (1, "state", '{"state":"RUNNING","previous":"QUEUED"}'),
    (2, "progress", '{"stage":"distill","step":1,"total":2,"loss":0.5,"eta_s":1}'),
    (3, "log", '{"stage":"distill","message":"epoch 2"}'),
    (4, "state", '{"state":"SUCCEEDED","previous":"RUNNING"}'),
]


class DroppingStream(BaseHTTPRequestHandler):
    """Sends at most two events per connection, then closes it without a terminal state."""

    seen: list[str | None] = []

    def do_GET(self) -> None:
        last = self.headers.get("Last-Event-ID")
        self.seen.append(last)
        after = int(last or 0)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        for ident, kind, data in [e for e in EVENTS if e[0] > after][:2]:
            self.wfile.write(f"id: {ident}\nevent: {kind}\ndata: {data}\n\n".encode())
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    DroppingStream.seen = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), DroppingStream)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()


def test_a_dropped_stream_is_resumed_after_the_last_event_seen(server: str) -> None:
    log = io.StringIO()
    with httpx.Client(base_url=server, timeout=10) as client:
        end = Session(client, log=log).follow("job_1")
    assert end == {"state": "SUCCEEDED", "previous": "RUNNING"}
    assert DroppingStream.seen == [None, "2"]
    lines = log.getvalue().splitlines()
    assert "[distill] 1/2 loss 0.5 eta 1s" in lines and "[distill] epoch 2" in lines
    assert sum("resuming after event 2" in line for line in lines) == 1
