"""Fault-injection run: the faults of tests/faults, one after another on one real stack, as a table.

The stack (tests/faults/stack.py): a private PostgreSQL and Redis, a 128 MiB tmpfs artifact
store, ``kdq api`` and ``kdq worker`` subprocesses with second-scale heartbeat, reaper and
relay intervals. The faults (tests/faults/scenarios.py):

  sigkill    SIGKILL the job worker mid-training; a new worker must finish the job on the retry,
             resuming from the last checkpoint, with the same artifacts
  sigstop    SIGSTOP the worker past stale_after_s, a second worker finishes, then SIGCONT the
             first: none of its writes may land
  redis      kill -9 Redis (no persistence) during a burst of 20 submissions, restart it: every
             job must complete (the outbox relay re-sends what Redis lost)
  postgres   stop PostgreSQL while a job trains and others wait, start it again: the API answers
             503 problems meanwhile, and every job completes
  disk_full  fill the artifact store's filesystem: the job ends FAILED (storage_full), nothing
             partial is kept, the API keeps serving

Columns: survived (every check of the case held), jobs submitted, completed (reached the state
they should: SUCCEEDED, or FAILED for the full disk), lost (never reached a terminal state; must
be 0). Needs root (tmpfs mount), the PostgreSQL server binaries and redis-server.

Usage: python bench/faults.py [--faults sigkill,sigstop,redis,postgres,disk_full]
Writes bench/out/faults.json; exits 1 unless every fault was survived with nothing lost.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.faults.scenarios import FAULTS, Outcome  # noqa: E402
from tests.faults.stack import FaultStack  # noqa: E402
from tests.service.assets import write_assets  # noqa: E402

OUT = REPO / "bench" / "out" / "faults.json"


def row(out: Outcome) -> dict[str, object]:
    return {
        "fault": out.fault,
        "injected": out.injected,
        "survived": out.survived,
        "submitted": out.submitted,
        "completed": out.completed,
        "lost": out.lost,
        "seconds": round(out.seconds, 1),
        "checks": out.checks,
        "facts": out.facts,
    }


def print_table(rows: list[dict[str, object]]) -> None:
    head = ("fault", "injected", "survived", "submitted", "completed", "lost", "s")
    cells = [
        (str(r["fault"]), str(r["injected"]), "yes" if r["survived"] else "NO", str(r["submitted"]),
         str(r["completed"]), str(r["lost"]), str(r["seconds"]))
        for r in rows
    ]  # fmt: skip
    total = (
        "total",
        f"{len(rows)} faults",
        f"{sum(bool(r['survived']) for r in rows)}/{len(rows)}",
        *(str(sum(int(str(r[k])) for r in rows)) for k in ("submitted", "completed", "lost")),
        str(round(sum(float(str(r["seconds"])) for r in rows), 1)),
    )
    widths = [max(len(c[i]) for c in [head, *cells, total]) for i in range(len(head))]
    line = "  ".join("-" * w for w in widths)
    for r in [head, None, *cells, None, total]:
        print(line if r is None else "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    for r in rows:
        failed = [name for name, ok in r["checks"].items() if not ok]  # type: ignore[union-attr]
        if failed or r.get("error"):
            print(f"\n{r['fault']}: failed checks {failed} {r.get('error', '')}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--faults", default=",".join(FAULTS), help=f"comma-separated, of {', '.join(FAULTS)}")
    args = parser.parse_args()
    names = [n.strip() for n in args.faults.split(",") if n.strip()]
    unknown = [n for n in names if n not in FAULTS]
    if unknown:
        parser.error(f"unknown faults {unknown}; choose from {list(FAULTS)}")

    root = Path(tempfile.mkdtemp(prefix="kdq-bench-faults-"))
    rows: list[dict[str, object]] = []
    started = time.monotonic()
    stack = FaultStack.start(root / "stack")
    try:
        uploads = stack.upload_inputs(write_assets(root / "assets"))
        for name in names:
            print(f"[{time.monotonic() - started:6.1f} s] {name} …", flush=True)
            t0 = time.monotonic()
            try:
                out = FAULTS[name](stack, uploads)
                rows.append(row(out))
            except Exception as exc:  # a fault the service did not survive still gets its row
                traceback.print_exc()
                rows.append({"fault": name, "injected": "(aborted)", "survived": False, "submitted": 0,
                             "completed": 0, "lost": 0, "seconds": round(time.monotonic() - t0, 1),
                             "checks": {}, "facts": {}, "error": f"{type(exc).__name__}: {exc}"})  # fmt: skip
                print(stack.log_tail(lines=20))
    finally:
        stack.close()
        shutil.rmtree(root, ignore_errors=True)

    print()
    print_table(rows)
    ok = all(r["survived"] for r in rows) and sum(int(str(r["lost"])) for r in rows) == 0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    summary = {"faults": rows, "all_survived": ok, "seconds": round(time.monotonic() - started, 1)}
    OUT.write_text(json.dumps(summary, indent=2, default=str))
    print(f"\nwrote {OUT.relative_to(REPO)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
