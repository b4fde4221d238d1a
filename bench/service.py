"""Service benchmarks. Prints the numbers and writes bench/out/service.json.

Cases (each measured in one run beside its baseline)
  upload  a 1 GiB safetensors dataset through ``POST /v1/datasets`` (curl as the client) against ``cp`` of the
          same file (and a copy + fsync, since the store fsyncs; and curl to a bare endpoint under
          the same uvicorn that only counts the bytes: what HTTP over loopback costs here); the
          API process's peak RSS growth while it streams (target: ratio ≥ 0.5, growth ≤ 64 MiB).
          Three rounds, interleaved, each step started after ``sync``; the ratios take each
          baseline's best round and the upload's median. Also printed:
          sha256 of the file alone on one core, which every upload must compute, so ``cp`` over it
          bounds the ratio any implementation can reach on this machine.
  get     ``GET /v1/jobs/{id}`` at 50 concurrent keep-alive clients against a bare FastAPI
          endpoint returning the same JSON under the same uvicorn (target: req/s ratio ≥ 0.5).
  job     a small job through the service (submit → SUCCEEDED, as a client following the job's
          event stream sees it) against the same ``compress()`` call made directly, both warm and
          alternated, nine times each (target:
          ≤ 1.10× the wall time; queued → running median ≤ 1 s). On a shared machine the
          engine's own time swings run to run, so the service's overhead is also measured per
          job (client wall time minus the engine time the worker reports) and added to the
          direct median.

The service runs as ``kdq serve`` (its own PostgreSQL and Redis) by default, or with ``--stack postgres``
as ``kdq api`` + ``kdq worker``s on a fresh Postgres database and Redis.

Usage: python bench/service.py [--cases upload,get,job] [--stack embedded|postgres] [--upload-mib 1024]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import json
import os
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Any, Self

import httpx
from starlette.requests import Request

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out"
sys.path.insert(0, str(REPO))
from kdq.client import Client as KdqClient  # noqa: E402  (after the path)

JOB_SPEC = {
    "student": {"kind": "auto", "max_params_ratio": 0.25},
    "distillation": {"epochs": 5, "batch_size": 64, "baseline": False, "seed": 0},
    "quantization": {"method": "static_int8", "calibration_samples": 128},
    "evaluation": {"latency_batch_sizes": [1], "warmup": 2, "repeats": 10, "disagreements": 5},
}
TEACHER_CONFIG = {
    "architecture": "mlp",
    "task": "classification",
    "input_dim": 32,
    "hidden": [128, 128],
    "output_dim": 5,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def wait_ready(url: str, procs: list[subprocess.Popen[bytes]], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError("a service process exited during start")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready")


class Service:
    """The service under test, as subprocesses; ``api_pid`` is the process that serves HTTP."""

    def __init__(self, stack: str, root: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.root = root
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("KDQ_")}
        self.env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), KDQ_DATA_DIR=str(root / "data"))
        self.procs: list[subprocess.Popen[bytes]] = []
        self.database: str | None = None
        kdq = [sys.executable, "-m", "service.cli"]
        if stack == "embedded":
            self.key = self._make_key(kdq)
            self._spawn([*kdq, "serve", "--port", str(self.port)])
        else:
            import psycopg

            self.database = f"kdq_bench_{secrets.token_hex(4)}"
            with psycopg.connect(
                os.environ.get("KDQ_BENCH_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/test"),
                autocommit=True,
            ) as conn:
                conn.execute(f'CREATE DATABASE "{self.database}"')
            self.env.update(
                KDQ_DATABASE_URL=f"postgresql+psycopg://postgres@127.0.0.1:5432/{self.database}",
                KDQ_BROKER_URL=os.environ.get("KDQ_BENCH_REDIS", "redis://127.0.0.1:6379/0"),
                KDQ_BROKER_KEY_PREFIX=f"{self.database}:",
            )
            subprocess.run([*kdq, "migrate"], cwd=REPO, env=self.env, check=True, capture_output=True)
            self.key = self._make_key(kdq)
            self._spawn([*kdq, "api", "--host", "127.0.0.1", "--port", str(self.port)])
            self._spawn([*kdq, "worker", "--queues", "validate", "--name", "validate"])
            self._spawn([*kdq, "worker", "--queues", "cpu,gpu", "--name", "jobs"])
        self.api_pid = self.procs[0].pid
        wait_ready(self.url, self.procs)

    @property
    def headers(self) -> dict[str, str]:
        """Every request carries a team's API key: key checking is part of what is measured."""
        return {"Authorization": f"Bearer {self.key}"}

    def _make_key(self, kdq: list[str]) -> str:
        out = subprocess.run(
            [*kdq, "keys", "create", "--team", "bench"], cwd=REPO, env=self.env, check=True, capture_output=True,
            text=True,
        )
        return out.stdout.strip()

    def _spawn(self, argv: list[str]) -> None:
        with open(self.root / "service.log", "ab") as log:
            self.procs.append(
                subprocess.Popen(
                    argv, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
            )

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        if self.database:
            import psycopg

            with psycopg.connect(
                os.environ.get("KDQ_BENCH_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/test"),
                autocommit=True,
            ) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')


# --- upload ----------------------------------------------------------------------------------


def _timed(argv: list[str]) -> float:
    """Seconds ``argv`` takes, started with the page cache's dirty pages already on disk (so
    one measurement does not pay for the writes of the one before)."""
    os.sync()
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True)
    return time.perf_counter() - t0


