"""The faults, each injected into a running `FaultStack` the way it happens in production, and
what a client sees afterwards. Each scenario returns an `Outcome`: the jobs it submitted, how
they ended, and named checks (each a behaviour that could fail). The tests assert the checks;
``bench/faults.py`` prints them as a table.
"""

from __future__ import annotations

import hashlib
import re
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.service.assets import EXPECTED_ARTIFACTS, FAST_SPEC
from tests.service.conftest import kdq
from tests.service.flows import TERMINAL, sse_events, submit

from .stack import FaultStack

CHECKPOINT_EVERY = 20
LONG_SPEC = {
    **FAST_SPEC,
    "distillation": {**FAST_SPEC["distillation"], "epochs": 300, "checkpoint_every": CHECKPOINT_EVERY},
}
"""~1800 training steps (several seconds), a checkpoint every 20: long enough to break mid-way."""
KILL_AFTER_STEP = 5 * CHECKPOINT_EVERY


@dataclass
class Outcome:
    fault: str
    injected: str
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Every job the scenario submitted (202) → its last state as the API shows it."""
    expected: dict[str, str] = field(default_factory=dict)
    """Job id → the terminal state it must reach (SUCCEEDED unless the fault makes it FAILED)."""
    checks: dict[str, bool] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def submitted(self) -> int:
        return len(self.jobs)

    @property
    def completed(self) -> int:
        """Jobs that reached the terminal state they should."""
        return sum(1 for j, job in self.jobs.items() if job.get("state") == self.expected.get(j, "SUCCEEDED"))

    @property
    def lost(self) -> int:
        """Jobs that never reached a terminal state (lost or stuck)."""
        return sum(1 for job in self.jobs.values() if job.get("state") not in TERMINAL)

    @property
    def survived(self) -> bool:
        return all(self.checks.values()) and self.lost == 0 and self.completed == self.submitted

    def failures(self) -> list[str]:
        return [name for name, ok in self.checks.items() if not ok]


# --- client helpers ------------------------------------------------------------------------


def wait_for(what: str, predicate: Callable[[], Any], timeout: float, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not after {timeout}s")
        time.sleep(every)


def get_job(c: httpx.Client, job_id: str) -> dict[str, Any]:
    r = c.get(f"/v1/jobs/{job_id}")
    return r.json() if r.status_code == 200 else {"state": f"HTTP {r.status_code}"}


def submit_job(c: httpx.Client, uploads: dict[str, Any], spec: dict[str, Any] = FAST_SPEC) -> str:
    r = submit(c, job_body(uploads, spec))
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def job_body(uploads: dict[str, Any], spec: dict[str, Any] = FAST_SPEC) -> dict[str, Any]:
    return {**spec, "teacher_model_id": uploads["teacher"]["id"], "dataset_id": uploads["dataset"]["id"]}


def wait_jobs(c: httpx.Client, ids: list[str], timeout: float) -> dict[str, dict[str, Any]]:
    """Every job's last answer once all are terminal (or the time is up: some are not)."""
    last: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while True:
        for job_id in ids:
            if last.get(job_id, {}).get("state") not in TERMINAL:
                last[job_id] = get_job(c, job_id)
        if all(j.get("state") in TERMINAL for j in last.values()) or time.monotonic() > deadline:
            return last
        time.sleep(0.25)


def wait_training(c: httpx.Client, job_id: str, step: int, timeout: float = 90) -> dict[str, Any]:
    """Until the job is RUNNING in the distill stage at ``step`` or later."""

    def there() -> dict[str, Any] | None:
        job = get_job(c, job_id)
        if job["state"] in TERMINAL:
            raise AssertionError(f"job {job_id} ended before step {step}: {job}")
        running = job["state"] == "RUNNING" and job["stage"] == "distill"
        return job if running and job["progress"]["current"] >= step else None

    return wait_for(f"job {job_id} at step {step}", there, timeout)


