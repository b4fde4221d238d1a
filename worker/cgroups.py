"""A memory cgroup for one confined task (`worker.confine`): cgroup v2 where the memory controller
is delegated to us, else cgroup v1's memory hierarchy where it is writable; None otherwise (the
caller falls back to RLIMIT_AS). The kernel then kills only the task's own process when it goes
over, and the parent reads the OOM-kill count to say so."""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

log = logging.getLogger(__name__)
ROOT = Path("/sys/fs/cgroup")


def _own_path(controller: str | None) -> str | None:
    """This process's cgroup path in the v2 hierarchy (``controller`` None) or a v1 controller's."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controller is None and controllers == "":
            return path
        if controller is not None and controller in controllers.split(","):
            return path
    return None


class MemoryCgroup:
    def __init__(self, path: Path, version: int) -> None:
        self.path, self.version = path, version

    @classmethod
    def create(cls, limit_bytes: int) -> MemoryCgroup | None:
        name = f"kdq-task-{os.getpid()}-{secrets.token_hex(3)}"
        for version, base in ((2, cls._v2_base()), (1, cls._v1_base())):
            if base is None:
                continue
            path = base / name
            try:
                path.mkdir()
                if version == 2:
                    (path / "memory.max").write_text(str(limit_bytes))
                    if (path / "memory.swap.max").exists():
                        (path / "memory.swap.max").write_text("0")
                else:
                    (path / "memory.limit_in_bytes").write_text(str(limit_bytes))
                return cls(path, version)
            except OSError as exc:
                log.debug("no memory cgroup v%d at %s: %s", version, path, exc)
                try:
                    path.rmdir()
                except OSError:
                    pass
        return None

    @staticmethod
    def _v2_base() -> Path | None:
        own = _own_path(None)
        if own is None or not (ROOT / "cgroup.controllers").is_file():
            return None
        base = ROOT / own.lstrip("/")
        try:
            if "memory" not in (base / "cgroup.subtree_control").read_text().split():
                return None
        except OSError:
            return None
        return base if os.access(base, os.W_OK) else None

    @staticmethod
    def _v1_base() -> Path | None:
        own = _own_path("memory")
        base = ROOT / "memory" / (own or "/").lstrip("/")
        return base if own is not None and (base / "memory.limit_in_bytes").is_file() and os.access(base, os.W_OK) else None

    def join(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def oom_kills(self) -> int:
        try:
            if self.version == 2:
                for line in (self.path / "memory.events").read_text().splitlines():
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
                return 0
            for line in (self.path / "memory.oom_control").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
            return 0
        except (OSError, ValueError):
            return 0

    def peak_bytes(self) -> int | None:
        name = "memory.peak" if self.version == 2 else "memory.max_usage_in_bytes"
        try:
            return int((self.path / name).read_text())
        except (OSError, ValueError):
            return None

    def remove(self) -> None:
        try:
            self.path.rmdir()
        except OSError as exc:  # a process still in it (it is being reaped): harmless, logged
            log.debug("could not remove %s: %s", self.path, exc)
