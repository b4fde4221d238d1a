"""Abuse run: a hostile team's costly uploads and specs against a bystander team's normal work, on
one real stack, timed against the same normal work on the idle stack.

The stack (tests/faults/stack.py): a private PostgreSQL and Redis, ``kdq api``, one validation
worker and ``--workers`` job workers (``kdq worker`` subprocesses, default limits: a validation
child gets 3 GiB, a job child 8 GiB).

  idle    team B uploads a teacher and a dataset, then submits ``--jobs`` small jobs at once;
          time from upload to ready and from submission to SUCCEEDED
  abuse   the same, while team A sends the hostile-cost corpus (tests/malicious/costly.py):
          expanding ONNX graphs (Tile, Expand, ConstantOfShape, Range, Resize), Hugging Face
          configs describing giants, a 400 M-row Parquet, fourteen 7000×7000 PNGs, a JSON Lines
          file of a million distinct keys; and job specs that could only exhaust a worker

Prints per item the outcome and the seconds to it, B's latencies in both runs with their ratio
(target ≤ 1.5×), and the peak RSS of each process (the API, each worker with its children,
PostgreSQL, Redis). Writes bench/out/abuse.json.

Usage: python bench/abuse.py [--jobs 20] [--workers 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.faults.stack import FaultStack  # noqa: E402
from tests.malicious import costly  # noqa: E402
from tests.service.assets import FAST_SPEC, write_assets  # noqa: E402
from tests.service.conftest import kdq  # noqa: E402

OUT = REPO / "bench" / "out" / "abuse.json"
LIMITS = {"KDQ_AUTH": "keys", "KDQ_MAX_RUNNING_JOBS_PER_TEAM": "100", "KDQ_MAX_UPLOAD_BYTES": str(64 << 20)}
COSTLY_SPECS: dict[str, dict[str, Any]] = {
    "zoo student hidden [30000, 30000]": {"student": {"kind": "zoo", "architecture": {"architecture": "mlp",
                                                                                      "hidden": [30000, 30000]}}},
    "latency_batch_sizes [50000000]": {"evaluation": {"latency_batch_sizes": [50_000_000]}},
    "latency_batch_sizes []": {"evaluation": {"latency_batch_sizes": []}},
    "20,000 latency batch sizes": {"evaluation": {"latency_batch_sizes": [1] * 20_000}},
    "hf_config vocab_size 40M": {"student": {"kind": "hf_config", "hf_config": {"vocab_size": 40_000_000}}},
    "max_params 1e15": {"student": {"kind": "auto", "max_params": 10**15}},
    "block_size 1e12": {"quantization": {"method": "int4", "block_size": 10**12}},
    "seed 2**80": {"distillation": {"seed": 2**80}},
    "augment_noise 1e308": {"distillation": {"augment_noise": 1e308}},
}  # fmt: skip
RAW_BODIES = {"lr Infinity": '"distillation": {"lr": Infinity}', "name with a lone surrogate": '"name": "\\ud800"'}


def key_for(stack: FaultStack, team: str) -> str:
    out = subprocess.run(kdq("keys", "create", "--team", team), cwd=REPO, env=stack.env, capture_output=True,
                         text=True, check=True)  # fmt: skip
    return out.stdout.strip()


def client(stack: FaultStack, key: str) -> httpx.Client:
    return httpx.Client(base_url=stack.url, timeout=60, headers={"Authorization": f"Bearer {key}"})


def upload(c: httpx.Client, kind: str, path: Path, **fields: str) -> str:
    with open(path, "rb") as f:
        r = c.post(f"/v1/{kind}", files={"file": (path.name, f)}, data=fields)
    r.raise_for_status()
    return r.json()["id"]


def settle(c: httpx.Client, kind: str, ident: str, timeout: float = 600) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = c.get(f"/v1/{kind}/{ident}").json()
        if body["state"] != "validating":
            return body
        time.sleep(0.1)
    raise TimeoutError(f"{kind} {ident} still validating")


def bystander(stack: FaultStack, key: str, assets: dict[str, Path], jobs: int) -> dict[str, Any]:
    """Team B's normal work: two uploads, then ``jobs`` small jobs at once; its latencies."""
    with client(stack, key) as b:
        t0 = time.monotonic()
        teacher = upload(b, "models", assets["teacher"], format="zoo_zip")
        data = upload(b, "datasets", assets["data"], format="npz")
        ready = [settle(b, "models", teacher), settle(b, "datasets", data)]
        ready_s = time.monotonic() - t0
        assert all(u["state"] == "ready" for u in ready), ready
        sent = {}
        for _ in range(jobs):
            r = b.post("/v1/jobs", json={**FAST_SPEC, "teacher_model_id": teacher, "dataset_id": data})
            r.raise_for_status()
            sent[r.json()["id"]] = time.monotonic()
        took, states = [], []
        pending = dict(sent)
        while pending:
            for job_id in list(pending):
                job = b.get(f"/v1/jobs/{job_id}").json()
                if job["state"] in ("SUCCEEDED", "FAILED", "CANCELLED"):
                    took.append(time.monotonic() - pending.pop(job_id))
                    states.append(job["state"])
            time.sleep(0.2)
    return {"ready_s": ready_s, "job_s": took, "states": states}


