"""`kdq serve` as a real process tree, to break: its PostgreSQL, Redis and workers found among its
children (psutil), signalled at will, its log read back."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.service.conftest import REPO, base_env, free_port, kdq

FAST = {
    "KDQ_HEARTBEAT_INTERVAL_S": "0.5",
    "KDQ_STALE_AFTER_S": "5",
    "KDQ_REAPER_INTERVAL_S": "0.5",
    "KDQ_RELAY_INTERVAL_S": "0.5",
    "KDQ_RELAY_GRACE_S": "2",
}
"""A stale heartbeat is noticed within seconds, a missing message re-sent within seconds."""


@dataclass
class Serve:
    data_dir: Path
    log: Path
    env: dict[str, str]
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    key: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *extra: str, auth: bool = False) -> None:
        argv = kdq(*extra, "serve", "--data-dir", str(self.data_dir), "--port", str(self.port),
                   *([] if auth else ["--no-auth"]))  # fmt: skip
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(argv, cwd=REPO, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)  # fmt: skip
        self.wait_ready()

    def wait_ready(self, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"kdq serve exited with {self.proc.returncode}\n{self.text()[-4000:]}")
            try:
                r = httpx.get(self.url + "/readyz", timeout=2)
                if r.status_code == 200 and r.json()["status"] == "ready":
                    return r.json()
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"kdq serve not ready after {timeout} s\n{self.text()[-4000:]}")

    def client(self, **kw: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        return httpx.Client(base_url=self.url, timeout=30, headers=headers, **kw)

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def children(self) -> dict[str, psutil.Process]:
        """The supervised children by name: postgres, redis, worker-validate, worker-jobs."""
        assert self.proc is not None
        found: dict[str, psutil.Process] = {}
        for child in psutil.Process(self.proc.pid).children():
            cmd = " ".join(child.cmdline())
            if "redis-server" in cmd:
                found["redis"] = child
            elif "-n validate@" in cmd:
                found["worker-validate"] = child
            elif "-n jobs@" in cmd:
                found["worker-jobs"] = child
            elif "postgres" in cmd and " -D " in cmd:
                found["postgres"] = child
        return found

    def pool_child(self, worker: str, timeout: float = 30) -> psutil.Process:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            kids = self.children()[worker].children()
            if kids:
                return kids[0]
            time.sleep(0.1)
        raise TimeoutError(f"{worker} has no pool child")

    def parts(self) -> dict[str, str]:
        r = httpx.get(self.url + "/readyz", timeout=5)
        return r.json().get("parts", {}) if r.status_code == 200 else {}

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> tuple[int, float]:
        """Signal kdq serve; its exit status and how long it took to exit."""
        assert self.proc is not None
        started = time.monotonic()
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            code = self.proc.wait()
        return code, time.monotonic() - started

    def lines(self) -> list[str]:
        return [line for line in self.text().splitlines() if line.strip()]

    def json_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines()]


def processes_of(data_dir: Path) -> list[psutil.Process]:
    """Every process whose command line names the data dir (what a stopped serve must not leave)."""
    out = []
    for p in psutil.process_iter(["cmdline", "environ"]):
        try:
            text = " ".join(p.info["cmdline"] or []) + " " + (p.info["environ"] or {}).get("KDQ_DATA_DIR", "")
        except (psutil.Error, TypeError):
            continue
        if str(data_dir) in text and p.pid != os.getpid():
            out.append(p)
    return out


@pytest.fixture
def serve_factory(tmp_path: Path) -> Iterator[Any]:
    made: list[Serve] = []

    def make(data_dir: Path | None = None, **env: str) -> Serve:
        data = data_dir or tmp_path / f"var{len(made)}"
        serve = Serve(data, tmp_path / f"serve{len(made)}.log", base_env(**FAST, **env))
        made.append(serve)
        return serve

    yield make
    for serve in made:
        if serve.proc is not None and serve.proc.poll() is None:
            serve.stop(timeout=20)
