"""Jobs per hour with 1, 2 and 3 worker hosts, with the blob store on S3 and on a shared local
directory, on this machine: each host a network namespace with one worker process
(`tests.scale.hosts`, needs root), PostgreSQL, Redis and S3 (moto) on the service address.

    python bench/scale.py [--jobs 12] [--hosts 1,2,3] [--stores s3,local]

For each configuration it submits ``--jobs`` small jobs at once and measures the wall time from the
first submission to the last job's end; per job it reads the queue wait, the engine's time and the
rest of the attempt (fetching inputs, storing results, the database) from the job's rows. Prints
a table and the ratios (2 and 3 hosts over 1; S3 over local), writes ``bench/out/scale.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.scale.hosts import Hosts, Services  # noqa: E402
from tests.scale.s3 import new_bucket, s3_env  # noqa: E402
from tests.service.assets import FAST_SPEC, write_assets  # noqa: E402
from tests.service.conftest import REPO, base_env, free_port, kdq, wait_ready  # noqa: E402
from tests.service.flows import ready_upload  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
ENGINE = "the engine finished in "


def measure(url: str, db: str, body: dict[str, Any], jobs: int) -> dict[str, Any]:
    with httpx.Client(base_url=url, timeout=60) as c:
        started = time.monotonic()
        ids = []
        for _ in range(jobs):
            r = c.post("/v1/jobs", json=body)
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
    with psycopg.connect(db, autocommit=True) as conn:
        while True:
            (left,) = conn.execute("SELECT count(*) FROM jobs WHERE id = ANY(%s) AND state NOT IN "
                                   "('SUCCEEDED', 'FAILED', 'CANCELLED')", (ids,)).fetchone()  # fmt: skip
            if left == 0:
                break
            time.sleep(0.2)
        wall = time.monotonic() - started
        rows = conn.execute("SELECT id, state, extract(epoch FROM started_at - created_at), run_seconds "
                            "FROM jobs WHERE id = ANY(%s)", (ids,)).fetchall()  # fmt: skip
        engine = dict(conn.execute("SELECT job_id, data->>'engine_s' FROM job_events WHERE job_id = ANY(%s) "
                                   "AND kind = 'log' AND data ? 'engine_s'", (ids,)).fetchall())  # fmt: skip
    ok = [r for r in rows if r[1] == "SUCCEEDED"]
    engine_s = [float(engine[r[0]]) for r in ok if engine.get(r[0])]
    run_s = [float(r[3]) for r in ok if r[3] is not None]
    return {
        "jobs": jobs, "succeeded": len(ok), "wall_s": round(wall, 2), "jobs_per_hour": round(len(ok) * 3600 / wall),
        "queue_wait_s": round(statistics.mean(float(r[2]) for r in ok), 2),
        "run_s": round(statistics.mean(run_s), 3),
        "engine_s": round(statistics.mean(engine_s), 3),
        "outside_engine_s": round(statistics.mean(run_s) - statistics.mean(engine_s), 3),
    }  # fmt: skip


def bench_store(store: str, host_counts: list[int], jobs: int, root: Path) -> list[dict[str, Any]]:
    hosts = Hosts(root / store)
    for _ in range(max(host_counts)):
        hosts.add()
    services = Services.start(hosts.service_ip, root / store / "services")
    api = None
    out = []
    try:
        env = base_env(**services.env(), KDQ_AUTH="none", KDQ_MAX_RUNNING_JOBS_PER_TEAM="1000",
                       KDQ_MAX_SUBMISSIONS_PER_MINUTE="100000", KDQ_PROGRESS_INTERVAL_S="0.5")  # fmt: skip
        if store == "s3":
            env.update(s3_env(services.s3.endpoint, new_bucket(services.s3.endpoint)))
        else:
            env["KDQ_STORAGE_DIR"] = str(root / store / "shared-store")
        env["KDQ_DATA_DIR"] = str(root / store / "api")
        subprocess.run(kdq("migrate"), cwd=REPO, env=env, check=True, capture_output=True)
        port = free_port()
        api = subprocess.Popen(kdq("api", "--host", "127.0.0.1", "--port", str(port)), cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, {"api": api}, lambda: "")
        hosts.spawn(hosts.hosts[0], "validate", kdq("worker", "--queues", "validate", "--name", "validate"), env)
        assets = write_assets(root / store / "assets")
        with httpx.Client(base_url=url, timeout=60) as c:
            body = {**FAST_SPEC,
                    "teacher_model_id": ready_upload(c, "models", assets["teacher"], format="zoo_zip")["id"],
                    "dataset_id": ready_upload(c, "datasets", assets["data"], format="npz")["id"]}  # fmt: skip
        db = f"postgresql://postgres@127.0.0.1:{services.pg.port}/kdq"
        for n in host_counts:
            started = [hosts.start_worker(h, env) for h in hosts.hosts[:n]]
            hosts.wait_workers_of(hosts.hosts[:n])
            measure(url, db, body, n)  # each new worker's first job warms it
            row = {"store": store, "hosts": n, **measure(url, db, body, jobs)}
            print(f"{store:<6} {n} host(s): {row['jobs_per_hour']:>6} jobs/h  wall {row['wall_s']:>6.1f} s  "
                  f"wait {row['queue_wait_s']:>5.1f} s  run {row['run_s']:.2f} s = engine {row['engine_s']:.2f} "
                  f"+ {row['outside_engine_s']:.2f}", flush=True)
            out.append(row)
            hosts.stop_workers_of(hosts.hosts[:n], started)
    finally:
        hosts.close()
        if api is not None:
            api.terminate()
            api.wait(20)
        services.close()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=12)
    parser.add_argument("--hosts", default="1,2,3")
    parser.add_argument("--stores", default="s3,local")
    args = parser.parse_args()
    counts = [int(n) for n in args.hosts.split(",")]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="kdq-scale-") as tmp:
        for store in args.stores.split(","):
            rows += bench_store(store, counts, args.jobs, Path(tmp))
    by = {(r["store"], r["hosts"]): r["jobs_per_hour"] for r in rows}
    ratios: dict[str, float] = {}
    for store in args.stores.split(","):
        for n in counts[1:]:
            if (store, counts[0]) in by:
                ratios[f"{store} {n} hosts / {counts[0]}"] = round(by[(store, n)] / by[(store, counts[0])], 2)
    for n in counts:
        if ("s3", n) in by and ("local", n) in by:
            ratios[f"s3 / local, {n} host(s)"] = round(by[("s3", n)] / by[("local", n)], 2)
    print("\nratios (jobs per hour):")
    for k, v in ratios.items():
        print(f"  {k}: {v:.2f}")
    OUT.mkdir(exist_ok=True)
    (OUT / "scale.json").write_text(json.dumps({"rows": rows, "ratios": ratios}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
