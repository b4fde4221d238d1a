"""Fair sharing: one team's queue of jobs does not hold the workers from another team's job."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import httpx

from .assets import FAST_SPEC
from .conftest import Stack
from .flows import submit, wait_job

LONG = {**FAST_SPEC, "distillation": {**FAST_SPEC["distillation"], "epochs": 60}}


def test_another_teams_job_goes_next_not_after_the_queue(pg_stack: Stack, pg_uploads: dict[str, Any],
                                                        assets: dict[str, Any]) -> None:  # fmt: skip
    """Team A fills its quota with four jobs on the stack's one job worker; team B's job, submitted
    after them, is the next to start once A's first is done: B waits one job-slot turnover, not four."""
    from .flows import ready_upload

    ids = {"teacher_model_id": pg_uploads["teacher"]["id"], "dataset_id": pg_uploads["dataset"]["id"]}
    with pg_stack.client() as a, pg_stack.client(pg_stack.make_key("fair-b")) as b:
        b_ids = {"teacher_model_id": ready_upload(b, "models", assets["teacher"], format="zoo_zip")["id"],
                 "dataset_id": ready_upload(b, "datasets", assets["data"], format="npz")["id"]}  # fmt: skip
        a_jobs = [submit(a, {**LONG, **ids}).json()["id"] for _ in range(4)]
        wait_job(a, a_jobs[0], {"RUNNING", "SUCCEEDED", "FAILED"}, timeout=120)
        b_job = submit(b, {**FAST_SPEC, **b_ids}).json()["id"]
        done = {j: wait_job(a, j, timeout=300) for j in a_jobs}
        b_done = wait_job(b, b_job, timeout=300)
    assert all(job["state"] == "SUCCEEDED" for job in [*done.values(), b_done])
    started = sorted([(datetime.fromisoformat(j["started_at"]), j["id"]) for j in [*done.values(), b_done]])
    order = [job_id for _, job_id in started]
    assert order.index(b_job) == 1, order  # right after the job that was running when it came
