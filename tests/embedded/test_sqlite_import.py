"""A data dir made by the SQLite-based kdq of before: `kdq serve` copies everything into its
PostgreSQL on its first start, and nothing a team stored is lost."""

from __future__ import annotations

import hashlib
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, insert

from service.core.auth import generate_key, hash_key
from service.core.models import (
    ApiKey,
    Artifact,
    Base,
    DatasetUpload,
    Job,
    JobEvent,
    ModelUpload,
    Team,
    utcnow,
)
from service.core.store import LocalStore
from tests.service.assets import FAST_SPEC, write_assets
from tests.service.flows import wait_job


def legacy_data_dir(root: Path, assets: dict[str, Path]) -> dict[str, Any]:
    """What the old `kdq serve` left: kdq.sqlite (the schema of migration 0002, the last one it
    ran), broker.sqlite, and the blob store."""
    store = LocalStore(root / "store")
    teacher, data = store.put_file(assets["teacher"]), store.put_file(assets["data"])
    report = root / "report.json"
    report.write_text('{"old": true}')
    artifact = store.put_file(report)
    report.unlink()
    engine = create_engine(f"sqlite:///{root / 'kdq.sqlite'}")
    Base.metadata.create_all(engine)
    prefix, key = generate_key()
    old = utcnow() - timedelta(days=30)
    jobs = [{"id": ident, "team_id": "vision", "state": state, "queue": "cpu", "spec": {**FAST_SPEC},
             "teacher_model_id": "mdl_legacy", "dataset_id": "ds_legacy", "attempts": int(state == "SUCCEEDED"),
             "progress_step": 0, "progress_total": 0,
             "summary": {"metric": "accuracy"} if state == "SUCCEEDED" else None,
             "created_at": old, "updated_at": old, "enqueued_at": old}
            for ident, state in (("job_done", "SUCCEEDED"), ("job_waiting", "QUEUED"))]  # fmt: skip
    upload = {"team_id": "vision", "state": "ready", "user_metadata": {}, "created_at": old, "updated_at": old}
    with engine.begin() as conn:  # (Core inserts: no session hooks of this process run on SQLite)
        conn.execute(insert(Team), [{"id": "vision", "name": "vision", "created_at": old}])
        conn.execute(insert(ApiKey), [{"id": "key_legacy", "team_id": "vision", "prefix": prefix, "label": "",
                                       "sha256": hash_key(key), "scope": "team", "created_at": old}])  # fmt: skip
        conn.execute(insert(ModelUpload), [{**upload, "id": "mdl_legacy", "name": "teacher", "format": "zoo_zip",
                     "filename": "teacher.zip", "sha256": teacher.sha256, "size_bytes": teacher.size,
                     "summary": {"kind": "zoo", "task": "classification", "input_kind": "vector",
                                 "input_shape": [16], "output_dim": 3}}])  # fmt: skip
        conn.execute(insert(DatasetUpload), [{**upload, "id": "ds_legacy", "name": "data", "format": "npz",
                     "filename": "data.npz", "sha256": data.sha256, "size_bytes": data.size,
                     "options": {"format": "npz"},
                     "summary": {"samples": 240, "input_kind": "vector", "classes": ["0", "1", "2"]}}])  # fmt: skip
        conn.execute(insert(Job), jobs)
        conn.execute(insert(JobEvent), [{"id": i, "job_id": "job_done", "kind": "log", "data": {"message": f"line {i}"},
                                         "created_at": old} for i in range(1, 6)])  # fmt: skip
        conn.execute(insert(Artifact), [{"job_id": "job_done", "name": "report.json", "team_id": "vision",
                                         "kind": "report_json", "sha256": artifact.sha256, "size_bytes": artifact.size,
                                         "description": "", "created_at": old}])  # fmt: skip
    engine.dispose()
    (root / "broker.sqlite").write_bytes(b"")
    return {"key": key, "artifact": artifact.sha256}


def test_serve_copies_an_old_sqlite_data_dir_into_postgres(serve_factory: Any, tmp_path: Path) -> None:
    assets = write_assets(tmp_path / "assets")
    data_dir = tmp_path / "old-var"
    data_dir.mkdir()
    legacy = legacy_data_dir(data_dir, assets)
    serve = serve_factory(data_dir)
    serve.key = legacy["key"]  # the old team's key still works
    serve.start(auth=True)
    assert "found the SQLite database of an earlier kdq" in serve.text()
    assert not (data_dir / "kdq.sqlite").exists() and (data_dir / "sqlite-before-postgres" / "kdq.sqlite").is_file()
    with serve.client() as c:
        done = c.get("/v1/jobs/job_done").json()
        assert done["state"] == "SUCCEEDED" and done["summary"] == {"metric": "accuracy"}
        art = c.get("/v1/jobs/job_done/artifacts").json()["items"]
        assert [a["name"] for a in art] == ["report.json"]
        body = c.get(art[0]["url"]).content
        assert body == b'{"old": true}' and hashlib.sha256(body).hexdigest() == legacy["artifact"]
        assert "line 5" in c.get("/v1/jobs/job_done/events").text
        assert c.get("/v1/models/mdl_legacy").json()["state"] == "ready"
        # the job that was waiting in the old SQLite broker is sent to Redis by the relay, and runs
        assert wait_job(c, "job_waiting", timeout=120)["state"] == "SUCCEEDED"
        new = c.post("/v1/jobs", json={**FAST_SPEC, "teacher_model_id": "mdl_legacy", "dataset_id": "ds_legacy"})
        assert new.status_code == 202, new.text
        events = c.get(f"/v1/jobs/{new.json()['id']}/events").text
        ids = [int(line[4:]) for line in events.splitlines() if line.startswith("id: ")]
        assert '"state":"SUCCEEDED"' in events and min(ids) > 5  # event ids go on after the copied ones
    serve.stop()
    serve.start(auth=True)  # a second start finds nothing more to copy
    assert serve.text().count("found the SQLite database of an earlier kdq") == 1
