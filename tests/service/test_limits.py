"""Limits, on the real stack: hostile-cost uploads end ``invalid`` with a named code while another
team's upload is ready within seconds and no worker process is lost; job specs that could only
exhaust a worker are refused at submission (422, naming the field); bodies PostgreSQL could not
store are 422s, not 500s; finished jobs' files can be deleted; request heads and event streams
are capped."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import numpy as np
import psutil
import pytest

from tests.malicious import costly

from .assets import FAST_SPEC
from .conftest import Stack
from .flows import submit, upload, wait_upload

EXPECTED: dict[str, str] = {
    **{name: "resource_limit" for name in costly.ONNX_BOMBS},
    **{name: "shape_mismatch" for name in costly.HF_BLOWUPS},
    "parquet_rows": "resource_limit",
    "png_zip": "resource_limit",
    "jsonl_keys": "invalid_dataset",
}


def _corpus(folder: Path) -> list[tuple[str, str, Path, dict[str, str]]]:
    """(name, upload kind, file, form fields) for every hostile-cost item."""
    items = [(name, "models", write(folder / f"{name}.onnx"), {"format": "onnx"})
             for name, write in costly.ONNX_BOMBS.items()]  # fmt: skip
    items += [(name, "models", costly.hf_zip(folder / f"{name}.zip", **cfg), {"format": "hf_zip"})
              for name, cfg in costly.HF_BLOWUPS.items()]  # fmt: skip
    items += [
        ("parquet_rows", "datasets", costly.parquet_rows(folder / "rows.parquet", rows=100_000_000, row_groups=10),
         {"format": "parquet"}),
        ("png_zip", "datasets", costly.png_zip(folder / "big.zip"), {"format": "image_zip"}),
        ("jsonl_keys", "datasets", costly.jsonl_keys(folder / "keys.jsonl", lines=600, keys_per_line=600),
         {"format": "jsonl"}),
    ]  # fmt: skip
    return items


def _worker_processes(stack: Stack) -> dict[str, set[int]]:
    """Each worker's process and its long-lived pool children (the stack is idle when called)."""
    out = {}
    for name, proc in stack.procs.items():
        if name.startswith("worker"):
            assert proc.poll() is None, f"{name} exited ({proc.returncode})\n{stack.log_tail()}"
            out[name] = {proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))}
    return out