def bench_upload(svc: Service, mib: int, repeats: int = 3) -> dict[str, Any]:
    src = svc.root / "big.safetensors"
    rows = mib * 1024  # float32 rows of 256 values: 1 KiB each
    header = json.dumps({"x": {"dtype": "F32", "shape": [rows, 256], "data_offsets": [0, rows * 1024]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(src, "wb") as f:  # a well-formed safetensors dataset: the upload's own checks pass it
        f.write(len(header).to_bytes(8, "little") + header)
        f.writelines(os.urandom(1 << 20) for _ in range(mib))
    size = src.stat().st_size
    copy = svc.root / "copy.bin"
    curl = ["curl", "-sSf", "-o", "/dev/null", "-F", f"file=@{src};type=application/octet-stream"]

    _timed(["cp", str(src), "/dev/null"])  # warm: the file is read once from the page cache before any round
    cp_s, cp_sync_s, bare_s, upload_s, growth, sha_s = [], [], [], [], [], []
    with BareServer() as bare:
        for _ in range(repeats):  # interleaved, so a slow spell of the disk hits every kind alike
            sha_s.append(_sha256_seconds(src))
            cp_s.append(_timed(["cp", str(src), str(copy)]))
            copy.unlink()
            cp_sync_s.append(_timed(["dd", f"if={src}", f"of={copy}", "bs=4M", "conv=fsync", "status=none"]))
            copy.unlink()
            bare_s.append(_timed([*curl, f"http://127.0.0.1:{bare.port}/upload"]))
            seconds, grew = _upload_once(svc, src, size)
            upload_s.append(seconds)
            growth.append(grew)
    src.unlink()
    # the baselines at their best (a conservative ratio), the service at its median
    cp, cp_sync, bare_med, sha = (min(x) for x in (cp_s, cp_sync_s, bare_s, sha_s))
    up = statistics.median(upload_s)
    return {
        "bytes": size,
        "repeats": repeats,
        "cp_s": [round(x, 3) for x in cp_s],
        "cp_fsync_s": [round(x, 3) for x in cp_sync_s],
        "bare_receive_s": [round(x, 3) for x in bare_s],
        "upload_s": [round(x, 3) for x in upload_s],
        "sha256_only_s": [round(x, 3) for x in sha_s],
        "cp_MBps": round(size / cp / 1e6, 1),
        "upload_MBps": round(size / up / 1e6, 1),
        "throughput_ratio_vs_cp": round(cp / up, 3),
        "throughput_ratio_vs_cp_fsync": round(cp_sync / up, 3),
        "throughput_ratio_vs_bare_receive": round(bare_med / up, 3),
        "bare_receive_ratio_vs_cp": round(cp / bare_med, 3),
        "sha256_only_ratio_vs_cp": round(cp / sha, 3),
        "api_rss_growth_MiB": round(max(growth) / 2**20, 1),
    }


def _sha256_seconds(path: Path) -> float:
    """Hashing the file alone, from the page cache, on one core: every upload does at least this
    (the store names blobs by sha256), so ``cp / this`` bounds the upload's ratio to ``cp``."""
    t0 = time.perf_counter()
    with open(path, "rb") as f:
        hashlib.file_digest(f, "sha256")
    return time.perf_counter() - t0


def _upload_once(svc: Service, src: Path, size: int) -> tuple[float, int]:
    """One upload through the service: (seconds, the API's peak RSS growth meanwhile); the
    upload is deleted again once validated."""
    base = rss_bytes(svc.api_pid)
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            peak[0] = max(peak[0], rss_bytes(svc.api_pid))

    sampler = threading.Thread(target=sample)
    sampler.start()
    seconds = _timed(
        [
            "curl",
            "-sSf",
            "-o",
            str(svc.root / "upload.json"),
            "-F",
            f"file=@{src};type=application/octet-stream",
            "-F",
            "format=safetensors",
            "-H",
            f"Authorization: Bearer {svc.key}",
            f"{svc.url}/v1/datasets",
        ]
    )
    done.set()
    sampler.join()
    body = json.loads((svc.root / "upload.json").read_text())
    assert body["size_bytes"] == size, body
    url = f"{svc.url}/v1/datasets/{body['id']}"
    while httpx.get(url, headers=svc.headers).json()["state"] == "validating":
        time.sleep(0.2)
    httpx.delete(url, headers=svc.headers).raise_for_status()
    return seconds, peak[0] - base


# --- GET at 50 concurrent clients ------------------------------------------------------------


async def _hammer(port: int, path: str, concurrency: int, seconds: float, key: str) -> dict[str, float]:
    """A minimal HTTP/1.1 keep-alive load generator (cheap enough to leave the server the CPU)."""
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n\r\n".encode()
    latencies: list[float] = []
    errors = 0
    stop_at = time.monotonic() + seconds

    async def client() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while time.monotonic() < stop_at:
            t = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"(?i)content-length: *(\d+)", head)
            await reader.readexactly(int(length.group(1)) if length else 0)
            latencies.append(time.perf_counter() - t)
            errors += not head.startswith(b"HTTP/1.1 200")
        writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    latencies.sort()
    return {
        "requests": len(latencies),
        "errors": errors,
        "rps": round(len(latencies) / elapsed, 1),
        "p50_ms": round(latencies[len(latencies) // 2] * 1000, 2),
        "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 2),
    }


def serve_bare(port: int, payload_file: str) -> None:
    """The baseline: a bare FastAPI endpoint under the same uvicorn, returning the same JSON."""
    import uvicorn
    from fastapi import FastAPI

    payload = json.loads(Path(payload_file).read_text()) if payload_file else {}
    app = FastAPI()

    @app.get("/v1/jobs/{job_id}")
    async def get_job(job_id: str) -> dict[str, Any]:
        return payload

    @app.post("/upload")
    async def receive_only(request: Request) -> dict[str, int]:
        """The server's own receive path: count the bytes, store nothing."""
        n = 0
        async for chunk in request.stream():
            n += len(chunk)
        return {"bytes": n}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


class BareServer:
    """The baseline server: same uvicorn, a bare FastAPI app (see `serve_bare`)."""

    def __init__(self, payload: Path | None = None) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve-bare", str(self.port), str(payload or "")],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{self.port}/v1/jobs/x", timeout=1)
                return
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait()


def bench_get(svc: Service, job_id: str, concurrency: int = 50, seconds: float = 8.0) -> dict[str, Any]:
    payload = svc.root / "job.json"
    payload.write_text(httpx.get(f"{svc.url}/v1/jobs/{job_id}", headers=svc.headers).text)
    with BareServer(payload) as bare:
        port = bare.port
        path = f"/v1/jobs/{job_id}"
        rounds: dict[str, list[dict[str, float]]] = {"service": [], "bare": []}
        for _ in range(2):  # alternate, so drifting machine load hits both alike
            asyncio.run(_hammer(svc.port, path, concurrency, 1.0, svc.key))  # warm-up
            rounds["service"].append(asyncio.run(_hammer(svc.port, path, concurrency, seconds, svc.key)))
            asyncio.run(_hammer(port, path, concurrency, 1.0, svc.key))
            rounds["bare"].append(asyncio.run(_hammer(port, path, concurrency, seconds, svc.key)))
    best = {k: max(v, key=lambda r: r["rps"]) for k, v in rounds.items()}
    return {
        "concurrency": concurrency,
        "seconds": seconds,
        "service": best["service"],
        "bare": best["bare"],
        "rounds": rounds,
        "rps_ratio": round(best["service"]["rps"] / best["bare"]["rps"], 3),
        "p99_ratio": round(best["service"]["p99_ms"] / best["bare"]["p99_ms"], 3),
    }


# --- a small job ---------------------------------------------------------------------------


def write_job_inputs(folder: Path) -> tuple[Path, Path]:
    import numpy as np
    import torch

    from worker.compression.io.teachers import save_zoo_model
    from worker.compression.students import zoo

    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 2000)
    x = rng.normal(size=(2000, 32)).astype(np.float32) + y[:, None].astype(np.float32) * 0.5
    torch.manual_seed(0)
    model = zoo.build(TEACHER_CONFIG)  # trained a moment: a job checks its teacher against the labels first
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(100):
        loss = torch.nn.functional.cross_entropy(model(x=torch.from_numpy(x)), torch.from_numpy(y))
        opt.zero_grad()
        loss.backward()
        opt.step()
    src = save_zoo_model(model.eval(), TEACHER_CONFIG, folder / "teacher")
    teacher = folder / "teacher.zip"
    with zipfile.ZipFile(teacher, "w") as zf:
        for f in sorted(src.iterdir()):
            zf.write(f, f.name)
    data = folder / "data.npz"
    np.savez(data, x=x, y=y.astype(np.int64))
    return teacher, data


def run_service_job(client: httpx.Client, ids: dict[str, str]) -> tuple[float, dict[str, Any], float]:
    """Submit and follow the job's event stream to its end (as `kdq compress` does): (client wall
    time, the job, the engine's own time in the worker)."""
    t0 = time.perf_counter()
    r = client.post("/v1/jobs", json={**JOB_SPEC, **ids})
    r.raise_for_status()
    job_id = r.json()["id"]
    engine_s = None
    for _, data in KdqClient(http=client, log=io.StringIO()).events(job_id):
        engine_s = data.get("engine_s", engine_s)
    wall = time.perf_counter() - t0
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["state"] == "SUCCEEDED" and engine_s is not None, job
    return wall, job, engine_s


def bench_job(svc: Service, repeats: int = 9) -> tuple[dict[str, Any], str]:
    from datetime import datetime

    from worker.compression.compress import compress
    from worker.compression.spec import CompressSpec

    teacher, data = write_job_inputs(svc.root)
    spec = CompressSpec.model_validate(JOB_SPEC)

    def direct() -> float:
        out = Path(tempfile.mkdtemp(dir=svc.root))
        t0 = time.perf_counter()
        compress(spec, teacher_path=teacher, dataset_path=data, output_dir=out)
        wall = time.perf_counter() - t0
        shutil.rmtree(out)
        return wall

    with httpx.Client(base_url=svc.url, timeout=60, headers=svc.headers) as client:
        uploads = KdqClient(http=client, log=io.StringIO())
        ids = {
            "teacher_model_id": uploads.upload(teacher, kind="model").id,
            "dataset_id": uploads.upload(data, kind="dataset").id,
        }
        direct()  # warm: imports and first-call costs, as the worker is after its first job
        run_service_job(client, ids)
        direct_s, service_s, overhead_s, waits, last = [], [], [], [], ""
        for _ in range(repeats):  # alternate, so drifting machine load hits both alike
            direct_s.append(direct())
            wall, job, engine_s = run_service_job(client, ids)
            service_s.append(wall)
            overhead_s.append(wall - engine_s)
            created, started = (datetime.fromisoformat(job[k]) for k in ("created_at", "started_at"))
            waits.append((started - created).total_seconds())
            last = job["id"]
    d, s, o = (statistics.median(x) for x in (direct_s, service_s, overhead_s))
    return {
        "repeats": repeats,
        "direct_s": [round(x, 3) for x in direct_s],
        "service_s": [round(x, 3) for x in service_s],
        "direct_median_s": round(d, 3),
        "service_median_s": round(s, 3),
        "service_over_direct": round(s / d, 3),
        "service_overhead_s": [round(x, 3) for x in overhead_s],
        "service_overhead_median_s": round(o, 3),
        "service_over_direct_from_overhead": round((d + o) / d, 3),
        "queued_to_running_s": [round(w, 3) for w in waits],
        "queued_to_running_median_s": round(statistics.median(waits), 3),
    }, last


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="upload,get,job")
    parser.add_argument("--stack", choices=["embedded", "postgres"], default="embedded")
    parser.add_argument("--upload-mib", type=int, default=1024)
    parser.add_argument("--serve-bare", nargs=2, metavar=("PORT", "PAYLOAD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_bare:
        serve_bare(int(args.serve_bare[0]), args.serve_bare[1])
        return 0
    cases = args.cases.split(",")
    results: dict[str, Any] = {"stack": args.stack, "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="kdq-bench-") as tmp:
        svc = Service(args.stack, Path(tmp))
        try:
            job_id = None
            if "job" in cases:
                results["job"], job_id = bench_job(svc)
                print("job", json.dumps(results["job"]), flush=True)
            if "upload" in cases:
                results["upload"] = bench_upload(svc, args.upload_mib)
                print("upload", json.dumps(results["upload"]), flush=True)
            if "get" in cases:
                if job_id is None:
                    _, job_id = bench_job(svc, repeats=1)
                results["get"] = bench_get(svc, job_id)
                print(
                    "get", json.dumps({k: v for k, v in results["get"].items() if k != "rounds"}), flush=True
                )
        finally:
            svc.stop()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"service-{args.stack}.json").write_text(json.dumps(results, indent=2))
    checks = []
    if "upload" in results:
        checks += [
            ("upload throughput / cp ≥ 0.5", results["upload"]["throughput_ratio_vs_cp"] >= 0.5),
            ("API RSS growth ≤ 64 MiB", results["upload"]["api_rss_growth_MiB"] <= 64),
        ]
    if "get" in results:
        checks += [("GET req/s / bare ≥ 0.5", results["get"]["rps_ratio"] >= 0.5)]
    if "job" in results:
        checks += [
            ("service job ≤ 1.10× direct (medians)", results["job"]["service_over_direct"] <= 1.10),
            (
                "service job ≤ 1.10× direct (median direct + measured service overhead)",
                results["job"]["service_over_direct_from_overhead"] <= 1.10,
            ),
            ("queued → running median ≤ 1 s", results["job"]["queued_to_running_median_s"] <= 1.0),
        ]
    for name, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
