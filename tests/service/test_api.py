"""The HTTP contract against the real API process: problems for bad input (with nothing stored
changed), uploads, listing, idempotency, downloads, operations endpoints."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from .assets import FAST_SPEC
from .conftest import REPO, FinishedJob, Stack
from .flows import sha256_of, submit, upload, wait_job, wait_upload

PROBLEM = "application/problem+json"


def snapshot(stack: Stack, client: httpx.Client) -> dict[str, Any]:
    """Everything a bad request must leave untouched: rows (as the API lists them) and blobs."""
    store = Path(stack.env["KDQ_STORAGE_DIR"])
    return {
        "models": client.get("/v1/models", params={"page_size": 200}).json()["items"],
        "datasets": client.get("/v1/datasets", params={"page_size": 200}).json()["items"],
        "jobs": [j["id"] for j in client.get("/v1/jobs", params={"page_size": 200}).json()["items"]],
        "blobs": sorted(str(p.relative_to(store)) for p in store.rglob("*") if p.is_file()),
    }


def assert_problem(r: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == PROBLEM
    body = r.json()
    assert body["status"] == status and body["title"] and "Traceback" not in r.text
    if code is not None:
        assert body["code"] == code, body
    return body


def pointers(body: dict[str, Any]) -> set[str]:
    return {e.get("pointer") or e.get("parameter") for e in body["errors"]}


@pytest.fixture
def unchanged(pg_stack: Stack, api: httpx.Client) -> Iterator[None]:
    before = snapshot(pg_stack, api)
    yield
    assert snapshot(pg_stack, api) == before


def test_bad_uploads_are_problems_and_store_nothing(
    api: httpx.Client, unchanged: None, assets: dict[str, Path]
) -> None:
    teacher = assets["teacher"].read_bytes()
    assert_problem(api.post("/v1/models", json={"file": "x"}), 415, "unsupported_media_type")
    body = assert_problem(api.post("/v1/models", data={"name": "x"}, files={"other": ("a", b"1")}), 422)
    assert pointers(body) == {"#/other"}
    body = assert_problem(api.post("/v1/models", files={"name": (None, "no file")}), 422)
    assert pointers(body) == {"#/file"}
    body = assert_problem(upload(api, "models", assets["teacher"], format="tflite"), 422)
    assert pointers(body) == {"#/format"}
    body = assert_problem(upload(api, "models", assets["teacher"], colour="blue"), 422)
    assert pointers(body) == {"#/colour"}
    body = assert_problem(upload(api, "models", assets["teacher"], metadata="{not json"), 422)
    assert pointers(body) == {"#/metadata"}
    assert_problem(
        api.post("/v1/models", files={"file": ("m.zip", b"not a zip")}, data={"format": "zoo_zip"}),
        415,
        "unsupported_media_type",
    )
    assert_problem(api.post("/v1/models", files={"file": ("m.onnx", b"")}), 422)
    body = assert_problem(upload(api, "datasets", assets["data"], image_size="a,b"), 422)
    assert pointers(body) == {"#/image_size/0", "#/image_size/1"}
    body = assert_problem(upload(api, "datasets", assets["data"], max_length="2"), 422)
    assert pointers(body) == {"#/max_length"}

    # a body cut before its closing boundary (a truncated upload)
    boundary = "b0undary"
    cut = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="t.zip"\r\n\r\n'
    ).encode() + teacher[:1000]
    r = api.post(
        "/v1/models", content=cut, headers={"content-type": f"multipart/form-data; boundary={boundary}"}
    )
    assert_problem(r, 400, "incomplete_body")


def test_unknown_ids_are_404(api: httpx.Client, unchanged: None) -> None:
    for path in (
        "/v1/models/mdl_nope",
        "/v1/datasets/ds_nope",
        "/v1/jobs/job_nope",
        "/v1/jobs/job_nope/events",
        "/v1/jobs/job_nope/artifacts",
        "/v1/jobs/job_nope/artifacts/model.onnx",
        "/v1/jobs/job_nope/metrics",
        "/v1/jobs/job_nope/report",
        "/v1/nothing-here",
    ):
        assert_problem(api.get(path), 404, "not_found")
    assert_problem(api.delete("/v1/models/mdl_nope"), 404)
    assert_problem(api.post("/v1/jobs/job_nope/cancel"), 404)


def test_invalid_job_specs_are_422_with_pointers(
    api: httpx.Client, unchanged: None, pg_uploads: dict[str, Any], assets: dict[str, Path]
) -> None:
    ids = {"teacher_model_id": pg_uploads["teacher"]["id"], "dataset_id": pg_uploads["dataset"]["id"]}
    body = assert_problem(
        submit(api, {**ids, "distillation": {"epochs": 0, "temperature": -1}, "colour": 1}), 422
    )
    assert pointers(body) == {"#/distillation/epochs", "#/distillation/temperature", "#/colour"}
    assert "did you mean" not in body["errors"][-1]["detail"]  # nothing close to "colour"
    body = assert_problem(submit(api, {**ids, "distilation": {"epochs": 3}}), 422)  # a typo names the field meant
    assert [e["detail"] for e in body["errors"]] == ["Extra inputs are not permitted; did you mean 'distillation'?"]
    body = assert_problem(upload(api, "datasets", assets["data"], lable_column="y"), 422)
    assert "did you mean 'label_column'?" in body["errors"][0]["detail"], body
    body = assert_problem(submit(api, {**ids, "student": {"kind": "zoo"}}), 422)
    assert pointers(body) == {"#/student/architecture"}
    body = assert_problem(submit(api, {"dataset_id": ids["dataset_id"]}), 422)
    assert pointers(body) == {"#/teacher_model_id"}
    body = assert_problem(submit(api, {**ids, "teacher_model_id": "mdl_missing"}), 422)
    assert pointers(body) == {"#/teacher_model_id"}
    body = assert_problem(submit(api, {**ids, "task": "regression"}), 422)
    assert pointers(body) == {"#/task"}
    body = assert_problem(
        submit(api, {**ids, "distillation": {"target": {"metric": "cosine", "min": 0.9}}}), 422
    )
    assert pointers(body) == {"#/distillation/target/metric"}
    body = assert_problem(submit(api, {**ids, "student": None, "quantization": {"method": "none"}}), 422)
    assert pointers(body) == {"#/quantization"}
    assert_problem(
        api.post("/v1/jobs", content=b"{not json", headers={"content-type": "application/json"}), 422
    )
    assert_problem(api.post("/v1/jobs", content=b"teacher=x", headers={"content-type": "text/plain"}), 415)
    assert_problem(
        api.post("/v1/jobs", content=b"[" * (2 << 20), headers={"content-type": "application/json"}), 413
    )
    body = assert_problem(api.get("/v1/jobs", params={"page_token": "garbage"}), 422)
    assert pointers(body) == {"page_token"}
    body = assert_problem(api.get("/v1/jobs", params={"state": "SLEEPING"}), 422)
    assert pointers(body) == {"state.0"}


def test_uploads_that_fail_validation_become_invalid(
    api: httpx.Client, pg_uploads: dict[str, Any], assets: dict[str, Path], tmp_path: Path
) -> None:
    truncated = upload(api, "models", assets["truncated"], format="zoo_zip")
    assert truncated.status_code == 201 and truncated.json()["state"] == "validating"
    garbage = tmp_path / "model.onnx"
    garbage.write_bytes(b"\x08\x07" + bytes(range(256)) * 8)
    wrong = upload(api, "models", garbage, format="onnx")
    not_npz = upload(api, "datasets", assets["teacher"], format="npz")  # a zip, but no arrays in it
    for kind, r in (("models", truncated), ("models", wrong), ("datasets", not_npz)):
        body = wait_upload(api, kind, r.json()["id"])
        assert body["state"] == "invalid" and body["summary"] is None, body
        assert body["error"]["status"] == 422 and body["error"]["detail"] and body["error"]["code"], body
        assert "Traceback" not in body["error"]["detail"]
    r = submit(api, {"teacher_model_id": truncated.json()["id"], "dataset_id": pg_uploads["dataset"]["id"]})
    body = assert_problem(r, 422)
    assert pointers(body) == {"#/teacher_model_id"} and "invalid" in body["errors"][0]["detail"]


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def test_oversize_uploads_are_413_with_flat_memory(
    pg_stack: Stack, api: httpx.Client, unchanged: None
) -> None:
    cap = int(pg_stack.env["KDQ_MAX_UPLOAD_BYTES"])
    pid = pg_stack.procs["api"].pid
    chunk = b"\0" * (1 << 20)

    def body(n_chunks: int) -> Iterator[bytes]:
        yield b'--xx\r\nContent-Disposition: form-data; name="file"; filename="big.bin"\r\n\r\n'
        for _ in range(n_chunks):
            yield chunk

    before = _rss(pid)
    headers = {"content-type": "multipart/form-data; boundary=xx"}
    r = api.post("/v1/models", content=body(cap // len(chunk) * 5), headers=headers)  # chunked: no length
    assert_problem(r, 413, "too_large")
    r = api.post(
        "/v1/datasets", content=b"".join(body(cap // len(chunk) + 1)), headers=headers
    )  # with a length
    assert_problem(r, 413, "too_large")
    assert _rss(pid) - before < 16 << 20, "the API buffered the upload"
    assert list((Path(pg_stack.env["KDQ_STORAGE_DIR"]) / "tmp").iterdir()) == []


def test_upload_list_get_and_delete(pg_stack: Stack, api: httpx.Client, assets: dict[str, Path]) -> None:
    store = Path(pg_stack.env["KDQ_STORAGE_DIR"])
    payload = b"kdq test payload " + str(time.time_ns()).encode()
    made = []
    for i in range(3):
        r = api.post(
            "/v1/models",
            files={"file": (f"m{i}.onnx", payload)},
            data={"format": "onnx", "name": f"m{i}", "metadata": '{"owner": "tests"}'},
        )
        assert r.status_code == 201 and r.headers["location"] == f"/v1/models/{r.json()['id']}"
        made.append(r.json())
    assert {m["sha256"] for m in made} == {sha256_of(payload)} and made[0]["metadata"] == {"owner": "tests"}
    blob = store / "sha256" / made[0]["sha256"][:2] / made[0]["sha256"][2:]
    assert blob.read_bytes() == payload  # stored once, under its hash

    seen, token = [], None
    while True:
        page = api.get(
            "/v1/models", params={"page_size": 2, **({"page_token": token} if token else {})}
        ).json()
        assert len(page["items"]) <= 2
        seen += [m["id"] for m in page["items"]]
        token = page["next_page_token"]
        if token is None:
            break
    assert len(seen) == len(set(seen)) and [m["id"] for m in reversed(made)] == seen[:3]  # newest first

    for m in made:
        wait_upload(api, "models", m["id"])
    for i, m in enumerate(made):
        assert api.delete(f"/v1/models/{m['id']}").status_code == 204
        assert_problem(api.get(f"/v1/models/{m['id']}"), 404)
        assert blob.exists() == (i < 2)  # the blob goes with the last upload that uses it


def test_idempotent_submission(api: httpx.Client, pg_uploads: dict[str, Any]) -> None:
    spec = {
        **FAST_SPEC,
        "teacher_model_id": pg_uploads["teacher"]["id"],
        "dataset_id": pg_uploads["dataset"]["id"],
    }
    key = f"test-{time.time_ns()}"
    first = submit(api, spec, **{"Idempotency-Key": key})
    try:
        assert first.status_code == 202
        again = submit(api, {**spec, "evaluation": {**FAST_SPEC["evaluation"]}}, **{"Idempotency-Key": key})
        assert again.status_code == 202 and again.json()["id"] == first.json()["id"]
        assert again.headers["location"] == first.headers["location"]
        other = submit(api, {**spec, "distillation": {"epochs": 3}}, **{"Idempotency-Key": key})
        body = assert_problem(other, 422)
        assert pointers(body) == {"Idempotency-Key"}
        ids = [j["id"] for j in api.get("/v1/jobs", params={"page_size": 200}).json()["items"]]
        assert ids.count(first.json()["id"]) == 1
    finally:
        api.post(f"/v1/jobs/{first.json()['id']}/cancel")
        wait_job(api, first.json()["id"], timeout=120)


def test_job_listing_filters_by_state(api: httpx.Client, finished_job: FinishedJob) -> None:
    items = api.get("/v1/jobs", params={"state": ["SUCCEEDED"], "page_size": 200}).json()["items"]
    assert finished_job.job["id"] in {j["id"] for j in items} and {j["state"] for j in items} == {"SUCCEEDED"}
    queued = api.get("/v1/jobs", params={"state": "QUEUED"}).json()["items"]
    assert finished_job.job["id"] not in {j["id"] for j in queued}


def test_downloads_honour_etag_and_range(api: httpx.Client, finished_job: FinishedJob) -> None:
    listing = api.get(f"/v1/jobs/{finished_job.job['id']}/artifacts").json()["items"]
    art = next(a for a in listing if a["name"] == "model_int8.onnx")
    full = api.get(art["url"]).content
    etag = f'"{art["sha256"]}"'
    r = api.get(art["url"], headers={"Range": "bytes=10-19"})
    assert r.status_code == 206 and r.content == full[10:20]
    assert r.headers["content-range"] == f"bytes 10-19/{len(full)}" and r.headers["etag"] == etag
    r = api.get(art["url"], headers={"Range": "bytes=-5"})
    assert r.status_code == 206 and r.content == full[-5:]
    r = api.get(art["url"], headers={"Range": "bytes=0-3", "If-Range": '"not-the-etag"'})
    assert r.status_code == 200 and r.content == full  # stale If-Range: the whole file
    r = api.get(art["url"], headers={"If-None-Match": etag})
    assert r.status_code == 304 and r.content == b"" and r.headers["etag"] == etag
    assert api.get(art["url"], headers={"If-None-Match": '"other"'}).status_code == 200
    body = assert_problem(
        api.get(art["url"], headers={"Range": f"bytes={len(full) + 10}-"}), 416, "bad_range"
    )
    assert body["detail"]
    assert_problem(api.get(art["url"], headers={"Range": "bytes=abc"}), 400, "bad_range")
    r = api.get(art["url"], headers={"Range": "lines=1-2"})  # a unit we do not know is ignored
    assert r.status_code == 200 and r.content == full


def test_health_readiness_and_metrics(pg_stack: Stack, api: httpx.Client, finished_job: FinishedJob) -> None:
    from .conftest import kdq

    assert (
        subprocess.run(kdq("check"), cwd=REPO, env=pg_stack.env, capture_output=True, check=False).returncode
        == 0
    )
    assert api.get("/healthz").json() == {"status": "ok", "checks": {}, "parts": {}}
    assert api.get("/readyz").json()["checks"] == {"database": "ok", "broker": "ok"}
    text = api.get("/metrics").text
    assert 'kdq_jobs{state="SUCCEEDED"}' in text and 'kdq_queue_depth{queue="validate"}' in text
    assert "kdq_job_duration_seconds_count" in text
    uploaded = [ln for ln in text.splitlines() if ln.startswith('kdq_uploaded_bytes_total{kind="model"}')]
    assert uploaded and float(uploaded[0].split()[-1]) >= finished_job.teacher["size_bytes"]
    succeeded = next(ln for ln in text.splitlines() if ln.startswith('kdq_jobs{state="SUCCEEDED"}'))
    assert float(succeeded.split()[-1]) >= 1


def test_broker_down_means_503_and_nothing_stored(
    tmp_path: Path, assets: dict[str, Path], fresh_pg_url: str
) -> None:
    from .conftest import base_env, free_port, kdq

    port = free_port()
    env = base_env(KDQ_DATA_DIR=str(tmp_path), KDQ_DATABASE_URL=fresh_pg_url, KDQ_BROKER_URL="redis://127.0.0.1:1/0",
                   KDQ_AUTH="none")  # fmt: skip
    stack = Stack(f"http://127.0.0.1:{port}", env, tmp_path)
    subprocess.run(kdq("migrate"), cwd=REPO, env=env, check=True, capture_output=True)
    stack.spawn("api", kdq("api", "--host", "127.0.0.1", "--port", str(port)))
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(stack.url + "/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.2)
        check = subprocess.run(kdq("check"), cwd=REPO, env=env, capture_output=True, text=True, check=False)
        assert check.returncode == 1 and "unhealthy" in check.stderr  # the workers' health check
        with stack.client() as client:
            body = assert_problem(client.get("/readyz"), 503, "not_ready")
            assert "broker" in body["detail"] and "database" not in body["detail"]
            assert_problem(upload(client, "models", assets["teacher"]), 503, "broker_unavailable")
            assert client.get("/v1/models").json()["items"] == []
        assert [p for p in (tmp_path / "store").rglob("*") if p.is_file()] == []
    finally:
        stack.stop()
