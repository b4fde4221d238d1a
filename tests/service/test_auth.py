"""Teams and keys: one 401 for every bad key, 404 across teams, admin scope, quotas, retention,
and the loopback-only ``--no-auth`` (real processes, real Postgres; key format units on SQLite)."""

from __future__ import annotations

import hashlib
import re
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from sqlalchemy import text

from service.core.auth import (
    KeyCache,
    Principal,
    bearer_token,
    create_key,
    find_key,
    generate_key,
    hash_key,
    lookup,
    parse_key,
    revoke_key,
)
from service.core.db import Database
from service.core.models import ApiKey, utcnow

from .assets import FAST_SPEC
from .conftest import REPO, RETENTION_S, FinishedJob, Stack, base_env, kdq
from .flows import (
    TERMINAL,
    ready_upload,
    run_job,
    submit,
    upload,
    wait_job,
    wait_upload,
)

PROBLEM = "application/problem+json"
KEY_FORMAT = re.compile(r"^kdq_[a-z0-9]{8}_[A-Za-z0-9_-]{43}$")


# --- keys, in-process ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keys_db(unit_pg_url: str) -> Iterator[Database]:
    db = Database(unit_pg_url)
    yield db
    db.dispose()


def test_key_format_and_parsing() -> None:
    keys = {generate_key() for _ in range(200)}
    assert len({k for _, k in keys}) == 200 and len({p for p, _ in keys}) == 200
    for prefix, key in keys:
        assert KEY_FORMAT.match(key), key
        assert parse_key(key) == prefix and key.startswith(f"kdq_{prefix}_")
    _, key = next(iter(keys))
    bad_keys = ("", "kdq_", key[:-30], key.replace("kdq_", "kdx_"), key.upper(), key + " x", f"kdq_ab_{key[13:]}")
    for bad in bad_keys:
        assert parse_key(bad) is None, bad
    assert bearer_token(f"Bearer {key}") == key and bearer_token(f"bearer   {key} ") == key
    assert bearer_token(f"Basic {key}") is None and bearer_token("Bearer ") is None
    assert bearer_token(None) is None


def test_only_the_hash_is_stored_and_lookup_checks_it(keys_db: Database) -> None:
    new = create_key(keys_db, "alpha", label="ci")
    admin = create_key(keys_db, "ops", scope="admin")
    with keys_db.read() as s:
        row = s.get(ApiKey, new.id)
        assert row is not None
        stored = [str(getattr(row, c.key)) for c in ApiKey.__table__.c]
    assert row.sha256 == hashlib.sha256(new.key.encode()).hexdigest() == hash_key(new.key)
    assert not any(new.key in value or new.key[13:] in value for value in stored)  # no secret at rest
    assert row.prefix == new.prefix and row.team_id == "alpha" and row.last_used_at is None

    assert lookup(keys_db, new.key) == Principal("alpha", "team")
    assert lookup(keys_db, admin.key) == Principal("ops", "admin")
    assert find_key(keys_db, new.key).last_used_at is not None  # type: ignore[union-attr]
    forged = new.key[:-4] + ("AAAA" if not new.key.endswith("AAAA") else "BBBB")  # right prefix, wrong secret
    assert lookup(keys_db, forged) is None
    assert lookup(keys_db, "not-a-key") is None
    assert revoke_key(keys_db, new.prefix) is not None and revoke_key(keys_db, "key_missing") is None
    assert lookup(keys_db, new.key) is None  # revoked
    assert lookup(keys_db, admin.key) is not None
    with pytest.raises(ValueError):
        create_key(keys_db, "no spaces please")


