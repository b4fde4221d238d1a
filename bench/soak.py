"""Soak: many small jobs back to back, with uploads and clients alongside, on one stack.

``--jobs`` (300) small jobs are submitted back to back (two in flight, so the job worker always has
the next one), while ``--uploads`` (60) uploads are made and validated at a steady pace and
``--clients`` (20) clients read alongside: half poll the newest job every half second, half follow
the newest jobs' event streams to their end. Printed:

* jobs completed / lost / crashed children (target: all / 0 / 0); uploads ready;
* dispatch (queued → running) p50 / p99;
* the RSS of every service process after the first jobs and at the end (target: flat within 10 %);
* database and store growth per job.

``--stack embedded`` (default) runs ``kdq serve``; ``--stack postgres`` the scaled-out shape
(``kdq api`` + two ``kdq worker`` on the machine's PostgreSQL and Redis). Writes
bench/out/soak-<stack>.json.

Usage: python bench/soak.py [--stack embedded|postgres] [--jobs 300] [--uploads 60] [--clients 20]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.service import JOB_SPEC, OUT, Service, write_job_inputs
from kdq.client import Client as KdqClient

WARM_JOBS = 5
"""RSS is first read after this many jobs (imports and caches warmed up)."""
IN_FLIGHT = 2


def _role(cmd: str) -> str | None:
    if "redis-server" in cmd:
        return "redis"
    if "postgres" in cmd and " -D " in cmd:
        return "postgres"
    if "validate@" in cmd or " worker --queues validate" in cmd:
        return "worker-validate"
    if "jobs@" in cmd or " worker --queues cpu" in cmd:
        return "worker-jobs"
    if " serve" in cmd:
        return "serve"
    if " api" in cmd:
        return "api"
    return None  # PostgreSQL's backends come and go with connections: not tracked


def processes(svc: Service) -> dict[str, psutil.Process]:
    """Every long-lived service process by a stable name: ``serve`` (or ``api``), postgres, redis,
    each worker's main process and its ``-pool`` child (not the pool's short-lived confined children)."""
    found: dict[str, psutil.Process] = {}
    for top in svc.procs:
        try:
            tree = [psutil.Process(top.pid), *psutil.Process(top.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for p in tree:
            try:
                role = _role(" ".join(p.cmdline()))
                parents = p.parents()
                parent_role = _role(" ".join(parents[0].cmdline())) if parents else None
                grand_role = _role(" ".join(parents[1].cmdline())) if len(parents) > 1 else None
            except psutil.Error:
                continue
            if role is None or (parent_role == role and grand_role == role):
                continue  # a task's confined child (worker.confine): it lives for one task
            name = f"{role}-pool" if role.startswith("worker") and parent_role == role else role
            found[name] = p
    return found


def rss_mib(procs: dict[str, psutil.Process]) -> dict[str, float]:
    out = {}
    for name, p in procs.items():
        try:
            out[name] = round(p.memory_info().rss / 2**20, 1)
        except psutil.Error:
            out[name] = float("nan")
    return out


def database_bytes(svc: Service) -> int:
    from sqlalchemy import create_engine, text

    from service.core.settings import Settings

    url = svc.env.get("KDQ_DATABASE_URL") or Settings(data_dir=Path(svc.env["KDQ_DATA_DIR"])).database_url
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(text("SELECT pg_database_size(current_database())")).scalar_one())
    finally:
        engine.dispose()


def store_bytes(svc: Service) -> int:
    root = Path(svc.env.get("KDQ_STORAGE_DIR") or Path(svc.env["KDQ_DATA_DIR"]) / "store")
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())


class Soak:
    def __init__(self, svc: Service, teacher: Path, data: Path, jobs: int, uploads: int, clients: int) -> None:
        self.svc, self.teacher, self.data = svc, teacher, data
        self.jobs, self.uploads, self.clients = jobs, uploads, clients
        self.job_ids: list[str] = []
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.reads = 0
        self.streamed = 0
        self.uploaded: list[dict[str, Any]] = []

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.svc.url, headers=self.svc.headers, timeout=60)

    def upload(self, c: httpx.Client, kind: str, path: Path) -> dict[str, Any]:
        with open(path, "rb") as f:
            r = c.post(f"/v1/{kind}", files={"file": (path.name, f)})
        r.raise_for_status()
        ident = r.json()["id"]
        while True:
            body = c.get(f"/v1/{kind}/{ident}").json()
            if body["state"] != "validating":
                return body
            time.sleep(0.2)

    def uploader(self, every_s: float) -> None:
        with self.client() as c:
            for i in range(self.uploads):
                if self.stop.wait(every_s):
                    return
                kind, path = ("models", self.teacher) if i % 2 else ("datasets", self.data)
                try:
                    self.uploaded.append(self.upload(c, kind, path))
                except Exception as exc:  # noqa: BLE001 -- counted and shown, the soak goes on
                    self.errors.append(f"upload: {exc!r}")

    def poller(self) -> None:
        with self.client() as c:
            while not self.stop.wait(0.5):
                if self.job_ids:
                    try:
                        c.get(f"/v1/jobs/{self.job_ids[-1]}").raise_for_status()
                        self.reads += 1
                    except Exception as exc:  # noqa: BLE001
                        self.errors.append(f"poll: {exc!r}")

    def follower(self) -> None:
        with self.client() as c:
            while not self.stop.is_set():
                if not self.job_ids:
                    time.sleep(0.2)
                    continue
                try:
                    for _ in KdqClient(http=c, log=io.StringIO()).events(self.job_ids[-1]):
                        pass
                    self.streamed += 1
                except Exception as exc:  # noqa: BLE001
                    self.errors.append(f"stream: {exc!r}")
                    time.sleep(0.5)

    def run(self) -> dict[str, Any]:
        with self.client() as c:
            ids = {"teacher_model_id": self.upload(c, "models", self.teacher)["id"],
                   "dataset_id": self.upload(c, "datasets", self.data)["id"]}  # fmt: skip
            threads = [threading.Thread(target=self.poller, daemon=True) for _ in range(self.clients // 2)]
            threads += [threading.Thread(target=self.follower, daemon=True) for _ in range(self.clients - self.clients // 2)]
            for t in threads:
                t.start()
            uploader: threading.Thread | None = None
            started = time.monotonic()
            start_rss: dict[str, float] = {}
            start_sizes = (database_bytes(self.svc), store_bytes(self.svc))
            pending: list[str] = []
            finished: dict[str, dict[str, Any]] = {}
            while len(finished) < self.jobs:
                while len(pending) < IN_FLIGHT and len(self.job_ids) < self.jobs:
                    r = c.post("/v1/jobs", json={**JOB_SPEC, **ids})
                    if r.status_code == 429:
                        time.sleep(float(r.headers.get("retry-after", "1")))
                        continue
                    r.raise_for_status()
                    pending.append(r.json()["id"])
                    self.job_ids.append(pending[-1])
                for job_id in list(pending):
                    job = c.get(f"/v1/jobs/{job_id}").json()
                    if job["state"] in ("SUCCEEDED", "FAILED", "CANCELLED"):
                        finished[job_id] = job
                        pending.remove(job_id)
                if len(finished) == WARM_JOBS and not start_rss:
                    start_rss = rss_mib(processes(self.svc))
                    per_job_s = (time.monotonic() - started) / WARM_JOBS
                    uploader = threading.Thread(target=self.uploader,
                                                args=(per_job_s * self.jobs / max(1, self.uploads),), daemon=True)
                    uploader.start()  # fmt: skip
                time.sleep(0.1)
            wall = time.monotonic() - started
            end_rss = rss_mib(processes(self.svc))
            end_sizes = (database_bytes(self.svc), store_bytes(self.svc))
            self.stop.set()
            if uploader is not None:
                uploader.join(120)
        states: dict[str, int] = {}
        failures: dict[str, int] = {}
        dispatch = []
        for job in finished.values():
            states[job["state"]] = states.get(job["state"], 0) + 1
            if job["state"] != "SUCCEEDED":
                code = (job.get("error") or {}).get("code") or job["state"]
                failures[code] = failures.get(code, 0) + 1
            if job["started_at"]:
                created, began = (datetime.fromisoformat(job[k]) for k in ("created_at", "started_at"))
                dispatch.append((began - created).total_seconds())
        dispatch.sort()
        growth = {n: round(100 * (end_rss[n] / start_rss[n] - 1), 1) for n in end_rss if n in start_rss}
        return {
            "jobs": self.jobs, "states": states, "failures": failures, "wall_s": round(wall, 1),
            "lost": self.jobs - states.get("SUCCEEDED", 0),
            "uploads_ready": sum(u["state"] == "ready" for u in self.uploaded), "uploads": len(self.uploaded),
            "dispatch_p50_s": round(statistics.median(dispatch), 3),
            "dispatch_p99_s": round(dispatch[min(len(dispatch) - 1, int(0.99 * len(dispatch)))], 3),
            "rss_start_MiB": start_rss, "rss_end_MiB": end_rss, "rss_growth_pct": growth,
            "db_bytes_per_job": round((end_sizes[0] - start_sizes[0]) / self.jobs),
            "store_bytes_per_job": round((end_sizes[1] - start_sizes[1]) / self.jobs),
            "client_reads": self.reads, "streams_followed": self.streamed, "client_errors": self.errors[:20],
        }  # fmt: skip


def crashed_children(svc: Service) -> int:
    """Children that died: the supervisor's restarts (kdq serve), or processes gone (scaled out)."""
    if len(svc.procs) == 1:
        parts = httpx.get(svc.url + "/readyz", timeout=10).json().get("parts", {})
        return sum(int(v.split("restarted ", 1)[1].split("×")[0]) for v in parts.values() if "restarted" in v)
    return sum(p.poll() is not None for p in svc.procs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stack", choices=["embedded", "postgres"], default="embedded")
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--uploads", type=int, default=60)
    parser.add_argument("--clients", type=int, default=20)
    args = parser.parse_args()
    os.environ.setdefault("KDQ_MAX_SUBMISSIONS_PER_MINUTE", "1000")
    with tempfile.TemporaryDirectory(prefix="kdq-soak-") as tmp:
        teacher, data = write_job_inputs(Path(tmp))
        svc = Service(args.stack, Path(tmp))
        try:
            result = Soak(svc, teacher, data, args.jobs, args.uploads, args.clients).run()
            result["crashed_children"] = crashed_children(svc)
        finally:
            svc.stop()
    result["stack"] = args.stack
    print(json.dumps(result, indent=2))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"soak-{args.stack}.json").write_text(json.dumps(result, indent=2))
    checks = [
        (f"jobs completed {result['states'].get('SUCCEEDED', 0)} / {args.jobs}", result["lost"] == 0),
        (f"crashed children {result['crashed_children']}", result["crashed_children"] == 0),
        (f"uploads ready {result['uploads_ready']} / {result['uploads']}", result["uploads_ready"] == result["uploads"]),
        ("RSS flat within 10 %: " + ", ".join(f"{k} {v:+}%" for k, v in result["rss_growth_pct"].items()),
         all(v <= 10 for v in result["rss_growth_pct"].values())),
    ]  # fmt: skip
    for name, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
