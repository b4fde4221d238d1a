"""The Python SDK and the ``kdq`` client commands against the Postgres + Redis stack: the README's
example runs as written; names, tags and list filters with stable cursors; typed documents that
follow the published schema; the client package imports without the service, torch or FastAPI."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from kdq import Client, Job, Upload
from kdq.models import Artifact

from .assets import FAST_SPEC
from .conftest import REPO, Stack
from .flows import ready_upload, submit, wait_job

README = REPO / "README.md"


def readme_example() -> str:
    text = README.read_text()
    match = re.search(r"<!-- sdk-example -->\s*```python\n(.*?)```", text, re.DOTALL)
    assert match, "the README's SDK example (after <!-- sdk-example -->) is missing"
    return match.group(1)


def test_the_readme_example_runs(pg_stack: Stack, assets: dict[str, Path], tmp_path: Path) -> None:
    code = readme_example()
    assert len(code.strip().splitlines()) <= 12
    shutil.copy(assets["teacher"], tmp_path / "teacher.zip")
    shutil.copy(assets["data"], tmp_path / "digits.npz")
    (tmp_path / "example.py").write_text(code)
    env = {**pg_stack.env, "KDQ_URL": pg_stack.url, "KDQ_API_KEY": pg_stack.key or ""}
    done = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, env=env, capture_output=True, text=True, check=False,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert "model_int8.onnx" in files and "report.html" in files, files


def test_names_tags_and_filters_with_stable_cursors(pg_stack: Stack, assets: dict[str, Path]) -> None:
    key = pg_stack.make_key("team-filters")
    with pg_stack.client(key) as api, Client(pg_stack.url, key) as sdk:
        teacher = ready_upload(api, "models", assets["teacher"], format="zoo_zip", name="filters-teacher",
                               tags="vision,v1")  # fmt: skip
        data = ready_upload(api, "datasets", assets["data"], format="npz", tags='["vision"]')
        assert teacher["tags"] == ["vision", "v1"] and data["tags"] == ["vision"] and teacher["team_id"] == "team-filters"
        base = {**FAST_SPEC, "teacher_model_id": teacher["id"], "dataset_id": data["id"]}
        before = datetime.now(UTC) - timedelta(seconds=1)
        ids = []
        for i in range(5):
            r = submit(api, {**base, "name": f"nightly-{i}", "tags": ["nightly", f"n{i % 2}"]})
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
            wait_job(api, ids[-1])  # (a team runs at most 4 jobs at once)
            assert r.json()["name"] == f"nightly-{i}" and r.json()["tags"] == ["nightly", f"n{i % 2}"]
        other = submit(api, {**base, "name": "adhoc", "tags": ["n1"]}).json()["id"]
        wait_job(api, other)
        bad = submit(api, {**base, "tags": ["has space"]})
        assert bad.status_code == 422 and bad.json()["errors"][0]["pointer"].startswith("#/tags"), bad.text

        def listed(**params: Any) -> list[str]:
            return [j.id for j in sdk.jobs(**params)]

        assert listed(name="nightly-") == ids[::-1]
        assert listed(tag="n1") == [other, ids[3], ids[1]]
        assert listed(tag=["nightly", "n1"]) == [ids[3], ids[1]]
        assert listed(teacher=teacher["id"], name="adhoc") == [other]
        assert listed(created_after=before, name="nightly-3") == [ids[3]]
        assert listed(created_before=before) == []
        # pages of 2 with a filter: every job once, in order, whatever was created meanwhile
        pages, token = [], None
        while True:
            body = api.get("/v1/jobs", params={"tag": "nightly", "page_size": 2, **({"page_token": token} if token else {})}).json()
            pages.append([j["id"] for j in body["items"]])
            if len(pages) == 1:
                submit(api, {**base, "name": "late", "tags": ["nightly"]})  # newer: never in these pages
            if not (token := body["next_page_token"]):
                break
        assert [i for page in pages for i in page] == ids[::-1] and [len(p) for p in pages] == [2, 2, 1]
        naive = api.get("/v1/jobs", params={"created_after": "2026-01-01T00:00:00"})
        assert naive.status_code == 422 and naive.headers["content-type"] == "application/problem+json"
        assert [u.id for u in sdk.uploads("models", tag="v1")] == [teacher["id"]]
        assert [u.id for u in sdk.uploads("datasets", name="nope")] == []

        # typed documents: a job, its artifacts; the SDK acts on them
        job = sdk.job(ids[0])
        assert isinstance(job, Job) and job.succeeded and job.progress.overall == 1.0 and job.team_id == "team-filters"
        arts = job.artifacts.list()
        assert arts and all(isinstance(a, Artifact) and len(a.sha256) == 64 for a in arts)
        again = job.rerun(name="nightly-rerun", distillation={"epochs": 1})
        assert again.spec_fields()["distillation"]["epochs"] == 1 and again.name == "nightly-rerun"
        assert again.wait().succeeded
        assert isinstance(sdk.get_upload(teacher["id"]), Upload)


def test_cli_commands_list_show_compare_rerun_cancel_and_uploads(pg_stack: Stack, pg_uploads: dict[str, Any],
                                                                  assets: dict[str, Path], tmp_path: Path) -> None:  # fmt: skip
    def kdq(*args: str, ok: int = 0) -> Any:
        done = subprocess.run([sys.executable, "-m", "kdq", *args, "--url", pg_stack.url, "--key", pg_stack.key or ""],
                              cwd=REPO, env=pg_stack.env, capture_output=True, text=True, check=False, timeout=300)  # fmt: skip
        assert done.returncode == ok, done.stdout + done.stderr
        return done

    base = {**FAST_SPEC, "teacher_model_id": pg_uploads["teacher"]["id"], "dataset_id": pg_uploads["dataset"]["id"]}
    with pg_stack.client() as api:
        a = submit(api, {**base, "name": "cli-a", "tags": ["cli"]}).json()["id"]
        wait_job(api, a)
    shown = json.loads(kdq("jobs", "show", a, "--json").stdout)
    assert shown["id"] == a and shown["state"] == "SUCCEEDED"
    assert "cli-a" in kdq("jobs", "list", "--tag", "cli").stdout
    assert [j["id"] for j in json.loads(kdq("jobs", "list", "--name", "cli-", "--json").stdout)] == [a]
    rerun = kdq("jobs", "rerun", a, "--set", "distillation.epochs=1", "--name", "cli-b", "--wait", "--json", "--quiet")
    b = json.loads(rerun.stdout)
    assert b["state"] == "SUCCEEDED" and (b.get("spec") or b)["distillation"]["epochs"] == 1
    rows = json.loads(kdq("jobs", "compare", a, b["id"], "--json").stdout)
    assert [r["job_id"] for r in rows] == [a, b["id"]] and all(r["size_bytes"] and r["latency_p50_ms"] for r in rows)
    assert "p50 ms" in kdq("jobs", "compare", a, b["id"]).stdout
    out = tmp_path / "dl"
    files = json.loads(kdq("jobs", "download", a, "--out", str(out), "--json").stdout)
    assert {Path(f).name for f in files} == {p.name for p in out.iterdir()}
    # a cancel: the slow job stops; the watch of a cancelled job exits 1 with the error as JSON
    slow = {**base, "distillation": {**FAST_SPEC["distillation"], "epochs": 3000, "batch_size": 8}}
    with pg_stack.client() as api:
        c = submit(api, slow).json()["id"]
        wait_job(api, c, {"RUNNING"}, timeout=60)
    assert json.loads(kdq("jobs", "cancel", c, "--wait", "--json").stdout)["state"] == "CANCELLED"
    watched = kdq("jobs", "watch", c, "--json", ok=1)
    assert json.loads(watched.stdout)["state"] == "CANCELLED" and "CANCELLED" in watched.stderr
    missing = kdq("jobs", "show", "job_nope", "--json", ok=2)
    assert json.loads(missing.stdout)["error"]["status"] == 404
    ups = json.loads(kdq("uploads", "list", "--kind", "models", "--limit", "100", "--json").stdout)  # (the shared stack holds many datasets)
    assert pg_uploads["teacher"]["id"] in {u["id"] for u in ups}
    assert "sha256" in kdq("uploads", "show", pg_uploads["dataset"]["id"]).stdout
    added = json.loads(kdq("uploads", "add", str(assets["data"]), "--name", "cli-data", "--tag", "tmp", "--json").stdout)
    assert added["state"] == "ready" and added["tags"] == ["tmp"]
    kdq("uploads", "delete", added["id"])
    assert json.loads(kdq("whoami", "--json").stdout)["team_id"] == "team-a"
    made = json.loads(kdq("webhooks", "secret", "--rotate", "--json").stdout)
    assert made["secret"].startswith("whsec_") and json.loads(kdq("webhooks", "secret", "--json").stdout)["secret"] is None


def test_the_compress_progress_is_one_line_per_stage_change_or_few_seconds(pg_stack: Stack, pg_uploads: dict[str, Any]) -> None:
    spec = {**FAST_SPEC, "distillation": {**FAST_SPEC["distillation"], "epochs": 40}}
    done = subprocess.run([sys.executable, "-m", "kdq", "compress", "--url", pg_stack.url, "--key", pg_stack.key or "",
                           "--teacher", pg_uploads["teacher"]["id"], "--data", pg_uploads["dataset"]["id"],
                           "--spec", json.dumps(spec), "--no-download", "--allow-do-not-ship"],
                          cwd=REPO, env=pg_stack.env, capture_output=True, text=True, check=False, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) < 60, done.stderr  # (one per step was hundreds)
    assert any("overall, elapsed" in line and "eta" in line for line in lines)
    assert json.loads(done.stdout)["state"] == "SUCCEEDED"
    quiet = subprocess.run([sys.executable, "-m", "kdq", "compress", "--url", pg_stack.url, "--key", pg_stack.key or "",
                            "--teacher", pg_uploads["teacher"]["id"], "--data", pg_uploads["dataset"]["id"],
                            "--spec", json.dumps(FAST_SPEC), "--no-download", "--quiet", "--allow-do-not-ship"],
                           cwd=REPO, env=pg_stack.env, capture_output=True, text=True, check=False, timeout=300)  # fmt: skip
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr


def test_typed_documents_follow_the_published_schema() -> None:
    """Every field the schema marks required is one the SDK's models read."""
    from kdq.models import Delivery

    schema = json.loads((REPO / "openapi" / "openapi.json").read_text())["components"]["schemas"]
    for model, name in ((Job, "JobOut"), (Upload, "ModelOut"), (Artifact, "ArtifactOut"), (Delivery, "DeliveryOut")):
        missing = set(schema[name].get("required", [])) - set(model.model_fields) - {"metadata", "spec"}
        assert not missing, (name, missing)
    # a job document with its spec flat and a verdict (the coming shape) still reads
    flat = Job.model_validate({"id": "job_1", "state": "SUCCEEDED", "distillation": {"epochs": 3}, "teacher_model_id": "m",
                               "dataset_id": "d", "summary": {"verdict": {"label": "ship", "reasons": []}}})  # fmt: skip
    assert flat.spec_fields() == {"distillation": {"epochs": 3}} and flat.verdict == {"label": "ship", "reasons": []}
    assert flat.resubmittable()["distillation"] == {"epochs": 3}
    plain = Job.model_validate({"id": "job_2", "state": "SUCCEEDED", "summary": {
        "verdict": "do_not_ship", "reasons": [{"code": "metric_drop"}], "headline": "do not ship: …"}})
    assert plain.verdict == {"label": "do_not_ship", "reasons": [{"code": "metric_drop"}], "headline": "do not ship: …"}


