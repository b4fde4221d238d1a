"""`kdq.Client` (and so `kdq compress`) follows a job across dropped event streams: it reconnects with
``Last-Event-ID`` and sees every event once. The peer is a real HTTP server that drops the
connection in the middle of the stream, as a restarted API or a proxy timeout would."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from kdq.client import Client
from kdq.progress import JobView

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
    view = JobView(log, "lines", "job_1")
    with httpx.Client(base_url=server, timeout=10) as http:
        seen = []
        for kind, data in Client(http=http, log=log).events("job_1"):
            seen.append((kind, data))
            view.event(kind, data)
    assert [kind for kind, _ in seen] == ["state", "progress", "log", "state"]
    assert seen[-1][1] == {"state": "SUCCEEDED", "previous": "RUNNING"}
    assert DroppingStream.seen == [None, "2"]
    lines = log.getvalue().splitlines()
    assert any(line.startswith("[distill] 1/2 loss 0.5") for line in lines) and "[distill] epoch 2" in lines
    assert sum("resuming after event 2" in line for line in lines) == 1