def hostile(stack: FaultStack, key: str, folder: Path, assets: dict[str, Path]) -> list[dict[str, Any]]:
    """Team A's corpus: each item's outcome and the seconds from sending it to that outcome (its
    job specs name a real teacher and dataset of its own, so the cost checks that need them run)."""
    items = [(name, "models", write(folder / f"{name}.onnx"), {"format": "onnx"})
             for name, write in costly.ONNX_BOMBS.items()]  # fmt: skip
    items += [(name, "models", costly.hf_zip(folder / f"{name}.zip", **cfg), {"format": "hf_zip"})
              for name, cfg in costly.HF_BLOWUPS.items()]  # fmt: skip
    items += [("parquet 400M rows", "datasets", costly.parquet_rows(folder / "rows.parquet"), {"format": "parquet"}),
              ("14 PNGs of 7000x7000", "datasets", costly.png_zip(folder / "big.zip"), {"format": "image_zip"}),
              ("jsonl 1000x1000 keys", "datasets", costly.jsonl_keys(folder / "keys.jsonl"), {"format": "jsonl"})]  # fmt: skip
    rows: list[dict[str, Any]] = []
    with client(stack, key) as a:
        own = {"teacher_model_id": upload(a, "models", assets["teacher"], format="zoo_zip"),
               "dataset_id": upload(a, "datasets", assets["data"], format="npz")}  # fmt: skip
        started = {}
        for name, kind, path, fields in items:
            started[name] = (kind, upload(a, kind, path, **fields), time.monotonic(), path.stat().st_size)
        for kind, ident in (("models", own["teacher_model_id"]), ("datasets", own["dataset_id"])):
            settle(a, kind, ident)
        for label, changes in COSTLY_SPECS.items():
            t0 = time.monotonic()
            r = a.post("/v1/jobs", json={**FAST_SPEC, **changes, **own})
            rows.append({"item": f"spec: {label}", "bytes": len(r.request.content), "outcome": f"{r.status_code}",
                         "code": r.json().get("code"), "seconds": time.monotonic() - t0})  # fmt: skip
        for label, raw in RAW_BODIES.items():
            t0 = time.monotonic()
            r = a.post("/v1/jobs", content=json.dumps(own)[:-1] + ", " + raw + "}",
                       headers={"content-type": "application/json"})  # fmt: skip
            rows.append({"item": f"body: {label}", "bytes": len(r.request.content), "outcome": f"{r.status_code}",
                         "code": r.json().get("code"), "seconds": time.monotonic() - t0})  # fmt: skip
        for name, (kind, ident, t0, size) in started.items():
            body = settle(a, kind, ident)
            rows.append({"item": f"upload: {name}", "bytes": size, "outcome": body["state"],
                         "code": (body.get("error") or {}).get("code"), "seconds": time.monotonic() - t0,
                         "detail": (body.get("error") or {}).get("detail", "")[:160]})  # fmt: skip
    return rows