def test_the_client_package_needs_neither_the_service_nor_torch() -> None:
    code = ("import sys, kdq, kdq.cli, kdq.webhooks, kdq.compare; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'fastapi', 'starlette', 'service', 'worker', "
            "'sqlalchemy', 'celery')]; assert not bad, bad; print('ok')")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False, timeout=60)
    assert done.stdout.strip() == "ok", done.stderr


def test_folders_and_graphs_with_external_data_are_sent_as_one_zip(pg_stack: Stack, assets: dict[str, Path],
                                                                   tmp_path: Path) -> None:  # fmt: skip
    """What a user points at: torch's default ONNX export (``model.onnx`` beside ``model.onnx.data``)
    and a model folder; the client zips each with what it needs, and the service validates it."""
    import zipfile

    import torch

    from .results_assets import default_onnx_export

    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)).eval()
    default_onnx_export(model, torch.zeros(2, 6), tmp_path / "export")
    assert (tmp_path / "export" / "model.onnx.data").is_file()
    folder = tmp_path / "zoo"
    with zipfile.ZipFile(assets["teacher"]) as zf:
        zf.extractall(folder)
    with Client(pg_stack.url, pg_stack.key) as client:
        graph = client.upload(tmp_path / "export" / "model.onnx")
        assert graph.state == "ready" and graph.format == "onnx_zip", graph
        assert graph.summary["num_parameters"] == sum(p.numel() for p in model.parameters())
        zoo = client.upload(folder)
        assert zoo.state == "ready" and zoo.format == "zoo_zip" and zoo.kind == "model", zoo
