"""What a client does over HTTP: upload, wait, submit, follow, download."""

from __future__ import annotations

import hashlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}


def upload(client: httpx.Client, kind: str, path: Path, **fields: str) -> httpx.Response:
    with open(path, "rb") as f:
        return client.post(f"/v1/{kind}", files={"file": (path.name, f)}, data=fields)


def wait_upload(client: httpx.Client, kind: str, ident: str, timeout: float = 90) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(f"/v1/{kind}/{ident}").json()
        if body["state"] != "validating":
            return body
        time.sleep(0.2)
    raise TimeoutError(f"{kind} {ident} still validating after {timeout}s")


def ready_upload(client: httpx.Client, kind: str, path: Path, **fields: str) -> dict[str, Any]:
    r = upload(client, kind, path, **fields)
    assert r.status_code == 201, r.text
    body = wait_upload(client, kind, r.json()["id"])
    assert body["state"] == "ready", body
    return body


def submit(client: httpx.Client, spec: dict[str, Any], **headers: str) -> httpx.Response:
    return client.post("/v1/jobs", json=spec, headers=headers)


def wait_job(
    client: httpx.Client,
    job_id: str,
    states: set[str] = TERMINAL,
    timeout: float = 180,
    seen: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Poll until the job reaches one of ``states``; ``seen`` collects every answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if seen is not None:
            seen.append(job)
        if job["state"] in states:
            return job
        time.sleep(0.2)
    raise TimeoutError(f"job {job_id} not in {states} after {timeout}s: {job}")


def sse_events(
    client: httpx.Client,
    job_id: str,
    last_event_id: int | None = None,
    limit: int | None = None,
    timeout: float = 180,
) -> list[dict[str, Any]]:
    """Read the job's event stream (until it ends, or ``limit`` events) as dicts with id/event/data."""
    headers = {"Last-Event-ID": str(last_event_id)} if last_event_id is not None else {}
    events: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    with client.stream(
        "GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=httpx.Timeout(timeout, read=timeout)
    ) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if not line:
                if "event" in current:
                    events.append(current)
                    if limit is not None and len(events) >= limit:
                        break
                current = {}
            elif line.startswith("id: "):
                current["id"] = int(line[4:])
            elif line.startswith("event: "):
                current["event"] = line[7:]
            elif line.startswith("data: "):
                current["data"] = json.loads(line[6:])
    return events


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def run_job(
    client: httpx.Client, teacher: dict[str, Any], dataset: dict[str, Any], spec: dict[str, Any] | None = None
) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """Submit a job and follow it to the end by polling and, at the same time, by SSE.
    Returns (final job, SSE events, every polled job)."""
    from .assets import FAST_SPEC

    r = submit(
        client, {**(spec or FAST_SPEC), "teacher_model_id": teacher["id"], "dataset_id": dataset["id"]}
    )
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    assert r.headers["location"] == f"/v1/jobs/{job_id}"
    with ThreadPoolExecutor(1) as pool, httpx.Client(
        base_url=str(client.base_url), headers=client.headers, timeout=30
    ) as sse_client:
        following = pool.submit(sse_events, sse_client, job_id)
        polled: list[dict[str, Any]] = []
        job = wait_job(client, job_id, seen=polled)
        events = following.result(timeout=60)
    return job, events, polled
