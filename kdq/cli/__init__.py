"""The ``kdq`` command.

Client commands (HTTP only, this package): ``compress``, ``jobs …``, ``uploads …``,
``webhooks secret``, ``whoami``. Server commands (``serve``, ``api``, ``worker``, ``migrate``,
``keys``, ``check``) belong to the service and are handed to ``service.cli`` when asked for;
it is imported only then, so the client commands work where only this package is installed.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from . import compress, jobs, uploads
from .common import run

SERVER_COMMANDS = {
    "serve": "the whole service on one machine: PostgreSQL, Redis, workers, API",
    "api": "the HTTP API (uvicorn)",
    "worker": "a Celery worker",
    "migrate": "bring the database schema up to date",
    "check": "exit 0 when the database and the broker answer",
    "keys": "teams' API keys (create, list, revoke)",
}
GLOBAL_WITH_VALUE = {"--loglevel", "--log-format"}


def _command(argv: list[str]) -> str | None:
    """The first word that is not a global option (or its value)."""
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in GLOBAL_WITH_VALUE:
            skip = True
        elif not arg.startswith("-"):
            return arg
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdq", description="Compression as a service.")
    parser.add_argument("--loglevel", default="INFO", help="(server commands)")
    parser.add_argument("--log-format", choices=["text", "json"], help="(server commands) log lines as text or JSON")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in SERVER_COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)  # (handed to service.cli before parsing)
    compress.add_parser(sub)
    jobs.add_parser(sub)
    uploads.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if _command(argv) in SERVER_COMMANDS:
        server = importlib.import_module("service.cli")  # the service half, only when installed and asked for
        return int(server.main(argv) or 0)
    args = build_parser().parse_args(argv)
    try:
        status = run(args)
        sys.stdout.flush()  # (a pipe's buffer is written here: a closed one raises now, not at exit)
        return status
    except BrokenPipeError:  # stdout closed early (``kdq uploads list | head``): stop quietly
        _drop_stdout()
        return 141  # (128 + SIGPIPE: what a shell reports for a command ended by a closed pipe)


def _drop_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # (no real file behind stdout)
        pass