def test_key_cache_remembers_successes_only_for_its_ttl(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr("service.core.auth.time.monotonic", lambda: now[0])  # the clock, not our code
    cache = KeyCache(5.0)
    cache.put("k", Principal("a"))
    assert cache.get("k") == Principal("a") and cache.get("other") is None
    now[0] += 5.1
    assert cache.get("k") is None
    off = KeyCache(0)
    off.put("k", Principal("a"))
    assert off.get("k") is None


# --- the live stack ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def db(pg_url: str) -> Iterator[Database]:
    database = Database(pg_url)
    yield database
    database.dispose()


@pytest.fixture(scope="module")
def team_b(pg_stack: Stack) -> str:
    return pg_stack.make_key("team-b", label="tests")


@pytest.fixture(scope="module")
def admin_key(pg_stack: Stack) -> str:
    return pg_stack.make_key("ops", admin=True, label="tests")


def set_team(db: Database, team: str, **limits: int | None) -> None:
    sets = ", ".join(f"{k} = :{k}" for k in limits)
    with db.write() as s:
        s.execute(text(f"UPDATE teams SET {sets} WHERE id = :team"), {**limits, "team": team})


def backdate(db: Database, table: str, column: str, ident: str, *, key: str = "id") -> None:
    with db.write() as s:
        s.execute(
            text(f"UPDATE {table} SET {column} = :when WHERE {key} = :ident"),
            {"when": utcnow() - timedelta(seconds=2 * RETENTION_S), "ident": ident},
        )


def referenced(db: Database, sha256: str) -> bool:
    with db.read() as s:
        return any(
            s.execute(text(f"SELECT 1 FROM {table} WHERE sha256 = :sha LIMIT 1"), {"sha": sha256}).first()
            for table in ("models", "datasets", "artifacts")
        )


def blob(stack: Stack, sha256: str) -> Path:
    return Path(stack.env["KDQ_STORAGE_DIR"]) / "sha256" / sha256[:2] / sha256[2:]


def unauthorized(r: httpx.Response) -> tuple[int, str, str, bytes]:
    assert r.headers["content-type"] == PROBLEM, r.text
    return r.status_code, r.headers.get("www-authenticate", ""), r.headers["content-type"], r.content


def test_missing_malformed_unknown_and_revoked_keys_get_the_same_401(pg_stack: Stack) -> None:
    key = pg_stack.make_key("team-revoked")
    prefix = parse_key(key)
    assert prefix is not None
    with pg_stack.client(key) as good:
        assert good.get("/v1/jobs").status_code == 200
    out = subprocess.run(
        kdq("keys", "revoke", prefix), cwd=REPO, env=pg_stack.env, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0 and "revoked" in out.stdout, out.stderr
    listing = subprocess.run(
        kdq("keys", "list", "--team", "team-revoked"),
        cwd=REPO,
        env=pg_stack.env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert prefix in listing.stdout and key not in listing.stdout

    # the API trusts a key it checked for KDQ_AUTH_CACHE_S (2 s here): poll until it stops
    deadline = time.monotonic() + 10 * float(pg_stack.env["KDQ_AUTH_CACHE_S"])
    while True:
        revoked = httpx.get(pg_stack.url + "/v1/jobs", headers={"Authorization": f"Bearer {key}"})
        if revoked.status_code == 401 or time.monotonic() > deadline:
            break
        time.sleep(0.2)

    _, unknown_key = generate_key()
    answers = {
        "revoked": revoked,
        "unknown": httpx.get(pg_stack.url + "/v1/jobs", headers={"Authorization": f"Bearer {unknown_key}"}),
        "missing": httpx.get(pg_stack.url + "/v1/jobs"),
        "malformed": httpx.get(pg_stack.url + "/v1/jobs", headers={"Authorization": "Bearer kdq_nope"}),
        "other scheme": httpx.get(pg_stack.url + "/v1/jobs", headers={"Authorization": f"Basic {key}"}),
        "forged secret": httpx.get(
            pg_stack.url + "/v1/jobs", headers={"Authorization": f"Bearer {key[:-6]}AAAAAA"}
        ),
    }
    first = unauthorized(answers["revoked"])
    assert first[0] == 401 and first[1].startswith("Bearer")
    body = answers["revoked"].json()
    assert body["code"] == "unauthorized" and "Authorization: Bearer" in body["detail"]
    for name, r in answers.items():
        assert unauthorized(r) == first, name
    # every /v1 route needs a key, before anything else about the request is looked at
    for method, path in (
        ("POST", "/v1/models"),
        ("GET", "/v1/datasets"),
        ("POST", "/v1/jobs"),
        ("GET", "/v1/jobs/job_x/events"),
        ("GET", "/v1/jobs/job_x/artifacts/a.onnx"),
    ):
        assert httpx.request(method, pg_stack.url + path).status_code == 401, path
    assert httpx.get(pg_stack.url + "/healthz").status_code == 200
    assert httpx.get(pg_stack.url + "/readyz").status_code == 200


def test_another_team_gets_404_for_everything(
    pg_stack: Stack, team_b: str, finished_job: FinishedJob, pg_uploads: dict[str, Any]
) -> None:
    job_id = finished_job.job["id"]
    model, dataset = pg_uploads["teacher"]["id"], pg_uploads["dataset"]["id"]
    with pg_stack.client() as a, pg_stack.client(team_b) as b:
        art = a.get(f"/v1/jobs/{job_id}/artifacts").json()["items"][0]
        assert a.get(f"/v1/jobs/{job_id}").json()["state"] == "SUCCEEDED"  # now in the finished-job cache
        paths = [
            f"/v1/models/{model}",
            f"/v1/datasets/{dataset}",
            f"/v1/jobs/{job_id}",
            f"/v1/jobs/{job_id}/events",
            f"/v1/jobs/{job_id}/metrics",
            f"/v1/jobs/{job_id}/report",
            f"/v1/jobs/{job_id}/artifacts",
            art["url"],
        ]
        for path in paths:
            r = b.get(path)
            assert r.status_code == 404 and r.headers["content-type"] == PROBLEM, (path, r.text)
            assert r.json()["code"] == "not_found"
            assert a.get(path).status_code == 200, path
        missing = b.get("/v1/jobs/job_000000000000000000000000").json()
        mine = b.get(f"/v1/jobs/{job_id}").json()
        assert {k: v for k, v in mine.items() if k not in ("detail", "instance")} == {
            k: v for k, v in missing.items() if k not in ("detail", "instance")
        }
        assert b.post(f"/v1/jobs/{job_id}/cancel").status_code == 404
        assert b.delete(f"/v1/models/{model}").status_code == 404
        assert b.delete(f"/v1/datasets/{dataset}").status_code == 404
        assert a.get(f"/v1/models/{model}").status_code == 200  # still there

        for kind in ("models", "datasets", "jobs"):
            assert b.get(f"/v1/{kind}", params={"page_size": 200}).json()["items"] == []

        r = submit(b, {**FAST_SPEC, "teacher_model_id": model, "dataset_id": dataset})
        assert r.status_code == 422 and r.headers["content-type"] == PROBLEM
        assert [(e["pointer"], e["detail"]) for e in r.json()["errors"]] == [
            ("#/teacher_model_id", f"model {model!r} does not exist")
        ]
        assert b.get("/v1/jobs").json()["items"] == []


def test_admin_sees_every_team(
    pg_stack: Stack, team_b: str, admin_key: str, finished_job: FinishedJob, assets: dict[str, Path]
) -> None:
    with pg_stack.client(team_b) as b, pg_stack.client(admin_key) as admin, pg_stack.client() as a:
        theirs = ready_upload(b, "datasets", assets["data"], name="b-data")
        job_id = finished_job.job["id"]
        datasets = {d["id"] for d in admin.get("/v1/datasets", params={"page_size": 200}).json()["items"]}
        assert {theirs["id"], finished_job.dataset["id"]} <= datasets
        assert job_id in {j["id"] for j in admin.get("/v1/jobs", params={"page_size": 200}).json()["items"]}
        assert admin.get(f"/v1/datasets/{theirs['id']}").status_code == 200
        assert admin.get(f"/v1/jobs/{job_id}").json()["state"] == "SUCCEEDED"
        listing = admin.get(f"/v1/jobs/{job_id}/artifacts").json()["items"]
        assert admin.get(listing[0]["url"]).status_code == 200
        assert admin.get(f"/v1/jobs/{job_id}/metrics").status_code == 200

        # an admin creates as its own team: teams see nothing of it
        own = upload(admin, "models", assets["teacher"], format="zoo_zip", name="admin-model")
        assert own.status_code == 201
        assert a.get(f"/v1/models/{own.json()['id']}").status_code == 404
        assert b.get(f"/v1/models/{own.json()['id']}").status_code == 404
        assert admin.delete(f"/v1/datasets/{theirs['id']}").status_code == 204  # and manages theirs
        assert b.get(f"/v1/datasets/{theirs['id']}").status_code == 404
        wait_upload(admin, "models", own.json()["id"])
        assert admin.delete(f"/v1/models/{own.json()['id']}").status_code == 204


def _cancel(client: httpx.Client, job_id: str) -> None:
    client.post(f"/v1/jobs/{job_id}/cancel")
    assert wait_job(client, job_id, TERMINAL, timeout=60)["state"] in TERMINAL


def test_running_jobs_quota_and_submission_rate_limit(
    pg_stack: Stack, db: Database, assets: dict[str, Path]
) -> None:
    key = pg_stack.make_key("team-q")
    set_team(db, "team-q", max_running_jobs=1, max_submissions_per_minute=2)
    with pg_stack.client(key) as q:
        teacher = ready_upload(q, "models", assets["teacher"], format="zoo_zip")
        data = ready_upload(q, "datasets", assets["data"])
        spec = {**FAST_SPEC, "teacher_model_id": teacher["id"], "dataset_id": data["id"]}

        first = submit(q, spec)
        assert first.status_code == 202, first.text
        busy = submit(q, spec)  # one unfinished job is the quota
        assert busy.status_code == 429 and busy.headers["content-type"] == PROBLEM
        assert busy.json()["code"] == "quota_exceeded" and "unfinished jobs" in busy.json()["detail"]
        assert int(busy.headers["retry-after"]) > 0
        _cancel(q, first.json()["id"])

        second = submit(q, spec, **{"Idempotency-Key": "q-2"})
        assert second.status_code == 202, second.text
        _cancel(q, second.json()["id"])
        limited = submit(q, spec)  # two submissions in the last minute is the rate
        assert limited.status_code == 429 and limited.json()["code"] == "rate_limited", limited.text
        assert 1 <= int(limited.headers["retry-after"]) <= 60
        again = submit(q, spec, **{"Idempotency-Key": "q-2"})  # a replay creates nothing: not limited
        assert again.status_code == 202 and again.json()["id"] == second.json()["id"]

        jobs = q.get("/v1/jobs", params={"page_size": 200}).json()["items"]
        # the refused submissions left no row
        assert {j["id"] for j in jobs} == {first.json()["id"], second.json()["id"]}

        # concurrent submissions for the last free slot: exactly one gets it
        set_team(db, "team-q", max_submissions_per_minute=100)
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda _: submit(q, spec), range(6)))
        statuses = sorted(r.status_code for r in answers)
        assert statuses == [202, 429, 429, 429, 429, 429], [r.text for r in answers]
        _cancel(q, next(r.json()["id"] for r in answers if r.status_code == 202))


def test_stored_bytes_quota_refuses_and_stores_nothing(
    pg_stack: Stack, db: Database, assets: dict[str, Path], tmp_path: Path
) -> None:
    key = pg_stack.make_key("team-s")
    teacher_size = assets["teacher"].stat().st_size
    set_team(db, "team-s", max_stored_bytes=teacher_size + 100)
    extra = tmp_path / "extra.npz"
    np.savez(extra, x=np.random.default_rng().normal(size=(64, 16)).astype(np.float32))
    extra_sha = hashlib.sha256(extra.read_bytes()).hexdigest()
    store_tmp = Path(pg_stack.env["KDQ_STORAGE_DIR"]) / "tmp"
    with pg_stack.client(key) as s:
        assert upload(s, "models", assets["teacher"], format="zoo_zip").status_code == 201
        r = upload(s, "datasets", extra, format="npz")
        assert r.status_code == 429 and r.headers["content-type"] == PROBLEM, r.text
        assert r.json()["code"] == "quota_exceeded" and "quota" in r.json()["detail"]
        assert not blob(pg_stack, extra_sha).exists()
        assert list(store_tmp.iterdir()) == []
        assert s.get("/v1/datasets").json()["items"] == []
        set_team(db, "team-s", max_stored_bytes=None)  # back to the default: the same upload fits
        assert upload(s, "datasets", extra, format="npz").status_code == 201
        assert blob(pg_stack, extra_sha).exists()


def _wait_gone(client: httpx.Client, path: str, timeout: float = 30, blob: Path | None = None) -> None:
    """Until ``path`` answers 404 (and ``blob`` is gone: the sweep releases it just after the row)."""
    deadline = time.monotonic() + timeout
    while client.get(path).status_code != 404 or (blob is not None and blob.exists()):
        assert time.monotonic() < deadline, f"{path} (or its blob) still there after {timeout}s"
        time.sleep(0.2)


def test_retention_deletes_expired_uploads_and_only_unreferenced_blobs(
    pg_stack: Stack, db: Database, tmp_path: Path
) -> None:
    key = pg_stack.make_key("team-r")
    shared, alone = tmp_path / "shared.onnx", tmp_path / "alone.onnx"
    shared.write_bytes(b"shared " + str(time.time_ns()).encode())
    alone.write_bytes(b"alone " + str(time.time_ns()).encode())
    with pg_stack.client(key) as r:
        first = upload(r, "models", shared, format="onnx").json()
        second = upload(r, "models", shared, format="onnx").json()
        lonely = upload(r, "models", alone, format="onnx").json()
        for m in (first, second, lonely):
            wait_upload(r, "models", m["id"])  # (random bytes: they end up invalid, which is fine)
        assert first["sha256"] == second["sha256"] != lonely["sha256"]

        backdate(db, "models", "created_at", first["id"])
        backdate(db, "models", "created_at", lonely["id"])
        _wait_gone(r, f"/v1/models/{first['id']}")  # the API's retention loop (every second here)
        _wait_gone(r, f"/v1/models/{lonely['id']}", blob=blob(pg_stack, lonely["sha256"]))
        assert blob(pg_stack, first["sha256"]).read_bytes() == shared.read_bytes()
        assert r.get(f"/v1/models/{second['id']}").status_code == 200  # not expired: kept, with its blob

        backdate(db, "models", "created_at", second["id"])
        _wait_gone(r, f"/v1/models/{second['id']}", blob=blob(pg_stack, first["sha256"]))


def test_retention_deletes_a_finished_jobs_artifacts(
    pg_stack: Stack, db: Database, finished_job: FinishedJob, assets: dict[str, Path]
) -> None:
    key = pg_stack.make_key("team-r2")
    with pg_stack.client(key) as r, pg_stack.client() as a:
        teacher = ready_upload(r, "models", assets["teacher"], format="zoo_zip")
        data = ready_upload(r, "datasets", assets["data"])
        job, _, _ = run_job(r, teacher, data)
        assert job["state"] == "SUCCEEDED", job
        mine = r.get(f"/v1/jobs/{job['id']}/artifacts").json()["items"]
        other_job = f"/v1/jobs/{finished_job.job['id']}/artifacts"
        theirs = {x["sha256"] for x in a.get(other_job).json()["items"]}

        backdate(db, "jobs", "finished_at", job["id"])
        deadline = time.monotonic() + 30
        while r.get(f"/v1/jobs/{job['id']}/artifacts").json()["items"]:
            assert time.monotonic() < deadline, "artifacts not expired"
            time.sleep(0.2)
        for art in mine:
            assert r.get(art["url"]).status_code == 404
            # a blob another job's artifact (or an upload) still uses stays; the rest are deleted
            assert blob(pg_stack, art["sha256"]).exists() == referenced(db, art["sha256"]), art["name"]
        assert any(not blob(pg_stack, art["sha256"]).exists() for art in mine)  # (measured timings differ)
        assert r.get(f"/v1/jobs/{job['id']}").json()["state"] == "SUCCEEDED"  # the job's record stays
        assert r.get(f"/v1/jobs/{job['id']}/metrics").status_code == 200
        assert r.get(f"/v1/jobs/{job['id']}/report").status_code == 404
        # another job's artifacts are untouched, with their files
        assert {x["sha256"] for x in a.get(other_job).json()["items"]} == theirs
        assert all(blob(pg_stack, sha).exists() for sha in theirs)


@pytest.mark.parametrize(
    "argv, env",
    [
        (["serve", "--no-auth", "--host", "0.0.0.0"], {}),
        (["serve", "--host", "192.168.1.10"], {"KDQ_AUTH": "none"}),
        (["api", "--host", "0.0.0.0"], {"KDQ_AUTH": "none"}),
        (["api", "--no-auth", "--host", "::"], {}),
    ],
)
def test_no_auth_only_on_a_loopback_address(tmp_path: Path, argv: list[str], env: dict[str, str]) -> None:
    out = subprocess.run(
        kdq(*argv, "--port", "1"),
        cwd=REPO,
        env=base_env(KDQ_DATA_DIR=str(tmp_path / "var"), **env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode != 0 and "loopback" in out.stderr, out.stderr
    assert not (tmp_path / "var").exists()  # refused before anything was started or created
