"""The web portal in a real browser (Playwright driving headless chromium) against the Postgres +
Redis stack: sign in, upload, submit from the form, watch the job finish, download an artifact and
check its sha256, cancel a second job, another team's job as not found, a failed job's reason,
compare, a narrow window. Screenshots of each page go to docs/screenshots/ (the README shows them)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from .assets import FAST_SPEC
from .conftest import Stack
from .flows import submit, wait_job
from .portal_helpers import CHROMIUM, browser_page, shot, sign_in, upload

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is missing: .ci/run installs it")
SLOW_SPEC = {**FAST_SPEC, "distillation": {**FAST_SPEC["distillation"], "epochs": 3000, "batch_size": 8}}


def test_portal_end_to_end(pg_stack: Stack, assets: dict[str, Path], tmp_path: Path) -> None:
    from playwright.sync_api import expect

    with browser_page() as page:
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(pg_stack.url + "/")
        page.wait_for_selector("#key")
        shot(page, "signin")
        sign_in(page, pg_stack.url, pg_stack.key or "")
        assert "team-a" in page.inner_text("#who")

        # uploads, with their validation result
        page.click("nav >> text=Uploads")
        teacher = upload(page, "m", assets["teacher"], "zoo_zip", "portal-teacher")
        dataset = upload(page, "d", assets["data"], "npz", "portal-data")
        assert teacher.startswith("mdl_") and dataset.startswith("ds_")
        assert page.is_visible("#m-status [data-state=ready]") and page.is_visible("#d-status [data-state=ready]")
        shot(page, "uploads")
        page.set_input_files("#m-file", str(assets["truncated"]))  # a broken teacher: the exact reason shows
        page.select_option("#m-format", "zoo_zip")
        page.click("form:has(#m-file) button[type=submit]")
        page.wait_for_selector("#m-status [role=alert]", timeout=90_000)
        assert "zip" in page.inner_text("#m-status").lower(), page.inner_text("#m-status")

        # the form from the published schema: every control labelled; basic fields, then as JSON
        page.click("nav >> text=New job")
        page.wait_for_selector("#f-distillation-epochs")
        unlabelled = page.evaluate("""[...document.querySelectorAll('main input, main select, main textarea')]
            .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')).map(e => e.id || e.name)""")
        assert unlabelled == []
        page.select_option("#f-teacher", teacher)
        page.select_option("#f-dataset", dataset)
        page.fill("#job-name", "portal-run")
        page.fill("#job-tags", "portal, e2e")
        page.fill("#f-distillation-epochs", "2")
        shot(page, "new-job")
        page.click("text=Paste JSON")
        body = json.loads(page.input_value("#job-json"))
        assert body["distillation"]["epochs"] == 2 and body["teacher_model_id"] == teacher and body["tags"] == ["portal", "e2e"]
        body.update({k: {**body.get(k, {}), **FAST_SPEC[k]} for k in FAST_SPEC})
        assert "quantization" not in json.loads(page.input_value("#job-json"))  # untouched sections stay out
        page.fill("#job-json", json.dumps(body))
        page.click("#submit-job")

        # the live job page until it finishes; the results; a download checked against its sha256
        page.wait_for_selector("#job-state, form .problem")
        assert "/#/jobs/job_" in page.url, page.inner_text("form .problem") + json.dumps(body)
        job_id = page.url.rsplit("/", 1)[-1]
        page.wait_for_selector("#job-state .SUCCEEDED", timeout=180_000)
        page.wait_for_selector("#artifacts tbody tr")
        assert page.is_visible("#metrics") and page.inner_text("#job-log")
        shot(page, "job-succeeded")
        with pg_stack.client() as api:
            listed = {a["name"]: a["sha256"] for a in api.get(f"/v1/jobs/{job_id}/artifacts").json()["items"]}
            assert api.get(f"/v1/jobs/{job_id}").json()["tags"] == ["portal", "e2e"]
        with page.expect_download() as info:
            page.click("button[data-artifact='model_int8.onnx']")
        saved = tmp_path / "model_int8.onnx"
        info.value.save_as(saved)
        assert hashlib.sha256(saved.read_bytes()).hexdigest() == listed["model_int8.onnx"]

        # a second job, cancelled from its page
        with pg_stack.client() as api:
            slow = submit(api, {**SLOW_SPEC, "teacher_model_id": teacher, "dataset_id": dataset, "name": "portal-slow"})
            assert slow.status_code == 202, slow.text
            slow_id = slow.json()["id"]
            wait_job(api, slow_id, {"RUNNING"}, timeout=60)
        page.goto(f"{pg_stack.url}/#/jobs/{slow_id}")
        page.wait_for_selector("#job-progress-text:not(:has-text('waiting'))", timeout=60_000)
        page.click("#cancel")
        page.wait_for_selector("#job-problem", timeout=60_000)
        assert "Cancelled" in page.inner_text("#job-problem")

        # a failed job says why, in words
        with pg_stack.client() as api:
            gpu = {**FAST_SPEC, "distillation": {**FAST_SPEC["distillation"], "device": "cuda"}}
            failed = submit(api, {**gpu, "teacher_model_id": teacher, "dataset_id": dataset, "name": "portal-gpu"}).json()["id"]
        page.goto(f"{pg_stack.url}/#/jobs/{failed}")
        page.wait_for_selector("#job-problem", timeout=120_000)
        assert "GPU" in page.inner_text("#job-problem")
        shot(page, "job-failed")

        # targets mode: the search's fields instead of the student's; re-run prefills the form
        page.goto(f"{pg_stack.url}/#/new?from={job_id}")
        page.wait_for_selector("#f-distillation-epochs")
        assert page.input_value("#f-distillation-epochs") == "2" and page.input_value("#f-teacher") == teacher
        page.check("#mode-targets")
        page.fill("#f-targets-max_drop", "0.05")
        page.click("text=Paste JSON")
        searched = json.loads(page.input_value("#job-json"))
        assert searched["targets"]["max_drop"] == 0.05 and "student" not in searched, searched

        # the list with filters, compare two jobs
        page.goto(f"{pg_stack.url}/#/jobs")
        page.wait_for_selector("main tbody tr")
        page.fill("#flt-name", "portal-")
        page.select_option("#flt-state", "SUCCEEDED")
        page.click("form[role=search] button[type=submit]")
        expect(page.locator("main tbody tr")).to_have_count(1)
        assert page.is_visible(f"#pick-{job_id}")
        page.select_option("#flt-state", "")
        page.click("form[role=search] button[type=submit]")
        expect(page.locator("main tbody tr")).to_have_count(3)
        shot(page, "jobs")
        page.check(f"#pick-{job_id}")
        page.check(f"#pick-{slow_id}")
        page.click("text=Compare selected")
        page.wait_for_selector("#compare")
        assert "portal-run" in page.inner_text("#compare")
        shot(page, "compare")

        # readable on a narrow window: nothing wider than the viewport
        page.set_viewport_size({"width": 400, "height": 900})
        page.goto(f"{pg_stack.url}/#/jobs/{job_id}")
        page.wait_for_selector("#artifacts")
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
        shot(page, "job-narrow")
        page.set_viewport_size({"width": 1280, "height": 900})

        # another team's job is not found
        other = pg_stack.make_key("team-portal-b")
        page.click("#who button")
        sign_in(page, pg_stack.url, other)
        page.goto(f"{pg_stack.url}/#/jobs/{job_id}")
        page.wait_for_selector(".problem")
        assert "does not exist" in page.inner_text(".problem")

        # an admin key sees every team's jobs, each labelled with its team
        admin = pg_stack.make_key("team-portal-ops", admin=True)
        page.click("#who button")
        sign_in(page, pg_stack.url, admin)
        assert "admin" in page.inner_text("#who")
        page.goto(f"{pg_stack.url}/#/jobs?name=portal-run")
        page.wait_for_selector(f"#pick-{job_id}")
        assert "team-a" in page.inner_text("main tbody .team")
        assert errors == [], errors


