"""The ``kdq`` command.

* ``kdq serve``   — everything on one machine: migrations, the API, a Celery worker for
  the ``validate`` queue and one for jobs, a SQLite file, a SQLite broker and a blob
  directory under ``--data-dir``. Stops them all on SIGINT/SIGTERM.
* ``kdq api``, ``kdq worker``, ``kdq migrate`` — the scaled-out pieces, configured by
  ``KDQ_*`` environment variables (see service/settings.py); ``kdq check`` is their health check.
* ``kdq keys create|revoke|list`` — teams' API keys.

Without API keys (``--no-auth`` or ``KDQ_AUTH=none``) the API serves one default team to
anyone who can reach it, so ``serve`` and ``api`` then refuse any host but a loopback address.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger("kdq")


def worker_argv(queues: list[str], concurrency: int, name: str, loglevel: str = "INFO") -> list[str]:
    """Arguments of ``celery worker`` for one of our workers (shared by ``serve`` and ``worker``)."""
    return [
        "worker",
        "-Q",
        ",".join(queues),
        "-c",
        str(concurrency),
        "-n",
        f"{name}@%h",
        "-l",
        loglevel,
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]


def _settings():  # type: ignore[no-untyped-def]
    from .settings import get_settings

    get_settings.cache_clear()
    return get_settings()


def cmd_migrate(_: argparse.Namespace) -> int:
    from .migrate import upgrade

    upgrade(_settings().database_url)
    return 0


def cmd_check(_: argparse.Namespace) -> int:
    """Exit 0 when the database and the broker answer (a health check for worker containers)."""
    from sqlalchemy import text

    from .db import Database
    from .queueing import Queues

    s = _settings()
    db = Database(s.database_url)
    try:
        with db.read() as session:
            session.execute(text("SELECT 1"))
        Queues(s).ping()
    except Exception as exc:  # noqa: BLE001 -- any failure is "unhealthy"; say which
        print(f"unhealthy: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        db.dispose()
    return 0


def is_loopback(host: str) -> bool:
    """``localhost``, ``127.0.0.0/8`` or ``::1``: reachable from this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _auth_mode_allowed(no_auth: bool, host: str) -> bool:
    """Apply ``--no-auth``; False (after saying why) when the API would be open beyond this machine."""
    if no_auth:
        os.environ["KDQ_AUTH"] = "none"
    if _settings().auth == "none" and not is_loopback(host):
        print(
            f"kdq: refusing to serve without API keys on {host!r}: --no-auth / KDQ_AUTH=none is only "
            "allowed on a loopback address (--host 127.0.0.1). To serve on the network, make keys with "
            "`kdq keys create --team NAME` and drop --no-auth.",
            file=sys.stderr,
        )
        return False
    return True


def _open_db():  # type: ignore[no-untyped-def]
    """The database of the settings; the embedded SQLite file is created and migrated if needed."""
    from .db import Database
    from .migrate import upgrade

    s = _settings()
    if s.database_url.startswith("sqlite"):
        s.data_dir.mkdir(parents=True, exist_ok=True)
        upgrade(s.database_url)
    return Database(s.database_url)


def cmd_keys_create(args: argparse.Namespace) -> int:
    from .auth import create_key

    db = _open_db()
    try:
        new = create_key(db, args.team, scope="admin" if args.admin else "team", label=args.label)
    except ValueError as exc:
        print(f"kdq keys create: {exc}", file=sys.stderr)
        return 2
    finally:
        db.dispose()
    print(
        f"created {new.scope} key {new.id} (prefix {new.prefix}) for team {new.team_id!r}; "
        "it is shown only now, keep it secret:",
        file=sys.stderr,
    )
    print(new.key)
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    from .auth import revoke_key

    db = _open_db()
    try:
        row = revoke_key(db, args.key)
    finally:
        db.dispose()
    if row is None:
        print(f"kdq keys revoke: no key with id or prefix {args.key!r}", file=sys.stderr)
        return 1
    s = _settings()
    print(
        f"revoked key {row.id} (prefix {row.prefix}, team {row.team_id!r}); running API processes stop "
        f"accepting it within {s.auth_cache_s:g} s"
    )
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    from .auth import list_keys

    db = _open_db()
    try:
        rows = list_keys(db, args.team)
    finally:
        db.dispose()

    def when(t):  # type: ignore[no-untyped-def]
        return t.strftime("%Y-%m-%dT%H:%M:%SZ") if t else "-"

    print("id\tprefix\tteam\tscope\tlabel\tcreated\tlast_used\trevoked")
    for r in rows:
        cells = [r.id, r.prefix, r.team_id, r.scope, r.label or "-"]
        print("\t".join([*cells, when(r.created_at), when(r.last_used_at), when(r.revoked_at)]))
    return 0


