"""Faults injected into real processes (see `scenarios`): the worker SIGKILLed and SIGSTOPped
mid-job, Redis and PostgreSQL restarted, the artifact store full, a cancel mid-job. In every
case no job is lost or left stuck, and each case's named checks hold."""

from __future__ import annotations

import json
from typing import Any

import pytest

from . import scenarios
from .scenarios import Outcome
from .stack import FaultStack


def assert_survived(out: Outcome, stack: FaultStack) -> None:
    detail = {
        "failed checks": out.failures(),
        "jobs": {j: (v.get("state"), v.get("attempts"), v.get("error")) for j, v in out.jobs.items()},
        "facts": out.facts,
    }
    message = json.dumps(detail, indent=1, default=str) + "\n" + stack.log_tail(lines=25)
    assert out.failures() == [], message
    assert out.lost == 0 and out.completed == out.submitted > 0, message


def test_sigkilled_worker_job_resumes_on_a_new_worker(
    fault_stack: FaultStack, fault_uploads: dict[str, Any]
) -> None:
    out = scenarios.worker_killed(fault_stack, fault_uploads)
    assert_survived(out, fault_stack)
    assert out.facts["attempts"] == 2 and out.facts["resumed_from_step"] >= scenarios.CHECKPOINT_EVERY


def test_sigstopped_worker_cannot_overwrite_the_newer_attempt(
    fault_stack: FaultStack, fault_uploads: dict[str, Any]
) -> None:
    out = scenarios.worker_paused(fault_stack, fault_uploads)
    assert_survived(out, fault_stack)


def test_redis_restart_during_a_burst_loses_no_job(
    fault_stack: FaultStack, fault_uploads: dict[str, Any]
) -> None:
    out = scenarios.redis_restarted(fault_stack, fault_uploads)
    assert_survived(out, fault_stack)
    assert out.submitted == 20 and out.facts["jobs_relayed"] >= 1


def test_postgres_restart_answers_503_then_every_job_completes(
    fault_stack: FaultStack, fault_uploads: dict[str, Any]
) -> None:
    out = scenarios.postgres_restarted(fault_stack, fault_uploads)
    assert_survived(out, fault_stack)


def test_full_artifact_store_fails_the_job_cleanly(
    fault_stack: FaultStack, fault_uploads: dict[str, Any]
) -> None:
    out = scenarios.disk_full(fault_stack, fault_uploads)
    assert_survived(out, fault_stack)
    assert out.facts["error"]["status"] == 507


def test_cancel_mid_job_is_cooperative_and_keeps_nothing(
    fault_stack: FaultStack, fault_uploads: dict[str, Any]
) -> None:
    out = scenarios.cancelled(fault_stack, fault_uploads)
    assert_survived(out, fault_stack)


def test_killed_validation_is_retried_then_given_up(fault_stack: FaultStack, tmp_path: Any) -> None:
    out = scenarios.validation_worker_killed(fault_stack, scenarios.slow_image_zip(tmp_path / "slow.zip"))
    assert out.failures() == [], json.dumps({"failed": out.failures(), "facts": out.facts}, indent=1, default=str) \
        + "\n" + fault_stack.log_tail(lines=25)


@pytest.fixture(autouse=True)
def _fresh_disk(fault_stack: FaultStack) -> Any:
    yield
    fault_stack.disk.empty()  # a failed disk-full test must not break the next one