def _small_npz(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    np.savez(path, x=rng.normal(size=(64, 6)).astype(np.float32), y=rng.integers(0, 3, 64))
    return path


def test_hostile_uploads_end_invalid_while_another_team_goes_on(pg_stack: Stack, tmp_path: Path) -> None:
    corpus = _corpus(tmp_path)
    assert all(path.stat().st_size < 8 << 20 for _, _, path, _ in corpus)
    before = _worker_processes(pg_stack)
    bystander_waits: list[float] = []
    stop = threading.Event()

    def bystander() -> None:
        with pg_stack.client(pg_stack.make_key("limits-bystander")) as b:
            i = 0
            while not stop.is_set():
                t0 = time.monotonic()
                r = upload(b, "datasets", _small_npz(tmp_path / f"small{i}.npz", i), format="npz")
                assert r.status_code == 201, r.text
                body = wait_upload(b, "datasets", r.json()["id"], timeout=60)
                assert body["state"] == "ready", body
                bystander_waits.append(time.monotonic() - t0)
                i += 1
                stop.wait(1.0)

    with pg_stack.client(pg_stack.make_key("limits-hostile")) as hostile:
        helper = threading.Thread(target=bystander, daemon=True)
        helper.start()
        t0 = time.monotonic()
        sent = {}
        for name, kind, path, fields in corpus:
            r = upload(hostile, kind, path, **fields)
            assert r.status_code == 201, (name, r.text)  # accepted: only validation can tell
            sent[name] = (kind, r.json()["id"])
        outcomes = {name: wait_upload(hostile, kind, ident, timeout=180) for name, (kind, ident) in sent.items()}
        elapsed = time.monotonic() - t0
        stop.set()
        helper.join(90)
    codes = {name: (body["state"], (body.get("error") or {}).get("code")) for name, body in outcomes.items()}
    assert codes == {name: ("invalid", code) for name, code in EXPECTED.items()}, codes
    for name, body in outcomes.items():
        assert body["error"]["detail"], name
        if EXPECTED[name] == "resource_limit":
            assert "past half of this task's memory limit of 3.0 GiB" in body["error"]["detail"], body["error"]
    assert elapsed < 150, elapsed
    assert bystander_waits and max(bystander_waits) < 10, bystander_waits
    assert _worker_processes(pg_stack) == before  # no worker, and no pool process, was lost
    assert httpx.get(f"{pg_stack.url}/readyz", timeout=10).status_code == 200


def _spec(ids: dict[str, str], **changes: Any) -> dict[str, Any]:
    spec = json.loads(json.dumps({**FAST_SPEC, **ids}))
    for path, value in changes.items():
        node = spec
        *parents, leaf = path.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return spec


COSTLY_SPECS: list[tuple[str, dict[str, Any], str]] = [
    ("giant zoo student", {"student": {"kind": "zoo", "architecture": {"architecture": "mlp",
                                                                       "hidden": [30000, 30000]}}},
     "#/student/architecture"),
    ("huge latency batch", {"evaluation__latency_batch_sizes": [50_000_000]}, "#/evaluation/latency_batch_sizes/0"),
    ("no latency batch", {"evaluation__latency_batch_sizes": []}, "#/evaluation/latency_batch_sizes"),
    ("zero latency batch", {"evaluation__latency_batch_sizes": [0]}, "#/evaluation/latency_batch_sizes/0"),
    ("20,000 latency batches", {"evaluation__latency_batch_sizes": [1] * 20_000}, "#/evaluation/latency_batch_sizes"),
    ("hf vocab 40M", {"student": {"kind": "hf_config", "hf_config": {"vocab_size": 40_000_000}}},
     "#/student/hf_config"),
    ("max_params 1e15", {"student": {"kind": "auto", "max_params": 10**15}}, "#/student/max_params"),
    ("block size 1e12", {"quantization": {"method": "int4", "block_size": 10**12}},
     "#/quantization/block_size"),
    ("seed 2**80", {"distillation__seed": 2**80}, "#/distillation/seed"),
    ("noise 1e308", {"distillation__augment_noise": 1e308}, "#/distillation/augment_noise"),
    ("a million epochs", {"distillation__epochs": 1_000_000}, "#/distillation/epochs"),
]  # fmt: skip


@pytest.mark.parametrize(("label", "changes", "where"), COSTLY_SPECS, ids=[c[0] for c in COSTLY_SPECS])
def test_costly_spec_refused_at_submission(api: httpx.Client, pg_uploads: dict[str, Any], label: str,
                                           changes: dict[str, Any], where: str) -> None:  # fmt: skip
    ids = {"teacher_model_id": pg_uploads["teacher"]["id"], "dataset_id": pg_uploads["dataset"]["id"]}
    before = api.get("/v1/jobs", params={"page_size": 1}).json()
    r = submit(api, _spec(ids, **changes))
    assert r.status_code == 422, (label, r.text)
    assert r.headers["content-type"] == "application/problem+json"
    pointers = [e.get("pointer") for e in r.json()["errors"]]
    assert where in pointers, (label, r.json())
    assert api.get("/v1/jobs", params={"page_size": 1}).json() == before  # nothing was stored


@pytest.mark.parametrize(("raw", "where"), [
    ('"lr": Infinity', "#/distillation/lr"),
    ('"lr": NaN', "#/distillation/lr"),
    ('"lr": -Infinity', "#/distillation/lr"),
])  # fmt: skip
def test_non_finite_numbers_in_a_body_are_422(api: httpx.Client, pg_uploads: dict[str, Any], raw: str,
                                              where: str) -> None:  # fmt: skip
    body = (f'{{"teacher_model_id": "{pg_uploads["teacher"]["id"]}", "dataset_id": "{pg_uploads["dataset"]["id"]}",'
            f' "distillation": {{"epochs": 1, {raw}}}}}')  # fmt: skip
    r = api.post("/v1/jobs", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert where in [e.get("pointer") for e in r.json()["errors"]], r.json()


def test_lone_surrogate_and_nan_metadata_are_422(api: httpx.Client, pg_uploads: dict[str, Any],
                                                 tmp_path: Path) -> None:  # fmt: skip
    ids = f'"teacher_model_id": "{pg_uploads["teacher"]["id"]}", "dataset_id": "{pg_uploads["dataset"]["id"]}"'
    for field, where in [('"name": "bad \\ud800 name"', "#/name"),
                         ('"student": {"kind": "zoo", "architecture": {"architecture": "mlp", "\\ud800": 1}}',
                          "#/student/architecture/\ud800"),
                         ('"tags": ["ok", "\\udfff"]', "#/tags/1")]:  # fmt: skip
        r = api.post("/v1/jobs", content=f"{{{ids}, {field}}}", headers={"content-type": "application/json"})
        assert r.status_code == 422, (field, r.text)
        assert where in [e.get("pointer") for e in r.json()["errors"]], (field, r.json())
    path = _small_npz(tmp_path / "m.npz", 1)
    for field, value in [("metadata", '{"a": NaN}'), ("image_mean", "[NaN, 0.5, 0.5]"),
                         ("metadata", '{"k": "\\ud800"}')]:  # fmt: skip
        r = upload(api, "datasets", path, format="npz", **{field: value})
        assert r.status_code == 422, (field, value, r.text)
        assert r.headers["content-type"] == "application/problem+json"


def test_forged_page_token_is_422(api: httpx.Client) -> None:
    import base64

    forged = base64.urlsafe_b64encode(json.dumps(["9999-12-31T23:59:59-23:59", "job_x"]).encode()).decode()
    for kind in ("jobs", "models", "datasets"):
        r = api.get(f"/v1/{kind}", params={"page_token": forged.rstrip("=")})
        assert r.status_code == 422, (kind, r.text)
        assert r.json()["errors"][0]["parameter"] == "page_token"


def _raw_request(url: str, head: bytes) -> bytes:
    parsed = urlparse(url)
    with socket.create_connection((parsed.hostname, parsed.port), timeout=10) as sock:
        try:
            sock.sendall(head)
        except (BrokenPipeError, ConnectionResetError):
            pass
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def test_oversized_request_head_is_431_and_the_api_stays_small(pg_stack: Stack) -> None:
    api_proc = psutil.Process(pg_stack.procs["api"].pid)
    rss_before = api_proc.memory_info().rss
    header = b"X-Big: " + b"a" * (8 << 20) + b"\r\n"
    answers = []
    threads = [threading.Thread(target=lambda: answers.append(_raw_request(
        pg_stack.url, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + header + b"\r\n"))) for _ in range(5)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(answers) == 5 and all(a.startswith(b"HTTP/1.1 431 ") for a in answers), [a[:60] for a in answers]
    assert api_proc.memory_info().rss - rss_before < 64 << 20
    fine = _raw_request(pg_stack.url, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Ok: " + b"b" * 4000
                        + b"\r\nConnection: close\r\n\r\n")  # fmt: skip
    assert fine.startswith(b"HTTP/1.1 200 "), fine[:200]
    body = json.dumps({"name": "a" * 300_000}).encode()  # the head and a large body in one write
    big = _raw_request(pg_stack.url, b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                       + pg_stack.key.encode() + b"\r\nContent-Type: application/json\r\nConnection: close\r\n"
                       + b"Content-Length: %d\r\n\r\n" % len(body) + body)  # fmt: skip
    assert big.startswith(b"HTTP/1.1 422 "), big[:300]


def test_delete_a_finished_jobs_files_keeps_its_record(api: httpx.Client, pg_uploads: dict[str, Any]) -> None:
    from .flows import wait_job

    ids = {"teacher_model_id": pg_uploads["teacher"]["id"], "dataset_id": pg_uploads["dataset"]["id"]}
    job_id = submit(api, {**FAST_SPEC, **ids}).json()["id"]
    early = api.delete(f"/v1/jobs/{job_id}")  # queued: only a finished job's files can be deleted
    assert early.status_code == 409 and early.json()["code"] == "job_not_finished", early.text
    job = wait_job(api, job_id)
    assert job["state"] == "SUCCEEDED", job
    usage = api.get("/v1/me").json()
    names = [a["name"] for a in api.get(f"/v1/jobs/{job_id}/artifacts").json()["items"]]
    assert "report.html" in names
    r = api.delete(f"/v1/jobs/{job_id}/artifacts/report.html")
    assert r.status_code == 204, r.text
    assert api.get(f"/v1/jobs/{job_id}/artifacts/report.html").status_code == 404
    assert api.delete(f"/v1/jobs/{job_id}/artifacts/report.html").status_code == 404
    r = api.delete(f"/v1/jobs/{job_id}")
    assert r.status_code == 200, r.text
    assert r.json()["deleted_at"] is not None and r.json()["state"] == "SUCCEEDED"
    assert api.get(f"/v1/jobs/{job_id}/artifacts").json()["items"] == []
    kept = api.get(f"/v1/jobs/{job_id}").json()
    assert kept["deleted_at"] == r.json()["deleted_at"] and kept["summary"] == job["summary"]
    after = api.get("/v1/me").json()
    assert after["usage"]["stored_bytes"] < usage["usage"]["stored_bytes"], (usage, after)


def test_event_streams_per_team_are_capped(pg_stack: Stack, finished_job: Any) -> None:
    """Streams of a finished job end at once; a running one's stay open. Hold the team's share open
    on a job that cannot finish (cancelled to stop it afterwards)."""
    limit = 32
    job_id = finished_job.job["id"]
    key = pg_stack.make_key("limits-streams")
    with pg_stack.client(key) as c:
        assert c.get(f"/v1/jobs/{job_id}/events").status_code == 404  # another team's job
    # a team's own streams: hold `limit` open on this team's running job, then one more is refused
    with pg_stack.client() as a:
        spec = {**FAST_SPEC, "teacher_model_id": finished_job.teacher["id"], "dataset_id": finished_job.dataset["id"],
                "distillation": {**FAST_SPEC["distillation"], "epochs": 400}}  # fmt: skip
        running = submit(a, spec).json()["id"]
        clients = [pg_stack.client() for _ in range(limit + 1)]
        streams = []
        try:
            for c in clients[:limit]:
                cm = c.stream("GET", f"/v1/jobs/{running}/events")
                resp = cm.__enter__()
                assert resp.status_code == 200
                streams.append(cm)
            refused = clients[limit].get(f"/v1/jobs/{running}/events")
            assert refused.status_code == 429, refused.text
            assert refused.json()["code"] == "too_many_streams" and refused.headers["retry-after"]
            streams.pop().__exit__(None, None, None)
            deadline = time.monotonic() + 10
            while True:  # the closed stream's slot comes back once the server sees it gone
                again = clients[limit].stream("GET", f"/v1/jobs/{running}/events")
                resp = again.__enter__()
                if resp.status_code == 200:
                    again.__exit__(None, None, None)
                    break
                resp.read()
                again.__exit__(None, None, None)
                assert time.monotonic() < deadline, "the stream slot never came back"
                time.sleep(0.5)
        finally:
            for cm in streams:
                cm.__exit__(None, None, None)
            for c in clients:
                c.close()
            a.post(f"/v1/jobs/{running}/cancel")
