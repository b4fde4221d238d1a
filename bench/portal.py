"""The portal in a real browser (headless Chromium via Playwright): how long from opening it to a
finished small job, how many clicks that takes, and how late each live event is on the page.

* ``open → finished``: from loading ``/`` to the job page showing SUCCEEDED, with sign-in, both
  uploads (and their validation), the new-job form and the job itself; clicks counted in the page
  (every trusted click, plus keyboard submits).
* ``event latency``: for a second, longer job followed from its page, each event's delay from the
  worker's commit (its ``at``, stamped just before the commit, so this errs high) to the moment the
  page has drawn it, for events made after the page opened its stream (target: p50 ≤ 100 ms).

Usage: python bench/portal.py [--stack postgres|embedded] [--epochs 60]
Writes bench/out/portal.json and a screenshot bench/out/portal-job.png.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
_spec = importlib.util.spec_from_file_location("bench_service", REPO / "bench" / "service.py")
assert _spec is not None and _spec.loader is not None
bench_service = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_service)  # (bench/service.py starts the stack as subprocesses)
Service = bench_service.Service

from tests.service.assets import write_assets
from tests.service.portal_helpers import browser_page

OUT = REPO / "bench" / "out"
COUNT_CLICKS = "window.kdqClicks = 0; addEventListener('click', e => { if (e.isTrusted) window.kdqClicks++; }, true);"


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def run(stack: str, epochs: int) -> dict[str, object]:
    root = Path(tempfile.mkdtemp(prefix="kdq-bench-portal-"))
    assets = write_assets(root / "assets")
    svc = Service(stack, root)
    try:
        with browser_page() as page:
            page.add_init_script(COUNT_CLICKS)
            keys = 0
            t0 = time.perf_counter()
            page.goto(svc.url + "/")
            page.wait_for_selector("#key:focus")
            page.keyboard.type(svc.key)
            page.keyboard.press("Enter")
            keys += 1
            page.wait_for_selector("#who strong")
            page.click("nav >> text=Uploads")
            for prefix, path, fmt in (("m", assets["teacher"], "zoo_zip"), ("d", assets["data"], "npz")):
                with page.expect_file_chooser() as chooser:
                    page.click(f"#{prefix}-file")
                chooser.value.set_files(str(path))
                page.select_option(f"#{prefix}-format", fmt)  # (a choice in a list: one click, counted below)
                page.click(f"form:has(#{prefix}-file) button[type=submit]")
                page.wait_for_selector(f"#{prefix}-status [data-state=ready]", timeout=120_000)
            page.click("nav >> text=New job")
            page.wait_for_selector("#f-distillation-epochs")
            page.fill("#f-distillation-epochs", "2")  # (focus by click, counted)
            page.click("#f-distillation-epochs")
            page.click("#submit-job")
            page.wait_for_selector("#job-state .SUCCEEDED", timeout=300_000)
            finished_s = time.perf_counter() - t0
            clicks = page.evaluate("window.kdqClicks") + 2 + keys  # + the two format selects, + Enter
            page.screenshot(path=str(OUT / "portal-job.png"), full_page=True)

            # the latency of live events, on a longer job followed from its page
            page.goto(svc.url + "/#/new")
            page.wait_for_selector("#f-distillation-epochs")
            page.fill("#f-distillation-epochs", str(epochs))
            page.fill("#f-distillation-batch_size", "8")
            page.click("#submit-job")
            page.wait_for_url("**/#/jobs/job_*")
            opened = page.evaluate("Date.now()")
            page.wait_for_selector("#job-state .SUCCEEDED", timeout=600_000)
            lat = page.evaluate(f"window.kdqEvents.filter(e => e.at >= {opened}).map(e => e.shown - e.at)")
    finally:
        svc.stop()
    return {
        "stack": stack,
        "open_to_finished_s": round(finished_s, 2),
        "clicks": clicks,
        "events_measured": len(lat),
        "event_latency_ms": {"p50": round(pct(lat, 0.5), 1), "p95": round(pct(lat, 0.95), 1), "max": round(max(lat), 1)},
        "target_p50_ms": 100,
        "screenshot": str(OUT / "portal-job.png"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stack", choices=["postgres", "embedded"], default="postgres")
    parser.add_argument("--epochs", type=int, default=60)
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    result = run(args.stack, args.epochs)
    lat = result["event_latency_ms"]
    print(f"{'open → finished small job':<34} {result['open_to_finished_s']} s, {result['clicks']} clicks")
    print(f"{'event latency (commit → page)':<34} p50 {lat['p50']} ms  p95 {lat['p95']} ms  max {lat['max']} ms "  # type: ignore[index]
          f"over {result['events_measured']} events (target p50 ≤ 100 ms)")
    print(f"screenshot: {result['screenshot']}")
    (OUT / "portal.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
