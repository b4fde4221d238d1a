"""Keeps the embedded stack's children running: start in order, restart what dies, stop in
reverse order.

A child that exits while the stack is up is restarted after a backoff (0.5 s, doubling to 30 s;
back to 0.5 s once a run lasted a minute), and whatever it left in its process group (a
Celery pool child whose parent was killed) is killed first. Nothing here stops the API: while
PostgreSQL is down it answers 503 with ``Retry-After``; while a worker is down, jobs wait in
the queue, and a job whose worker died is retried by the reaper.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger("kdq.serve")
FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0
STABLE_AFTER_S = 60.0
TICK_S = 0.2


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"signal {-code}"
    return f"status {code}"


@dataclass
class Child:
    name: str
    launch: Callable[[], subprocess.Popen[bytes]]
    ready: Callable[[], bool] | None = None
    """Whether a started child serves yet (None: once started)."""
    stop_signal: int = signal.SIGTERM
    stop_timeout_s: float = 5.0
    tier: int = 0
    """Stop order: the highest tier first, each tier's children together (workers before Redis
    before PostgreSQL, so a stopping worker can still hand its job back)."""
    proc: subprocess.Popen[bytes] | None = None
    state: str = "stopped"
    """``starting``, ``up``, ``restarting`` or ``stopped``."""
    restarts: int = 0
    last_exit: str | None = None
    started_at: float = 0.0
    backoff_s: float = FIRST_BACKOFF_S
    restart_at: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def status(self) -> str:
        if self.state == "up":
            return "ok" if not self.restarts else f"ok (restarted {self.restarts}×, last exit: {self.last_exit})"
        if self.state == "restarting":
            return f"restarting: exited with {self.last_exit} (restart {self.restarts + 1} in " \
                   f"{max(0.0, self.restart_at - time.monotonic()):.1f} s)"
        return self.state


class Supervisor:
    def __init__(self, children: list[Child]) -> None:
        self.children = children
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # --- start ---------------------------------------------------------------------------

    def start(self, child: Child, timeout: float = 60.0) -> None:
        """Start one child and wait until it is ready (before the next depends on it)."""
        self._launch(child)
        deadline = time.monotonic() + timeout
        while not self._is_ready(child):
            assert child.proc is not None
            if child.proc.poll() is not None:
                raise RuntimeError(f"{child.name} exited with {describe_exit(child.proc.returncode)} while starting")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{child.name} was not ready within {timeout:g} s")
            time.sleep(0.02)
        child.state = "up"

    def watch(self) -> None:
        """Restart children that die, in a background thread, until `stop`."""
        self._thread = threading.Thread(target=self._run, daemon=True, name="kdq-supervisor")
        self._thread.start()

    def status(self) -> dict[str, str]:
        return {c.name: c.status() for c in self.children}

    def _launch(self, child: Child) -> None:
        child.proc = child.launch()
        child.started_at = time.monotonic()
        child.state = "starting"

    def _is_ready(self, child: Child) -> bool:
        return child.ready is None or child.ready()

    # --- the watch ---------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.wait(TICK_S):
            for child in self.children:
                with child.lock:
                    if not self._stopping.is_set():
                        self._tend(child)

    def _tend(self, child: Child) -> None:
        now = time.monotonic()
        proc = child.proc
        if child.state in ("starting", "up") and proc is not None and proc.poll() is not None:
            child.last_exit = describe_exit(proc.returncode)
            _kill_group(proc.pid)  # what it left behind (a pool child) goes with it
            ran = now - child.started_at
            child.backoff_s = FIRST_BACKOFF_S if ran >= STABLE_AFTER_S else child.backoff_s
            child.restart_at = now + child.backoff_s
            child.state = "restarting"
            log.error("%s exited with %s after %.1f s; restarting in %.1f s (restart %d)",
                      child.name, child.last_exit, ran, child.backoff_s, child.restarts + 1)  # fmt: skip
            child.backoff_s = min(child.backoff_s * 2, MAX_BACKOFF_S)
        elif child.state == "restarting" and now >= child.restart_at:
            try:
                self._launch(child)
            except Exception as exc:  # noqa: BLE001 -- tried again after the next backoff
                log.error("%s could not be started: %s", child.name, exc)
                child.restart_at = now + child.backoff_s
                child.backoff_s = min(child.backoff_s * 2, MAX_BACKOFF_S)
                return
            child.restarts += 1
        elif child.state == "starting" and self._is_ready(child):
            child.state = "up"
            if child.restarts:
                log.warning("%s is back (restart %d)", child.name, child.restarts)

    # --- stop --------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop every child, tier by tier (`Child.tier`): each gets its stop signal and
        ``stop_timeout_s``, then SIGKILL."""
        self._stopping.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)
        for tier in sorted({c.tier for c in self.children}, reverse=True):
            stop_children([c for c in self.children if c.tier == tier])


def stop_child(child: Child) -> None:
    stop_children([child])


def stop_children(children: list[Child]) -> None:
    """Signal them all, then wait for each (up to its own timeout), then kill what is left."""
    started = time.monotonic()
    for child in children:
        child.state = "stopped"
        proc = child.proc
        if proc is None or proc.poll() is not None:
            continue
        try:
            proc.send_signal(child.stop_signal)
        except ProcessLookupError:
            pass
    for child in children:
        proc = child.proc
        if proc is None:
            continue
        try:
            proc.wait(max(0.0, started + child.stop_timeout_s - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0f s; killing it", child.name, child.stop_timeout_s)
        _kill_group(proc.pid)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            pass


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
