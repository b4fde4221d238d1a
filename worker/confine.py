"""Run one task's engine work in a child process that cannot exceed its limits.

A validation or a job must never take its worker down, whatever it was sent: a 220-byte ONNX
graph that tiles to gigabytes, a Parquet file of 400 M rows, a job spec asking for huge layers.
So the Celery task (the pool process) never runs the engine itself: it forks a child per task
(cheap: the engine's modules are imported once, beforehand, and never run in the parent, so no
thread pools are forked) and watches it:

* **memory**: the child's own memory cgroup (v2, or v1 where that is what the kernel offers) so
  the kernel kills the child and only it; RLIMIT_AS where no cgroup can be made;
* **CPU time**: RLIMIT_CPU (SIGXCPU, then SIGKILL);
* **wall time**: killed by the parent past ``wall_s``;
* **scratch space**: RLIMIT_FSIZE per file, and the parent kills the child when its scratch folder
  grows past ``scratch_bytes`` in all.

Past a limit the task ends with `LimitExceeded` (which limit, how much was allowed), and the
worker takes the next task. Messages cross one pipe as JSON lines (progress, log lines, the
result; nothing is unpickled); the parent's stop request crosses another. The child runs in its
own process group, so whatever it starts (the code-checkpoint sandbox) goes with it.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import select
import signal
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.core.settings import Settings

from .cgroups import MemoryCgroup

log = logging.getLogger(__name__)
POLL_S = 0.2
SCRATCH_EVERY_S = 2.0
STOP_GRACE_S = 20.0
"""How long a child asked to stop gets to stop at its next check before it is killed."""
AS_HEADROOM = 2 << 30
"""RLIMIT_AS (no cgroup) counts reserved address space, not memory: torch and onnxruntime
reserve well beyond what they touch, so the cap is the memory limit plus this."""


@dataclass(frozen=True)
class TaskLimits:
    memory_bytes: int
    cpu_s: int
    wall_s: float
    scratch_bytes: int

    @classmethod
    def for_queue(cls, settings: Settings, queue: str) -> TaskLimits:
        """A validation's limits (``validate``) or a job's (the CPU cap: the wall cap × the cores)."""
        if queue == "validate":
            return cls(settings.validate_memory_bytes, settings.validate_cpu_s, settings.validate_wall_s,
                       settings.validate_scratch_bytes)  # fmt: skip
        return cls(settings.job_memory_bytes, int(settings.job_wall_s * (os.cpu_count() or 1)), settings.job_wall_s,
                   settings.job_scratch_bytes)  # fmt: skip

    def describe(self, which: str) -> str:
        return {
            "memory": f"{self.memory_bytes / 2**30:.1f} GiB of memory",
            "cpu": f"{self.cpu_s} s of CPU time",
            "wall": f"{self.wall_s:.0f} s of wall time",
            "scratch": f"{self.scratch_bytes / 2**30:.1f} GiB of scratch space",
        }[which]


class LimitExceeded(Exception):
    """The task went past one of its limits (``which``: memory, cpu, wall, scratch)."""

    def __init__(self, which: str, limits: TaskLimits, detail: str = "") -> None:
        self.which = which
        self.allowed = limits.describe(which)
        super().__init__(f"the task went past its limit of {self.allowed}" + (f": {detail}" if detail else ""))


class ChildFailed(Exception):
    """The child reported an error (``kind``) or died of something other than a limit."""

    def __init__(self, kind: str, detail: str, code: str | None = None) -> None:
        super().__init__(detail)
        self.kind, self.detail, self.code = kind, detail, code


class Channel:
    """The child's end: `report` sends a JSON-able message to the parent; `stop_requested` says
    whether the parent asked the work to stop (checked without blocking)."""

    def __init__(self, out_fd: int, in_fd: int) -> None:
        self._out, self._in = os.fdopen(out_fd, "w", buffering=1), in_fd
        self._stop = False

    def report(self, message: dict[str, Any]) -> None:
        self._out.write(json.dumps(message, allow_nan=False, default=str) + "\n")

    def stop_requested(self) -> bool:
        if not self._stop and select.select([self._in], [], [], 0)[0]:
            self._stop = os.read(self._in, 64) != b""  # a byte, or the parent gone
        return self._stop


Work = Callable[[Channel], dict[str, Any]]
"""What runs in the child: returns the JSON-able result."""
Errors = Callable[[BaseException], tuple[str, str, str | None] | None]
"""Maps an exception raised in the child to ``(kind, detail, code)`` (None: an internal error)."""


def run_confined(work: Work, *, limits: TaskLimits, scratch: Path | None, on_message: Callable[[dict[str, Any]], None],
                 should_stop: Callable[[], bool] = lambda: False, classify: Errors = lambda _: None,
                 name: str = "task") -> dict[str, Any]:  # fmt: skip
    """Run ``work`` in a confined child; its result, or `LimitExceeded` / `ChildFailed`."""
    cgroup = MemoryCgroup.create(limits.memory_bytes)
    up_r, up_w = os.pipe()
    down_r, down_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        os.close(up_r)
        os.close(down_w)
        _child(work, limits, cgroup, Channel(up_w, down_r), classify)
    os.close(up_w)
    os.close(down_r)
    try:
        return _watch(pid, up_r, down_w, limits, scratch, cgroup, on_message, should_stop, name)
    except BaseException:  # the parent failed while watching: the child goes with it
        _kill(pid)
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
        raise
    finally:
        os.close(up_r)
        os.close(down_w)
        if cgroup is not None:
            cgroup.remove()


def _child(work: Work, limits: TaskLimits, cgroup: MemoryCgroup | None, channel: Channel, classify: Errors) -> None:
    code = 1
    try:
        os.setpgid(0, 0)
        _die_with_parent()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if cgroup is not None:
            cgroup.join(os.getpid())
        else:
            cap = limits.memory_bytes + AS_HEADROOM
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s + 5))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.scratch_bytes, limits.scratch_bytes))
        try:
            channel.report({"kind": "result", "value": work(channel)})
            code = 0
        except MemoryError:
            channel.report({"kind": "error", "error": "memory", "detail": "an allocation failed"})
        except BaseException as exc:  # noqa: BLE001 -- everything goes back to the parent, in words
            known = classify(exc)
            if known is None:
                known = ("internal", "".join(traceback.format_exception(exc))[-4000:], None)
            kind, detail, err_code = known
            channel.report({"kind": "error", "error": kind, "detail": detail, "code": err_code})
    finally:
        os._exit(code)


def _watch(pid: int, up: int, down: int, limits: TaskLimits, scratch: Path | None, cgroup: MemoryCgroup | None,
           on_message: Callable[[dict[str, Any]], None], should_stop: Callable[[], bool], name: str) -> dict[str, Any]:  # fmt: skip
    started = time.monotonic()
    buffer = b""
    outcome: dict[str, Any] | None = None
    stop_sent_at: float | None = None
    killed_for: str | None = None
    next_scratch = started + SCRATCH_EVERY_S
    status: int | None = None
    cpu_used = 0.0
    while status is None:
        ready = select.select([up], [], [], POLL_S)[0]
        if ready:
            chunk = os.read(up, 1 << 16)
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                message = json.loads(line)
                if message.get("kind") in ("result", "error"):
                    outcome = message
                else:
                    on_message(message)
        cpu_used = _cpu_seconds(pid) or cpu_used
        done, raw = os.waitpid(pid, os.WNOHANG)
        if done:
            status = raw
            break
        now = time.monotonic()
        if killed_for is None and now - started > limits.wall_s:
            killed_for = "wall"
        if killed_for is None and scratch is not None and now >= next_scratch:
            next_scratch = now + SCRATCH_EVERY_S
            if _size(scratch) > limits.scratch_bytes:
                killed_for = "scratch"
        if killed_for is None and stop_sent_at is None and should_stop():
            stop_sent_at = now
            os.write(down, b"!")
        if stop_sent_at is not None and now - stop_sent_at > STOP_GRACE_S:
            killed_for = killed_for or "stop"
        if killed_for is not None:
            _kill(pid)
    # drain what the child wrote before it ended
    while True:
        try:
            chunk = os.read(up, 1 << 16)
        except OSError:
            break
        if not chunk:
            break
        buffer += chunk
    for line in (buffer.split(b"\n") if buffer else []):
        if line.strip():
            message = json.loads(line)
            outcome = message if message.get("kind") in ("result", "error") else outcome
            if message.get("kind") not in ("result", "error"):
                on_message(message)
    return _verdict(outcome, status, killed_for, limits, cgroup, name, cpu_used)


def _verdict(outcome: dict[str, Any] | None, status: int, killed_for: str | None, limits: TaskLimits,
             cgroup: MemoryCgroup | None, name: str, cpu_used: float) -> dict[str, Any]:  # fmt: skip
    if killed_for in ("wall", "scratch"):
        raise LimitExceeded(killed_for, limits)
    if killed_for == "stop":
        raise ChildFailed("cancelled", f"the {name} did not stop within {STOP_GRACE_S:.0f} s of being asked; killed")
    if outcome is not None and outcome["kind"] == "result" and os.WIFEXITED(status):
        return outcome["value"]
    if outcome is not None and outcome["kind"] == "error":
        if outcome["error"] == "memory":
            raise LimitExceeded("memory", limits, outcome.get("detail", ""))
        raise ChildFailed(outcome["error"], outcome.get("detail", ""), outcome.get("code"))
    signum = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
    if cgroup is not None and cgroup.oom_kills() > 0:
        raise LimitExceeded("memory", limits)
    if signum == signal.SIGXCPU or (signum == signal.SIGKILL and cpu_used >= limits.cpu_s):
        raise LimitExceeded("cpu", limits)
    if signum == signal.SIGKILL and cgroup is None:
        raise LimitExceeded("memory", limits, "killed by the kernel, most likely for memory")
    how = f"signal {signum} ({signal.Signals(signum).name})" if signum else f"status {os.WEXITSTATUS(status)}"
    raise ChildFailed("crashed", f"the {name} process died with {how}")


def _cpu_seconds(pid: int) -> float:
    """The child's CPU time so far (user + system, from /proc), 0 when it cannot be read."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def _die_with_parent() -> None:
    """PR_SET_PDEATHSIG: the child is killed if the worker process dies first."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def _kill(pid: int) -> None:
    for target in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
        try:
            target()
        except (ProcessLookupError, PermissionError):
            pass


def _size(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total
