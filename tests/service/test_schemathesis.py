"""schemathesis against the live Postgres stack, with two teams' keys: whatever it sends to
whichever operation, no answer is a 5xx, and every answer matches the OpenAPI document
(status code, content type, headers, body schema).

The schema is read from the running API (``/openapi.json``), so it is the current one; the
committed ``openapi/openapi.json`` is compared with the app by `test_openapi_file_is_current`.
Each generated request is sent once with each team's key. Team X owns a finished job: the
operations on a job are also generated with its real id (and a real artifact name), where
team X reaches the resource and team Y must get 404 (or a 422 for a request that is invalid
anyway).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from .conftest import Stack
from .flows import ready_upload, run_job

MAX_EXAMPLES = int(os.environ.get("KDQ_TEST_FUZZ_EXAMPLES", "8"))
"""Per operation and mode (valid, invalid); each sent with both keys (about 700 requests, under
a minute on 2 cores). Raise ``KDQ_TEST_FUZZ_EXAMPLES`` for a longer hunt."""
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def team_keys(pg_stack: Stack) -> dict[str, str]:
    return {team: pg_stack.make_key(team, label="schemathesis") for team in ("fuzz-x", "fuzz-y")}


@pytest.fixture(scope="module")
def x_job(pg_stack: Stack, team_keys: dict[str, str], assets: dict[str, Path]) -> dict[str, Any]:
    """A finished job of team X."""
    with pg_stack.client(team_keys["fuzz-x"]) as x:
        teacher = ready_upload(x, "models", assets["teacher"], format="zoo_zip")
        dataset = ready_upload(x, "datasets", assets["data"])
        job, _, _ = run_job(x, teacher, dataset)
    assert job["state"] == "SUCCEEDED", job
    return job


@pytest.fixture(scope="module")
def api_schema(pg_stack: Stack) -> Any:
    config = schemathesis.Config.from_dict(
        {
            "generation": {
                "max-examples": MAX_EXAMPLES,
                "database": "none",
                "with-security-parameters": False,
            },
            "request-timeout": 30,
            "max-stream-events": 50,
        }
    )
    schema = schemathesis.openapi.from_url(pg_stack.url + "/openapi.json", config=config)
    document = schema.raw_schema
    scheme = document["components"]["securitySchemes"]["ApiKey"]
    assert scheme["type"] == "http" and scheme["scheme"] == "bearer"
    for path, ops in document["paths"].items():
        for method, op in ops.items():
            if path.startswith("/v1/"):
                assert op.get("security") == [{"ApiKey": []}], (method, path)
                assert "401" in op["responses"], (method, path)
            else:  # /healthz, /readyz, /metrics are public
                assert "security" not in op, (method, path)
    for ops in document["paths"].values():
        for op in ops.values():
            if op["operationId"] in ("create_job", "create_model", "create_dataset"):
                assert "429" in op["responses"], op["operationId"]
    return schema


def _run(
    operation: Any, mode: GenerationMode, keys: dict[str, str], path_parameters: dict[str, str] | None
) -> str | None:
    """Up to MAX_EXAMPLES generated requests (each sent with every key); the first failure, if any.
    With ``path_parameters`` (team X's job), the second team must not see it."""

    @given(case=operation.as_strategy(generation_mode=mode, path_parameters=path_parameters))
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate],  # no shrinking: the failure names its request
    )
    def run(case: Any) -> None:
        for team, key in keys.items():
            r = case.call_and_validate(headers={"Authorization": f"Bearer {key}"}, checks=CHECKS)
            if path_parameters and team == "fuzz-y":
                assert r.status_code in (404, 422), f"team Y got {r.status_code} for team X's job"

    try:
        run()
    except Unsatisfiable:  # no invalid value exists (e.g. a path parameter that is any string)
        return None
    except Exception as exc:  # noqa: BLE001 -- schemathesis' failure, with a curl line to replay it
        return f"{operation.label} ({mode.value}, {path_parameters or 'generated ids'}): {exc}"
    return None


def test_no_server_errors_and_responses_match_the_schema(
    api_schema: Any, team_keys: dict[str, str], x_job: dict[str, Any]
) -> None:
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 15
    runs: list[tuple[Any, dict[str, str] | None]] = [(op, None) for op in operations]
    for op in operations:
        if "{job_id}" in op.path:
            real = {"job_id": x_job["id"]}
            if "{name}" in op.path:
                real["name"] = "report.json"
            runs.append((op, real))
    failures = [
        failure
        for operation, path_parameters in runs
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
        if (failure := _run(operation, mode, team_keys, path_parameters)) is not None
    ]
    assert not failures, "\n\n".join(failures)


def test_what_schemathesis_found_stays_fixed(
    pg_stack: Stack, team_keys: dict[str, str], x_job: dict[str, Any], tmp_path: Path
) -> None:
    """Each of these was a 500 or an answer the schema did not describe."""
    from .flows import submit, upload
    from .test_api import assert_problem

    def parameters(r: Any) -> set[str]:
        body = assert_problem(r, 422, "invalid_request")
        return {e.get("parameter") or e.get("pointer") for e in body["errors"]}

    with pg_stack.client(team_keys["fuzz-x"]) as x:
        # NUL characters: PostgreSQL can neither store nor compare them, so they are refused as input
        assert parameters(x.get("/v1/models/mdl_%00x")) == {"model_id"}
        assert parameters(x.get(f"/v1/jobs/{x_job['id']}/artifacts/report%00.json")) == {"name"}
        assert parameters(x.get("/v1/jobs", params={"page_token": "a\x00b"})) == {"page_token"}
        raw = json.dumps(["2026-01-01T00:00:00+00:00", "job_\x00"]).encode()
        token = base64.urlsafe_b64encode(raw).decode()
        assert parameters(x.get("/v1/jobs", params={"page_token": token})) == {"page_token"}
        r = submit(x, {"teacher_model_id": "mdl_\x00", "dataset_id": "ds_1"})
        assert parameters(r) == {"#/teacher_model_id"}
        r = submit(x, {"teacher_model_id": "m", "dataset_id": "d", "data": {"label_column": "y\x00"}})
        assert parameters(r) == {"#/data/label_column"}
        payload = tmp_path / "m.onnx"
        payload.write_bytes(b"not checked before the form")
        r = upload(x, "models", payload, format="onnx", metadata='{"a\\u0000": 1}')
        assert parameters(r) == {"#/metadata/a\x00"}
        assert parameters(upload(x, "models", payload, format="onnx", name="a\x00")) == {"#/name"}
        # a Last-Event-ID beyond the 64-bit event ids
        events = f"/v1/jobs/{x_job['id']}/events"
        assert parameters(x.get(events, headers={"Last-Event-ID": str(1 << 70)})) == {"last-event-id"}
        assert x.get(events, headers={"Last-Event-ID": str((1 << 63) - 1)}).status_code == 204
        # a JSON body that is not UTF-8: 400 (documented), with a code
        r = x.post("/v1/jobs", content=b'{"a": "\xff\xfe"}', headers={"content-type": "application/json"})
        assert assert_problem(r, 400, "bad_request")
    store = Path(pg_stack.env["KDQ_STORAGE_DIR"]) / "sha256"
    sha = hashlib.sha256(payload.read_bytes()).hexdigest()
    assert not (store / sha[:2] / sha[2:]).exists()
