"""Webhooks: a job's ``notify`` URL gets the job document, signed with the team's secret, and is
retried until it accepts. The receiver is a real HTTP server that fails twice, then accepts.
Targets on loopback or private ranges are refused unless the operator allows them."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

from kdq.webhooks import InvalidSignature, verify
from service.core.db import Database
from service.core.deliveries import backoff_s, deliver_due
from service.core.models import Team, WebhookDelivery, utcnow
from service.core.settings import Settings
from service.core.states import JobState, transition
from service.core.webhooks import SecretInfo, TargetRefused, check_target, signing_secrets, team_secret

from .assets import FAST_SPEC
from .conftest import Stack
from .flows import ready_upload, submit, wait_job
from .rows import add_job


class FlakyReceiver(BaseHTTPRequestHandler):
    """Answers 500 to the first ``fail`` POSTs, then 204; keeps every request."""

    fail = 2
    seen: ClassVar[list[tuple[dict[str, str], bytes, int]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        status = 500 if len(self.seen) < self.fail else 204
        self.seen.append((dict(self.headers.items()), body, status))
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[str]:
    FlakyReceiver.seen = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FlakyReceiver)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/hooks/kdq"
    finally:
        httpd.shutdown()


def test_a_job_notifies_its_url_signed_and_retried_until_accepted(
    pg_stack: Stack, assets: dict[str, Path], receiver: str
) -> None:
    key = pg_stack.make_key("team-hooks")
    with pg_stack.client(key) as api:
        teacher = ready_upload(api, "models", assets["teacher"], format="zoo_zip")
        data = ready_upload(api, "datasets", assets["data"], format="npz")
        job = {**FAST_SPEC, "teacher_model_id": teacher["id"], "dataset_id": data["id"], "notify": {"url": receiver}}

        # no secret yet: refused, saying how to make one
        r = submit(api, job)
        assert r.status_code == 422 and r.json()["errors"][0]["pointer"] == "#/notify", r.text
        assert api.get("/v1/webhooks/secret").status_code == 404
        made = api.post("/v1/webhooks/secret")
        assert made.status_code == 201 and made.headers["cache-control"] == "no-store"
        secret = made.json()["secret"]
        shown = api.get("/v1/webhooks/secret").json()
        assert shown["version"] == 1 and shown["secret"] is None

        # private and odd targets are refused (the stack allows only 127.0.0.1)
        for url, words in (("http://10.1.2.3/hook", "KDQ_WEBHOOK_ALLOW"), ("http://169.254.169.254/", "link-local"),
                           ("ftp://example.com/", "http"), ("http://user:pw@127.0.0.1/", "credentials")):  # fmt: skip
            r = submit(api, {**job, "notify": {"url": url}})
            assert r.status_code == 422 and words in r.json()["errors"][0]["detail"], (url, r.text)

        r = submit(api, job)
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        assert r.json()["notify"] == {"url": receiver}
        done = wait_job(api, job_id)
        assert done["state"] == "SUCCEEDED"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            deliveries = api.get(f"/v1/jobs/{job_id}/deliveries").json()["items"]
            if deliveries and deliveries[0]["state"] != "pending":
                break
            time.sleep(0.2)
    assert [status for _, _, status in FlakyReceiver.seen] == [500, 500, 204]
    (delivery,) = deliveries
    assert delivery["state"] == "delivered" and delivery["event"] == "SUCCEEDED"
    assert [a["status"] for a in delivery["attempts"]] == [500, 500, 204]
    assert delivery["attempts"][0]["error"] == "HTTP 500" and delivery["attempts"][2]["error"] is None
    for headers, body, _ in FlakyReceiver.seen:
        document = verify(secret, headers, body)  # each attempt signed afresh
        assert document["id"] == job_id and document["state"] == "SUCCEEDED" and document["summary"]
        assert headers["Kdq-Webhook-Id"] == delivery["id"] and headers["Kdq-Webhook-Event"] == "job.succeeded"
    headers, body, _ = FlakyReceiver.seen[-1]
    with pytest.raises(InvalidSignature, match="no signature"):
        verify(secret, headers, body.replace(b"SUCCEEDED", b"FAILED"))
    with pytest.raises(InvalidSignature, match="replay"):
        verify(secret, headers, body, now=int(headers["Kdq-Webhook-Timestamp"]) + 301)
    with pytest.raises(InvalidSignature):
        verify("whsec_other", headers, body)


def _resolver(address: str) -> Any:
    return lambda host, port, type=0: [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]


def test_targets_on_private_ranges_are_refused_unless_allowed() -> None:
    for address in ("127.0.0.1", "10.0.0.5", "192.168.1.1", "169.254.169.254", "0.0.0.0", "100.64.0.1", "224.0.0.1"):
        with pytest.raises(TargetRefused):
            check_target("http://hooks.example/x", "", resolve=_resolver(address))
    target = check_target("https://hooks.example:8443/x?a=1", "", resolve=_resolver("93.184.216.34"))
    assert target.pinned_url() == "https://93.184.216.34:8443/x?a=1" and target.host == "hooks.example"
    assert check_target("http://hooks.example/", "10.0.0.0/8", resolve=_resolver("10.0.0.5")).address == "10.0.0.5"
    assert check_target("http://hooks.internal/", "hooks.internal", resolve=_resolver("10.0.0.5")).address
    with pytest.raises(TargetRefused, match="IPv6|loopback"):
        check_target("http://[::1]/", "")


def test_a_rotation_keeps_the_previous_secret_signing_for_a_day() -> None:
    now = utcnow()
    key = b"operator"
    assert signing_secrets(key, "t", SecretInfo(1, now), now) == [team_secret(key, "t", 1)]
    both = signing_secrets(key, "t", SecretInfo(2, now), now + timedelta(hours=23))
    assert both == [team_secret(key, "t", 2), team_secret(key, "t", 1)]
    assert signing_secrets(key, "t", SecretInfo(2, now), now + timedelta(hours=25)) == [team_secret(key, "t", 2)]
    assert team_secret(key, "t", 1) != team_secret(key, "u", 1) != team_secret(b"other", "t", 1)


def test_a_delivery_is_given_up_after_the_retry_window(unit_pg_url: str, tmp_path: Path) -> None:
    """Rows, not memory: the delivery made with the final state is found by any API process's pass."""
    db = Database(unit_pg_url)
    settings = Settings(data_dir=tmp_path, database_url=unit_pg_url, webhook_backoff_s=0.05,
                        webhook_retry_for_s=0.3, webhook_timeout_s=1)  # fmt: skip
    with db.write() as s:
        s.merge(Team(id="default", name="default"))
    port = socket.socket()
    port.bind(("127.0.0.1", 0))  # bound, never listening: every attempt is refused
    url = f"http://127.0.0.1:{port.getsockname()[1]}/"
    job_id = add_job(db, JobState.RUNNING, attempts=1, notify={"url": url})
    with db.write() as s:
        transition(s, job_id, JobState.FAILED, error={"title": "x", "status": 500})
    states: list[str] = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and "failed" not in states:
        states += deliver_due(db, settings.model_copy(update={"webhook_allow": "127.0.0.1/32"}), lambda _: b"{}").values()
        time.sleep(0.05)
    with db.read() as s:
        row = s.query(WebhookDelivery).filter_by(job_id=job_id).one()
    assert row.state == "failed" and len(row.attempts) >= 2 and all(a["status"] is None for a in row.attempts)
    assert row.event == "FAILED" and json.dumps(row.attempts)
    assert backoff_s(settings, 1) == 0.05 and backoff_s(settings, 3) == 0.2 and backoff_s(Settings(), 40) == 3600
    port.close()
    db.dispose()
