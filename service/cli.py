"""The ``kdq`` command.

* ``kdq serve``   — everything on one machine, all owned by ``--data-dir``: PostgreSQL and Redis
  on UNIX sockets inside it, migrations, a Celery worker for the ``validate`` queue and one
  for jobs, and the API; each child is restarted if it dies (`service.embedded`). Stops them
  all in order on SIGINT/SIGTERM.
* ``kdq api``, ``kdq worker``, ``kdq migrate`` — the scaled-out pieces, configured by
  ``KDQ_*`` environment variables (see service/core/settings.py); ``kdq check`` is their health check.
  ``kdq migrate --from-sqlite`` copies the data of the SQLite-based kdq of before.
* ``kdq keys create|revoke|list`` — teams' API keys.

The ``kdq`` console script is `kdq.cli.main`, which hands these commands here; the client
commands (``compress``, ``jobs``, ``uploads``, …) live in the ``kdq`` package (HTTP only).

Without API keys (``--no-auth`` or ``KDQ_AUTH=none``) the API serves one default team to
anyone who can reach it, so ``serve`` and ``api`` then refuse any host but a loopback address.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger("kdq")


def _settings():  # type: ignore[no-untyped-def]
    from .core.settings import get_settings

    get_settings.cache_clear()
    return get_settings()


def cmd_migrate(args: argparse.Namespace) -> int:
    with _database() as s:
        if args.from_sqlite is None:
            from .core.migrate import upgrade

            upgrade(s.database_url)
            return 0
        from .embedded.sqlite_import import ImportRefused, import_sqlite

        source = Path(args.from_sqlite) if args.from_sqlite else s.data_dir / "kdq.sqlite"
        try:
            counts = import_sqlite(source, s.database_url)
        except ImportRefused as exc:
            print(f"kdq migrate --from-sqlite: {exc}", file=sys.stderr)
            return 2
    print("copied " + ", ".join(f"{n} {table}" for table, n in counts.items()) + f" from {source}")
    return 0


def cmd_check(_: argparse.Namespace) -> int:
    """Exit 0 when the database and the broker answer (a health check for worker containers)."""
    from sqlalchemy import text

    from .core.db import Database
    from .core.queues import Queues

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


@contextmanager
def _database() -> Iterator[Any]:
    """The settings, with their database up for the length of a command: the embedded one is
    started (and migrated) for it when no `kdq serve` holds the data dir."""
    s = _settings()
    if not s.embedded:
        yield s
        return
    from .core.migrate import upgrade
    from .embedded.layout import DataDirBusy
    from .embedded.stack import EmbeddedStack

    try:
        with EmbeddedStack(s).database_only():
            upgrade(s.database_url)
            yield s
    except DataDirBusy as exc:
        raise SystemExit(f"kdq: {exc}") from None


@contextmanager
def _open_db() -> Iterator[Any]:
    from .core.db import Database

    with _database() as s:
        db = Database(s.database_url, pool_size=1)
        try:
            yield db
        finally:
            db.dispose()


def cmd_keys_create(args: argparse.Namespace) -> int:
    from .core.auth import create_key

    with _open_db() as db:
        try:
            new = create_key(db, args.team, scope="admin" if args.admin else "team", label=args.label)
        except ValueError as exc:
            print(f"kdq keys create: {exc}", file=sys.stderr)
            return 2
    print(
        f"created {new.scope} key {new.id} (prefix {new.prefix}) for team {new.team_id!r}; "
        "it is shown only now, keep it secret:",
        file=sys.stderr,
    )
    print(new.key)
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    from .core.auth import revoke_key

    with _open_db() as db:
        row = revoke_key(db, args.key)
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
    from .core.auth import list_keys

    with _open_db() as db:
        rows = list_keys(db, args.team)

    def when(t):  # type: ignore[no-untyped-def]
        return t.strftime("%Y-%m-%dT%H:%M:%SZ") if t else "-"

    print("id\tprefix\tteam\tscope\tlabel\tcreated\tlast_used\trevoked")
    for r in rows:
        cells = [r.id, r.prefix, r.team_id, r.scope, r.label or "-"]
        print("\t".join([*cells, when(r.created_at), when(r.last_used_at), when(r.revoked_at)]))
    return 0


def cmd_api(args: argparse.Namespace) -> int:
    if not _auth_mode_allowed(args.no_auth, args.host):
        return 2
    options = {"host": args.host, "port": args.port, "proxy_headers": True, "access_log": args.access_log}
    if args.workers == 1:  # one process: event streams end at once on shutdown (service.api.server)
        from .api.app import create_app
        from .api.server import ApiServer

        ApiServer(create_app(), **options).run()
        return 0
    import uvicorn

    from .api.http_limits import protocol_with
    from .api.server import GRACEFUL_S

    uvicorn.run("service.api.app:create_app", factory=True, workers=args.workers, log_config=None,
                timeout_graceful_shutdown=GRACEFUL_S, http=protocol_with(_settings().max_request_head_bytes),
                **options)  # fmt: skip
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from worker.celery_app import app

    from .embedded.stack import worker_argv

    s = _settings()
    queues = args.queues.split(",") if args.queues else [s.queue_cpu]
    if s.queue_gpu in queues:  # a GPU worker without CUDA is refused (worker.gpu)
        from worker.gpu import refusal

        why, warning = refusal(queues, s.queue_gpu, s.queue_cpu)
        if why is not None:
            print(why, file=sys.stderr)
            return 3
        if warning is not None:
            log.warning("%s", warning)
    app.worker_main(["--quiet", *worker_argv(queues, args.concurrency, args.name or queues[0], args.loglevel)])
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .embedded.serve import serve

    if args.data_dir:
        os.environ["KDQ_DATA_DIR"] = str(Path(args.data_dir).expanduser().resolve())
    if not _auth_mode_allowed(args.no_auth, args.host):
        return 2
    return serve(_settings(), args)


ACCESS_LOG_HELP = (
    "log every request (off by default: a log line per status poll cost the API 7%% of its CPU under "
    "load; /metrics counts requests)"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdq", description="Compression as a service.")
    parser.add_argument("--loglevel", default="INFO")
    parser.add_argument("--log-format", choices=["text", "json"], help="log lines as text or JSON (KDQ_LOG_FORMAT)")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="the whole service on one machine: PostgreSQL, Redis, workers, API")
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
        default=7.0,
        help="seconds the workers get to stop (a running job hands itself back to the queue at its next "
        "cancel check, and resumes from its last checkpoint on the next start); then they are killed",
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
    worker.add_argument("--queues", help="comma-separated (default: the cpu queue); e.g. validate, cpu, gpu "
                        "(a gpu worker refuses to start without CUDA)")
    worker.add_argument("--concurrency", type=int, default=1)
    worker.add_argument("--name", help="node name prefix (default: the first queue)")
    worker.set_defaults(func=cmd_worker)

    migrate = sub.add_parser("migrate", help="bring the database schema up to date")
    migrate.add_argument(
        "--from-sqlite", nargs="?", const="", metavar="FILE",
        help="copy teams, keys, uploads, jobs, events and artifacts from the SQLite database of an "
        "earlier kdq (default FILE: <data dir>/kdq.sqlite) into this database",
    )  # fmt: skip
    migrate.add_argument("--data-dir", help="the embedded service's data folder (or KDQ_DATA_DIR)")
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

    return parser


def main(argv: list[str] | None = None) -> int:
    from .core.logs import configure

    args = build_parser().parse_args(argv)
    if args.log_format:
        os.environ["KDQ_LOG_FORMAT"] = args.log_format  # (the children inherit it)
    if getattr(args, "data_dir", None):
        os.environ["KDQ_DATA_DIR"] = str(Path(args.data_dir).expanduser().resolve())
    configure(os.environ.get("KDQ_LOG_FORMAT", "text"), args.loglevel)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
