"""A search job through the real API and worker: validation of its targets, the chosen model and the
Pareto front as downloadable artifacts."""

from __future__ import annotations

from typing import Any

import httpx

from .flows import submit, wait_job

SEARCH_SPEC = {
    "student": {"kind": "auto"},  # auto + targets = search
    "targets": {"max_drop": 0.5, "latency_batch_size": 8, "time_budget_s": 60},
    "distillation": {"epochs": 2, "batch_size": 32, "seed": 0},
    "quantization": {"method": "static_int8", "calibration_samples": 32},
    "evaluation": {"latency_batch_sizes": [1], "warmup": 1, "repeats": 3, "disagreements": 2},
}


def _ids(uploads: dict[str, dict[str, Any]]) -> dict[str, str]:
    return {"teacher_model_id": uploads["teacher"]["id"], "dataset_id": uploads["dataset"]["id"]}


def test_search_specs_that_cannot_work_are_422_naming_the_field(
    api: httpx.Client, pg_uploads: dict[str, dict[str, Any]]
) -> None:
    cases = [
        ({"targets": {"metric": "cosine", "min": 0.9}}, "#/targets/metric"),  # a classification teacher
        ({"student": {"kind": "search"}}, "#/targets"),                       # a search with no targets
        ({"targets": {"max_drop": 0.01, "max_latency_ms": 0}}, "#/targets/max_latency_ms"),
        ({"student": {"kind": "zoo", "architecture": {"architecture": "mlp", "hidden": [4]}},
          "targets": {"min": 0.5}}, "#/targets"),
    ]
    for body, pointer in cases:
        r = submit(api, {**_ids(pg_uploads), **body})
        assert r.status_code == 422, (body, r.text)
        assert r.headers["content-type"] == "application/problem+json"
        errors = r.json()["errors"]
        assert pointer in {e.get("pointer") for e in errors}, (body, errors)


def test_a_search_job_returns_the_chosen_model_and_the_front(
    api: httpx.Client, pg_uploads: dict[str, dict[str, Any]]
) -> None:
    r = submit(api, {**_ids(pg_uploads), **SEARCH_SPEC})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["student"]["kind"] == "search"  # the job shows the spec as it runs
    done = wait_job(api, job["id"], timeout=240)
    assert done["state"] == "SUCCEEDED", done
    search = done["summary"]["search"]
    assert search["met_all"] and search["front"]

    arts = {a["name"]: a for a in api.get(f"/v1/jobs/{job['id']}/artifacts").json()["items"]}
    primary = "model_fp32.onnx" if search["recipe"] == "fp32" else "model_int8.onnx"
    assert arts[primary]["description"].startswith(f"the chosen model: {search['candidate']}")
    front = [n for n in arts if n.startswith("front-")]
    assert len(front) == len(search["front"])
    body = api.get(f"/v1/jobs/{job['id']}/artifacts/{front[0]}")
    assert body.status_code == 200 and body.content[:2] and len(body.content) == arts[front[0]]["size_bytes"]
    metrics = api.get(f"/v1/jobs/{job['id']}/metrics").json()
    assert metrics["search"]["chosen"]["name"] == search["chosen"]
    assert {m["name"] for m in metrics["search"]["measured"]} >= set(search["front"])