def cmd_api(args: argparse.Namespace) -> int:
    import uvicorn

    if not _auth_mode_allowed(args.no_auth, args.host):
        return 2
    uvicorn.run(
        "service.app:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        proxy_headers=True,
        log_level=args.loglevel.lower(),
        access_log=args.access_log,
    )
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from worker.celery_app import app

    s = _settings()
    queues = args.queues.split(",") if args.queues else [s.queue_cpu]
    app.worker_main(worker_argv(queues, args.concurrency, args.name or queues[0], args.loglevel))
    return 0


def _start_worker(queues: list[str], concurrency: int, name: str) -> subprocess.Popen[bytes]:
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.celery_app:app",
        *worker_argv(queues, concurrency, name),
    ]
    return subprocess.Popen(argv, start_new_session=True)  # our signals, not the terminal's, stop it


def _stop(procs: list[subprocess.Popen[bytes]], grace: float) -> None:
    """Warm shutdown (finish the current task) for ``grace`` seconds, then cold, then kill."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0)):
        alive = [p for p in procs if p.poll() is None]
        for p in alive:  # celery stops its own pool; only a kill goes to the whole group
            (os.killpg if sig == signal.SIGKILL else os.kill)(p.pid, sig)
        for p in alive:
            try:
                p.wait(wait)
            except subprocess.TimeoutExpired:
                pass


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .migrate import upgrade
    from .queueing import Queues

    if args.data_dir:
        os.environ["KDQ_DATA_DIR"] = str(Path(args.data_dir).expanduser().resolve())
    if not _auth_mode_allowed(args.no_auth, args.host):
        return 2
    s = _settings()
    s.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(s.database_url)
    if s.auth == "keys":
        _hint_if_no_key(s, args.data_dir)
    Queues(s).depths()  # creates the broker tables here, before two workers race to do it
    procs = [
        _start_worker([s.queue_validate], args.validate_concurrency, "validate"),
        _start_worker(s.job_queues(), args.job_concurrency, "jobs"),
    ]
    server = uvicorn.Server(
        uvicorn.Config(
            "service.app:create_app",
            factory=True,
            host=args.host,
            port=args.port,
            log_level=args.loglevel.lower(),
        access_log=args.access_log,
        )
    )
    failed = threading.Event()

    def watch() -> None:  # one process group: if a worker dies, everything stops
        while not server.should_exit:
            for p in procs:
                if p.poll() is not None:
                    log.error("worker %s exited with %s; stopping", p.args, p.returncode)
                    failed.set()
                    server.should_exit = True
                    return
            time.sleep(0.5)

    threading.Thread(target=watch, daemon=True).start()
    # uvicorn re-raises the SIGINT/SIGTERM it caught once it has stopped; with these handlers in
    # place that re-raise is harmless and the workers are still stopped below.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    log.info("kdq serve: data in %s, API on http://%s:%s", s.data_dir, args.host, args.port)
    try:
        server.run()
    finally:
        server.should_exit = True
        _stop(procs, args.shutdown_grace)
    return 1 if failed.is_set() else 0


def _hint_if_no_key(s, data_dir: str | None) -> None:  # type: ignore[no-untyped-def]
    from .auth import has_active_key
    from .db import Database

    db = Database(s.database_url)
    try:
        if has_active_key(db):
            return
    finally:
        db.dispose()
    where = f" --data-dir {data_dir}" if data_dir else ""
    print(
        "kdq serve: no API key exists yet, so every /v1 request will be answered 401. Make one "
        f"(it is printed once):\n    kdq keys create --team NAME{where}\n"
        "and send it as 'Authorization: Bearer <key>'. For local use only: kdq serve --no-auth",
        file=sys.stderr,
    )


ACCESS_LOG_HELP = (
    "log every request (off by default: a log line per status poll cost the API 7%% of its CPU under "
    "load; /metrics counts requests)"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdq", description="Compression as a service.")
    parser.add_argument("--loglevel", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="API + workers + SQLite on one machine")
    serve.add_argument(
        "--data-dir", help="where the database, broker and blobs live (default ./var, or KDQ_DATA_DIR)"
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--access-log", action="store_true", help=ACCESS_LOG_HELP)
    serve.add_argument(
        "--no-auth",
        action="store_true",
        help="no API keys: every request is the default team (only with a loopback --host)",
    )
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--job-concurrency", type=int, default=1, help="jobs run at once")
    serve.add_argument("--validate-concurrency", type=int, default=1, help="uploads validated at once")
    serve.add_argument(
        "--shutdown-grace",
        type=float,
        default=10.0,
        help="seconds a running job gets to finish on shutdown before it is stopped (it is requeued later)",
    )
    serve.set_defaults(func=cmd_serve)

    api = sub.add_parser("api", help="the HTTP API (uvicorn)")
    api.add_argument("--host", default="0.0.0.0")
    api.add_argument("--access-log", action="store_true", help=ACCESS_LOG_HELP)
    api.add_argument("--port", type=int, default=8000)
    api.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    api.add_argument(
        "--no-auth",
        action="store_true",
        help="no API keys (KDQ_AUTH=none): every request is the default team (only with a loopback --host)",
    )
    api.set_defaults(func=cmd_api)

    worker = sub.add_parser("worker", help="a Celery worker")
    worker.add_argument("--queues", help="comma-separated (default: the cpu queue); e.g. validate, cpu, gpu")
    worker.add_argument("--concurrency", type=int, default=1)
    worker.add_argument("--name", help="node name prefix (default: the first queue)")
    worker.set_defaults(func=cmd_worker)

    migrate = sub.add_parser("migrate", help="bring the database schema up to date")
    migrate.set_defaults(func=cmd_migrate)

    check = sub.add_parser("check", help="exit 0 when the database and the broker answer")
    check.set_defaults(func=cmd_check)

    keys = sub.add_parser("keys", help="teams' API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument(
        "--data-dir", help="the embedded service's data folder, as given to kdq serve (or KDQ_DATA_DIR)"
    )
    create = keys_sub.add_parser("create", parents=[where], help="make a key (printed once, on stdout)")
    create.add_argument("--team", required=True, help="the team it acts for (created if new)")
    create.add_argument("--admin", action="store_true", help="admin scope: sees every team's resources")
    create.add_argument("--label", default="", help="a note kept with the key (who or what uses it)")
    create.set_defaults(func=cmd_keys_create)
    revoke = keys_sub.add_parser("revoke", parents=[where], help="revoke a key")
    revoke.add_argument("key", metavar="KEY_ID_OR_PREFIX", help="the key's id or prefix (or the key itself)")
    revoke.set_defaults(func=cmd_keys_revoke)
    list_ = keys_sub.add_parser("list", parents=[where], help="list keys (never the keys themselves)")
    list_.add_argument("--team", help="only this team's")
    list_.set_defaults(func=cmd_keys_list)

    from .client import add_parser as add_compress

    add_compress(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "compress":  # stderr is the job's progress, not every request
        logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.command == "keys":
        logging.getLogger("alembic").setLevel(logging.WARNING)  # stdout/stderr: the key and what it is
        if args.data_dir:
            os.environ["KDQ_DATA_DIR"] = str(Path(args.data_dir).expanduser().resolve())
    logging.basicConfig(level=args.loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