def test_portal_assets_ship_in_the_package_and_refuse_other_files(pg_stack: Stack) -> None:
    import httpx

    index = httpx.get(pg_stack.url + "/")
    assert index.status_code == 200 and "script-src 'self'" in index.headers["content-security-policy"]
    for src in ("/portal/app.js", "/portal/style.css"):
        assert httpx.get(pg_stack.url + src).status_code == 200
    missing: Any = httpx.get(pg_stack.url + "/portal/../../settings.py")
    assert missing.status_code == 404


def test_a_forecasting_series_is_uploaded_with_the_data_options_of_the_form(pg_stack: Stack, tmp_path: Path) -> None:
    """The dataset form's folded options come from the published DataSpec: a series CSV becomes a
    forecasting dataset with its time column, targets, window and horizon, as over the API."""
    from bench.field_cases import sine_series

    csv = tmp_path / "series.csv"
    sine_series(400).to_csv(csv, index=False)
    with browser_page() as page:
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        sign_in(page, pg_stack.url, pg_stack.key or "")
        page.click("nav >> text=Uploads")
        page.wait_for_selector("#d-options")
        page.click("#d-options summary")
        unlabelled = page.evaluate("""[...document.querySelectorAll('#d-options input, #d-options select, #d-options textarea')]
            .filter(e => !(e.labels && e.labels.length)).map(e => e.id)""")
        assert unlabelled == []
        page.select_option("#f-data-task", "forecasting")
        page.fill("#f-data-time_column", "ts")
        page.fill("#f-data-target_columns", "load")
        page.fill("#f-data-feature_columns", "temp")
        page.fill("#f-data-window", "24")
        page.fill("#f-data-horizon", "6")
        shot(page, "upload-options")
        dataset = upload(page, "d", csv, "csv", "portal-series")
        assert page.is_visible("#d-status [data-state=ready]"), page.inner_text("#d-status")
        with pg_stack.client() as api:
            body = api.get(f"/v1/datasets/{dataset}").json()
        assert body["summary"]["field"] == "forecasting" and body["summary"]["inputs"]["x"] == [2, 24]
        assert body["summary"]["target_shape"] == [6] and body["summary"]["samples"] == 400 - 30 + 1
        assert errors == [], errors