def events_of(c: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    """The job's whole event stream (it ends, since the job is finished)."""
    return sse_events(c, job_id, timeout=60)


def artifacts_of(c: httpx.Client, job_id: str) -> dict[str, str]:
    """Artifact name → sha256, as listed."""
    return {a["name"]: a["sha256"] for a in c.get(f"/v1/jobs/{job_id}/artifacts").json()["items"]}


def downloads_match(c: httpx.Client, job_id: str) -> bool:
    """Every listed artifact downloads, with the listed sha256."""
    listing = c.get(f"/v1/jobs/{job_id}/artifacts").json()["items"]
    return bool(listing) and all(
        hashlib.sha256(c.get(a["url"]).content).hexdigest() == a["sha256"] for a in listing
    )


def state_events(events: list[dict[str, Any]]) -> list[str]:
    return [e["data"]["state"] for e in events if e["event"] == "state"]


def resumed_step(events: list[dict[str, Any]]) -> int | None:
    for e in events:
        if e["event"] == "log" and (m := re.fullmatch(r"resumed from step (\d+)", e["data"]["message"])):
            return int(m.group(1))
    return None


def first_distill_step_of_last_attempt(events: list[dict[str, Any]]) -> int | None:
    """The first training step the last attempt reported (after its RUNNING event)."""
    running = [i for i, e in enumerate(events) if e["event"] == "state" and e["data"]["state"] == "RUNNING"]
    if not running:
        return None
    for e in events[running[-1] :]:
        if e["event"] == "progress" and e["data"]["stage"] == "distill" and e["data"]["step"] > 0:
            return int(e["data"]["step"])
    return None


def stored_blobs(stack: FaultStack) -> set[str]:
    return {p.parent.name + p.name for p in (stack.disk.path / "sha256").glob("*/*") if p.is_file()}


def job_files(stack: FaultStack, job_id: str) -> list[Path]:
    folder = stack.root / "work" / "jobs" / job_id
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


# --- the faults ----------------------------------------------------------------------------


def worker_killed(stack: FaultStack, uploads: dict[str, Any]) -> Outcome:
    """SIGKILL the worker (its whole process group) mid-training; another worker takes over."""
    out = Outcome("worker SIGKILL mid-job", "")
    started = time.monotonic()
    victim = stack.only_worker()
    with stack.client() as c:
        job_id = submit_job(c, uploads, LONG_SPEC)
        out.expected[job_id] = "SUCCEEDED"
        at = wait_training(c, job_id, KILL_AFTER_STEP)["progress"]["current"]
        stack.signal(victim, signal.SIGKILL)
        out.injected = f"SIGKILL at training step ≥{at}"
        stack.new_worker(wait=False)
        final = wait_jobs(c, [job_id], 180)[job_id]
        out.jobs[job_id] = final
        events = events_of(c, job_id)
        resumed = resumed_step(events)
        first = first_distill_step_of_last_attempt(events)
        out.facts = {"killed_at_step": at, "attempts": final.get("attempts"), "resumed_from_step": resumed,
                     "first_step_of_retry": first, "states": state_events(events)}  # fmt: skip
        out.checks = {
            "succeeded": final["state"] == "SUCCEEDED",
            "finished on the retry (attempts == 2)": final.get("attempts") == 2,
            "states RUNNING → QUEUED → RUNNING → SUCCEEDED": state_events(events)
            == ["RUNNING", "QUEUED", "RUNNING", "SUCCEEDED"],
            "resumed from a checkpoint": resumed is not None
            and CHECKPOINT_EVERY <= resumed
            and resumed % CHECKPOINT_EVERY == 0,
            "the retry trained only the remaining steps": first is not None
            and resumed is not None
            and first > resumed,
            "the same artifacts": set(artifacts_of(c, job_id)) == EXPECTED_ARTIFACTS,
            "artifacts download with their sha256": downloads_match(c, job_id),
            "scratch folder removed": wait_or_false(lambda: job_files(stack, job_id) == [], 10),
        }
    stack.stop(victim)
    out.seconds = time.monotonic() - started
    return out


def worker_paused(stack: FaultStack, uploads: dict[str, Any]) -> Outcome:
    """SIGSTOP the worker past ``stale_after_s``: the reaper requeues, a second worker finishes;
    then SIGCONT the first: its writes must all be refused."""
    out = Outcome("worker SIGSTOP → SIGCONT", "")
    started = time.monotonic()
    paused = stack.only_worker()
    with stack.client() as c:
        job_id = submit_job(c, uploads, LONG_SPEC)
        out.expected[job_id] = "SUCCEEDED"
        at = wait_training(c, job_id, KILL_AFTER_STEP)["progress"]["current"]
        stack.signal(paused, signal.SIGSTOP)
        stopped = time.monotonic()
        stack.new_worker(wait=False)
        wait_for(
            "the second attempt",
            lambda: (j := get_job(c, job_id))["attempts"] == 2 and j["state"] == "RUNNING",
            120,
        )
        final = wait_jobs(c, [job_id], 180)[job_id]
        before = (artifacts_of(c, job_id), events_of(c, job_id), c.get(f"/v1/jobs/{job_id}").json())
        stack.signal(paused, signal.SIGCONT)
        out.injected = f"SIGSTOP at step ≥{at} for {time.monotonic() - stopped:.0f} s, then SIGCONT"
        fenced = f"job {job_id}: attempt 1 no longer owns the job"
        ended = f"job {job_id} attempt 1: superseded"
        try:
            wait_for("the stale attempt to give up", lambda: ended in stack.log_text(paused), 90)
        except TimeoutError:
            pass  # the checks below say so
        log = stack.log_text(paused)
        after = (artifacts_of(c, job_id), events_of(c, job_id), get_job(c, job_id))
        out.jobs[job_id] = after[2]
        out.facts = {"paused_at_step": at, "attempts": after[2].get("attempts"),
                     "stale attempt's log": [ln.split("]", 1)[-1].strip() for ln in log.splitlines()
                                             if job_id in ln and "attempt 1" in ln]}  # fmt: skip
        out.checks = {
            "succeeded on attempt 2": final["state"] == "SUCCEEDED" and final["attempts"] == 2,
            "the stale attempt woke and was fenced off": fenced in log and ended in log,
            "artifacts unchanged after SIGCONT": after[0] == before[0]
            and set(after[0]) == EXPECTED_ARTIFACTS,
            "no event written after SIGCONT": after[1] == before[1],
            "job row unchanged after SIGCONT": after[2] == before[2],
            "artifacts download with their sha256": downloads_match(c, job_id),
            "scratch folder removed": wait_or_false(lambda: job_files(stack, job_id) == [], 10),
        }
    stack.stop(paused)
    out.seconds = time.monotonic() - started
    return out


def redis_restarted(stack: FaultStack, uploads: dict[str, Any], burst: int = 20) -> Outcome:
    """A burst of submissions; Redis is killed and restarted empty part-way through."""
    out = Outcome("Redis restarted (no persistence) during a burst", "")
    started = time.monotonic()
    stack.only_worker()
    import redis as redis_client

    broker = redis_client.Redis(port=stack.redis.port)
    waiting = 0
    with stack.client() as c:
        for i in range(burst):
            if i == burst * 2 // 5:
                # (one list per priority: "cpu", then "cpu\x06\x161" … for a team's later jobs)
                waiting = sum(int(broker.llen(k)) for k in broker.scan_iter(match="cpu*") if broker.type(k) == b"list")
                stack.redis.kill()
                down = time.monotonic()
            if i == burst * 3 // 5:
                stack.redis.start()
                out.injected = (
                    f"kill -9 after {burst * 2 // 5} submissions ({waiting} waiting in the queue), "
                    f"restarted {time.monotonic() - down:.1f} s later"
                )
            job_id = submit_job(c, uploads)
            out.expected[job_id] = "SUCCEEDED"
            out.jobs[job_id] = {"state": "QUEUED"}
        out.jobs = wait_jobs(c, list(out.jobs), 240)
        relayed = 0
        once = True
        for job_id in out.jobs:
            events = events_of(c, job_id)
            relayed += any(e["event"] == "log" and "sent to the queue again" in e["data"]["message"]
                           for e in events)  # fmt: skip
            once &= state_events(events).count("SUCCEEDED") == 1
        out.facts = {"waiting_when_killed": waiting, "jobs_relayed": relayed}
        out.checks = {
            "every submission answered 202": True,  # submit_job asserts it
            "messages were lost with Redis": waiting > 0,
            "the relay sent the lost jobs again": relayed >= 1,
            "every job succeeded once": once and all(j["state"] == "SUCCEEDED" for j in out.jobs.values()),
        }
    out.seconds = time.monotonic() - started
    return out


def postgres_restarted(stack: FaultStack, uploads: dict[str, Any]) -> Outcome:
    """PostgreSQL stopped (fast shutdown: every connection cut) while a job trains and others
    wait; the API must answer 503 problems meanwhile, and recover by itself."""
    out = Outcome("PostgreSQL restarted mid-job", "")
    started = time.monotonic()
    stack.only_worker()
    with stack.client() as c:
        spec = {**LONG_SPEC, "distillation": {**LONG_SPEC["distillation"], "epochs": 150}}
        ids = [submit_job(c, uploads, spec)] + [submit_job(c, uploads) for _ in range(3)]
        wait_training(c, ids[0], CHECKPOINT_EVERY)
        stack.pg.stop("fast")
        down = time.monotonic()
        answers = [
            c.get("/v1/jobs"),
            c.get(f"/v1/jobs/{ids[1]}"),
            submit(c, job_body(uploads)),
        ]
        ready = c.get("/readyz")
        time.sleep(max(0.0, 3.0 - (time.monotonic() - down)))  # down for about 3 s
        stack.pg.start()
        out.injected = f"pg_ctl stop -m fast while job 1 trains, start {time.monotonic() - down:.1f} s later"
        for job_id in ids:
            out.expected[job_id] = "SUCCEEDED"
        out.jobs = wait_jobs(c, ids, 240)
        after = submit_job(c, uploads)
        out.expected[after] = "SUCCEEDED"
        out.jobs |= wait_jobs(c, [after], 120)
        problems = [
            r.status_code == 503
            and r.headers.get("content-type") == "application/problem+json"
            and r.json().get("code") == "database_unavailable"
            and r.headers.get("retry-after", "").isdigit()
            for r in answers
        ]
        out.facts = {"answers while down": [(r.status_code, r.json().get("code")) for r in answers],
                     "attempts": [j.get("attempts") for j in out.jobs.values()]}  # fmt: skip
        out.checks = {
            "503 database_unavailable problems with Retry-After while down": all(problems),
            "/readyz said not ready while down": ready.status_code == 503,
            "ready again afterwards": c.get("/readyz").status_code == 200,
            "every job succeeded (none stuck)": all(j["state"] == "SUCCEEDED" for j in out.jobs.values()),
        }
    out.seconds = time.monotonic() - started
    return out


def disk_full(stack: FaultStack, uploads: dict[str, Any]) -> Outcome:
    """The artifact store's filesystem is full when the job stores its results."""
    out = Outcome("artifact store full (ENOSPC)", "")
    started = time.monotonic()
    worker = stack.only_worker()
    with stack.client() as c:
        earlier = submit_job(c, uploads)
        out.expected[earlier] = "SUCCEEDED"
        out.jobs |= wait_jobs(c, [earlier], 120)
        blobs = stored_blobs(stack)
        taken = stack.disk.fill(leave=64 << 10)  # room for the small artifacts, not for the report
        out.injected = f"tmpfs store filled ({taken >> 20} MiB, {stack.disk.free_bytes() >> 10} KiB left)"
        job_id = submit_job(c, uploads)
        out.expected[job_id] = "FAILED"
        final = wait_jobs(c, [job_id], 120)[job_id]
        out.jobs[job_id] = final
        error = final.get("error") or {}
        serves = [
            c.get(f"/v1/jobs/{job_id}").status_code == 200,
            c.get("/v1/jobs").status_code == 200,
            c.get("/readyz").status_code == 200,
            downloads_match(c, earlier),
        ]
        leftovers = [p.name for p in (stack.disk.path / "tmp").glob("*")]
        pattern = re.compile(rf"job {job_id}: (\d+) stored artifact\(s\) released, (\d+) deleted")
        wait_or_false(lambda: pattern.search(stack.log_text(worker)) is not None, 10)
        released = pattern.search(stack.log_text(worker))
        out.facts = {"error": error, "blobs before": len(blobs), "blobs after": len(stored_blobs(stack)),
                     "artifacts stored, then released": released and int(released.group(1))}  # fmt: skip
        out.checks = {
            "FAILED with code storage_full": final["state"] == "FAILED"
            and error.get("code") == "storage_full",
            "the reason says no space": "no space left" in (error.get("detail") or ""),
            "no artifacts listed": artifacts_of(c, job_id) == {},
            "partial blobs stored before ENOSPC were released": released is not None
            and int(released.group(2)) >= 1
            and stored_blobs(stack) == blobs,
            "no temp files left in the store": leftovers == [],
            "scratch folder removed": wait_or_false(lambda: job_files(stack, job_id) == [], 10),
            "the API kept serving reads and downloads": all(serves),
        }
        stack.disk.empty()
        again = submit_job(c, uploads)
        out.expected[again] = "SUCCEEDED"
        out.jobs |= wait_jobs(c, [again], 120)
        out.checks["a job succeeds once space is freed"] = out.jobs[again]["state"] == "SUCCEEDED"
    out.seconds = time.monotonic() - started
    return out


def cancelled(stack: FaultStack, uploads: dict[str, Any]) -> Outcome:
    """Cancel mid-training: CANCELLED within seconds, nothing of the attempt kept."""
    out = Outcome("cancel mid-job", "POST /cancel during training")
    started = time.monotonic()
    stack.only_worker()
    with stack.client() as c:
        blobs = stored_blobs(stack)
        job_id = submit_job(c, uploads, LONG_SPEC)
        out.expected[job_id] = "CANCELLED"
        wait_training(c, job_id, CHECKPOINT_EVERY)
        asked = time.monotonic()
        r = c.post(f"/v1/jobs/{job_id}/cancel")
        final = wait_jobs(c, [job_id], 60)[job_id]
        took = time.monotonic() - asked
        out.jobs[job_id] = final
        out.facts = {"seconds to CANCELLED": round(took, 2)}
        out.checks = {
            "CANCELLING at once": r.status_code == 202 and r.json()["state"] == "CANCELLING",
            "CANCELLED within 5 s": final["state"] == "CANCELLED" and took < 5,
            "no artifacts, no new blobs": artifacts_of(c, job_id) == {} and stored_blobs(stack) == blobs,
            "scratch folder removed": wait_or_false(lambda: job_files(stack, job_id) == [], 10),
        }
    out.seconds = time.monotonic() - started
    return out


def wait_or_false(predicate: Callable[[], bool], timeout: float) -> bool:
    try:
        return bool(wait_for("condition", predicate, timeout))
    except TimeoutError:
        return False


FAULTS: dict[str, Callable[[FaultStack, dict[str, Any]], Outcome]] = {
    "sigkill": worker_killed,
    "sigstop": worker_paused,
    "redis": redis_restarted,
    "postgres": postgres_restarted,
    "disk_full": disk_full,
}


# --- validations ---------------------------------------------------------------------------

def slow_image_zip(path: Path, images: int = 8_000, side: int = 24) -> Path:
    """An honest image dataset that takes seconds to validate (thousands of small PNGs)."""
    import io
    import zipfile

    import numpy as np
    from PIL import Image

    ramp = np.linspace(0, 255, side * side * 3).astype(np.uint8).reshape(side, side, 3)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for i in range(images):
            buf = io.BytesIO()
            Image.fromarray(np.roll(ramp, i, axis=1)).save(buf, format="PNG")
            zf.writestr(f"{'ab'[i % 2]}/{i}.png", buf.getvalue())
    return path


def _attempts(stack: FaultStack, upload_id: str) -> int:
    import psycopg

    with psycopg.connect(stack.pg.url.replace("+psycopg", "")) as conn:
        row = conn.execute("SELECT attempts FROM datasets WHERE id = %s", (upload_id,)).fetchone()
    return int(row[0]) if row else 0


def validation_worker_killed(stack: FaultStack, slow_zip: Path) -> Outcome:
    """SIGKILL the validation worker mid-validation, twice: the first time the reaper sends the
    validation again (its heartbeat stopped) and a new worker finishes it; an upload whose worker is
    lost on every attempt ends ``invalid`` after ``max_validation_attempts`` (2 here), not
    ``validating`` forever."""
    out = Outcome("validation worker SIGKILL", "")
    started = time.monotonic()
    names = iter(f"validate-{i}" for i in range(2, 10))
    with stack.client() as c:
        def kill_mid_validation(upload_id: str, attempt: int) -> float:
            wait_for(f"attempt {attempt} under way", lambda: _attempts(stack, upload_id) >= attempt, 60, every=0.05)
            victim = next(n for n, p in stack.procs.items() if "validate" in n and p.poll() is None)
            stack.signal(victim, signal.SIGKILL)
            stack.procs[victim].wait(10)
            killed_at = time.monotonic()
            stack.spawn(name := next(names), kdq("worker", "--queues", "validate", "--name", name))
            return killed_at

        with open(slow_zip, "rb") as f:
            retried = c.post("/v1/datasets", files={"file": ("slow.zip", f)}, data={"format": "image_zip"}).json()["id"]
        killed = kill_mid_validation(retried, 1)
        first = wait_for("the retried validation", lambda: _terminal_upload(c, retried), 120)
        recovered_s = time.monotonic() - killed

        with open(slow_zip, "rb") as f:
            doomed = c.post("/v1/datasets", files={"file": ("slow2.zip", f)}, data={"format": "image_zip"}).json()["id"]
        kill_mid_validation(doomed, 1)
        kill_mid_validation(doomed, 2)
        second = wait_for("the twice-lost validation", lambda: _terminal_upload(c, doomed), 120)
    out.injected = "SIGKILL of the validation worker's process group while validating (once; then twice)"
    out.facts = {"recovered_after_s": round(recovered_s, 1), "attempts": _attempts(stack, retried),
                 "given_up": second.get("error")}  # fmt: skip
    out.checks = {
        "a killed validation is retried and ends ready": first["state"] == "ready" and first["summary"]["samples"] > 0,
        "on its second attempt": _attempts(stack, retried) == 2,
        "within a minute of the kill": recovered_s < 60,
        "lost on every attempt: invalid, not validating": second["state"] == "invalid",
        "saying why": "did not finish in 2 attempts" in (second.get("error") or {}).get("detail", ""),
    }
    out.seconds = time.monotonic() - started
    return out


def _terminal_upload(c: httpx.Client, upload_id: str) -> dict[str, Any] | None:
    body = c.get(f"/v1/datasets/{upload_id}").json()
    return body if body["state"] != "validating" else None
