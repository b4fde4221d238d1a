"""``kdq serve``: the embedded stack and the API in one command, supervised, quiet, in order.

Start-up: take the data dir's lock, start PostgreSQL (``initdb`` the first time) and Redis,
copy an old SQLite data dir over if there is one, run the migrations, start the two workers,
then the API in this process; one line per part, then the URL. Ctrl-C (or SIGTERM) stops the
API, then the workers (a running job hands itself back to the queue), Redis and PostgreSQL.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from typing import Any

from ..core.auth import has_active_key
from ..core.settings import Settings
from .layout import DataDirBusy
from .stack import EmbeddedStack, child_env_defaults

log = logging.getLogger("kdq.serve")


def serve(settings: Settings, args: argparse.Namespace) -> int:
    from ..api.app import create_app
    from ..api.server import ApiServer
    from ..core.db import Database
    from ..core.migrate import upgrade
    from .sqlite_import import import_legacy_data_dir

    started = time.monotonic()
    if not settings.embedded:
        print("kdq serve: KDQ_DATABASE_URL is set; kdq serve runs its own PostgreSQL and Redis in the data "
              "dir. For a database of your own, run `kdq migrate`, `kdq api` and `kdq worker`.", file=sys.stderr)
        return 2
    child_env_defaults()
    verbose = logging.getLogger().level <= logging.DEBUG
    stack = EmbeddedStack(settings, job_concurrency=args.job_concurrency,
                          validate_concurrency=args.validate_concurrency,
                          worker_loglevel="DEBUG" if verbose else "WARNING",
                          worker_stop_s=args.shutdown_grace)  # fmt: skip
    try:
        stack.lock.acquire("kdq serve")
    except DataDirBusy as exc:
        print(f"kdq serve: {exc}", file=sys.stderr)
        return 2
    for sig in (signal.SIGINT, signal.SIGTERM):  # until uvicorn runs: stop in order, below
        signal.signal(sig, _raise_interrupt)
    try:
        stack.start_servers()
        upgrade(settings.database_url)
        import_legacy_data_dir(stack.layout, settings.database_url)
        db = Database(settings.database_url, pool_size=1)
        try:
            if settings.auth == "keys":
                hint_if_no_key(db, args.data_dir)
        finally:
            db.dispose()
        stack.start_workers()
        app = create_app(settings, parts=stack.supervisor.status)
        server = ApiServer(app, host=args.host, port=args.port, access_log=args.access_log)
        for name, line in stack.describe().items():
            log.info("%-15s %s", name, line)
        threading.Thread(target=_announce, args=(server, args, started), daemon=True).start()
        # uvicorn re-raises the SIGINT/SIGTERM it caught once it has stopped; with these handlers in
        # place that re-raise is harmless and the rest is stopped below.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: None)
        server.run()
        return 0 if server.started else 1
    except KeyboardInterrupt:
        return 0
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not cut the stop short
        stopping = time.monotonic()
        stack.stop()
        stack.lock.release()
        log.info("kdq serve stopped in %.1f s", time.monotonic() - stopping)


def _raise_interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def _announce(server: object, args: argparse.Namespace, started: float) -> None:
    while not getattr(server, "started", False):
        if getattr(server, "should_exit", False):
            return
        time.sleep(0.02)
    log.info("kdq serve ready in %.1f s: http://%s:%s", time.monotonic() - started, args.host, args.port)


def hint_if_no_key(db: Any, data_dir: str | None) -> None:
    """Say how to make a key when none exists (every /v1 request would be answered 401)."""
    if has_active_key(db):
        return
    where = f" --data-dir {data_dir}" if data_dir else ""
    print(
        "kdq serve: no API key exists yet, so every /v1 request will be answered 401. Make one "
        f"(it is printed once):\n    kdq keys create --team NAME{where}\n"
        "and send it as 'Authorization: Bearer <key>'. For local use only: kdq serve --no-auth",
        file=sys.stderr,
    )
