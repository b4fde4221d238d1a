"""Playwright on Debian's chromium for the portal's tests and bench/portal.py (no browser download)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHROMIUM = os.environ.get("KDQ_CHROMIUM", "/usr/bin/chromium")
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip
SCREENSHOTS = Path(os.environ.get("KDQ_SCREENSHOTS", Path(tempfile.gettempdir()) / "kdq-screenshots"))
"""Where the browser tests save each page (a test run leaves the tracked files alone; refresh the
README's pictures with ``KDQ_SCREENSHOTS=docs/screenshots python -m pytest tests/service/test_portal.py``)."""


@contextmanager
def browser_page(width: int = 1280, height: int = 900) -> Iterator[Any]:
    """A page in a fresh headless chromium (downloads accepted)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS, headless=True)
        try:
            context = browser.new_context(viewport={"width": width, "height": height}, accept_downloads=True)
            page = context.new_page()
            yield page
        finally:
            browser.close()


def sign_in(page: Any, url: str, key: str) -> None:
    """With the keyboard only: the key field has the focus, Enter submits."""
    page.goto(url + "/#/signin")
    page.wait_for_selector("#key:focus")
    page.keyboard.type(key)
    page.keyboard.press("Enter")
    page.wait_for_selector("#who strong")


def shot(page: Any, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def upload(page: Any, prefix: str, path: Path, fmt: str, name: str) -> str:
    """Upload on the Uploads page; the upload's id once it is validated (ready)."""
    page.set_input_files(f"#{prefix}-file", str(path))
    page.select_option(f"#{prefix}-format", fmt)
    page.fill(f"#{prefix}-name", name)
    page.fill(f"#{prefix}-tags", "portal-test")
    page.click(f"#{prefix}-file ~ button, form:has(#{prefix}-file) button[type=submit]")
    page.wait_for_selector(f"#{prefix}-status [data-state]", timeout=90_000)
    return page.inner_text(f"#{prefix}-status .mono")