class PeakRss:
    """Samples the RSS of each named process tree every 0.2 s; keeps the peaks."""

    def __init__(self, roots: dict[str, int]) -> None:
        self.roots, self.peaks = roots, dict.fromkeys(roots, 0)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            for name, pid in self.roots.items():
                try:
                    proc = psutil.Process(pid)
                    tree = [proc, *proc.children(recursive=True)]
                    self.peaks[name] = max(self.peaks[name], max(p.memory_info().rss for p in tree))
                except psutil.Error:
                    continue
            self.stop.wait(0.2)

    def __enter__(self) -> PeakRss:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=20)
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="kdq-abuse-") as tmp:
        root = Path(tmp)
        assets = write_assets(root / "assets")
        (root / "corpus").mkdir()
        stack = FaultStack.start(root / "stack", **LIMITS)
        try:
            for _ in range(args.workers):
                stack.new_worker()
            bystander(stack, key_for(stack, "warm-up"), assets, 1)  # (pool processes started, engine imported)
            idle = bystander(stack, key_for(stack, "bystander-idle"), assets, args.jobs)
            roots = {name: p.pid for name, p in stack.procs.items()}
            roots |= {"postgres": _pid_on_port(stack.pg.port), "redis": _pid_on_port(stack.redis.port)}
            with PeakRss({k: v for k, v in roots.items() if v}) as rss:
                results: dict[str, Any] = {}
                hostile_key, busy_key = key_for(stack, "hostile"), key_for(stack, "bystander")
                attack = threading.Thread(target=lambda: results.update(rows=hostile(stack, hostile_key,
                                                                                     root / "corpus", assets)))  # fmt: skip
                attack.start()
                time.sleep(1.0)  # the corpus is being sent when B starts
                busy = bystander(stack, busy_key, assets, args.jobs)
                attack.join()
            alive = {name: p.poll() is None for name, p in stack.procs.items()}
        finally:
            stack.close()
    report = {"idle": idle, "abuse": busy, "corpus": results["rows"], "peak_rss_mib": {
        k: round(v / 2**20) for k, v in rss.peaks.items()}, "processes_alive": alive}  # fmt: skip
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(report, indent=1))
    print_report(report)
    ratio_ok = _ratio(report, "ready_s") <= 1.5 and _ratio(report, "job_p50") <= 1.5
    return 0 if ratio_ok and all(alive.values()) else 1


def _pid_on_port(port: int) -> int | None:
    for conn in psutil.net_connections("tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            return conn.pid
    return None


def _ratio(report: dict[str, Any], what: str) -> float:
    def value(run: dict[str, Any]) -> float:
        return run["ready_s"] if what == "ready_s" else statistics.median(run["job_s"])

    return value(report["abuse"]) / max(1e-9, value(report["idle"]))


def print_report(report: dict[str, Any]) -> None:
    print(f"{'item':<42} {'bytes':>10} {'outcome':<8} {'code':<18} {'seconds':>8}")
    for row in report["corpus"]:
        print(f"{row['item']:<42} {row['bytes']:>10,} {row['outcome']:<8} {row['code'] or '':<18} {row['seconds']:>8.2f}")
    print()
    idle, busy = report["idle"], report["abuse"]
    print(f"{'team B':<34} {'idle':>8} {'abuse':>8} {'ratio':>6}")
    print(f"{'uploads ready (s)':<34} {idle['ready_s']:>8.2f} {busy['ready_s']:>8.2f} {_ratio(report, 'ready_s'):>6.2f}")
    for label, fn in (("jobs submit→done p50 (s)", statistics.median), ("jobs submit→done max (s)", max)):
        a, b = fn(idle["job_s"]), fn(busy["job_s"])
        print(f"{label:<34} {a:>8.2f} {b:>8.2f} {b / a:>6.2f}")
    print(f"{'jobs succeeded':<34} {idle['states'].count('SUCCEEDED'):>8} {busy['states'].count('SUCCEEDED'):>8}")
    print()
    print("peak RSS (MiB): " + ", ".join(f"{k} {v}" for k, v in report["peak_rss_mib"].items()))
    print("processes alive at the end: " + ", ".join(f"{k} {'yes' if v else 'NO'}"
                                                    for k, v in report["processes_alive"].items()))  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
