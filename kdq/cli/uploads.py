"""``kdq uploads list|show|delete|add``, ``kdq webhooks secret``, ``kdq whoami``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..client import Client
from .common import dump, emit, human_size, pairs, service_options, table, when


def cmd_list(args: argparse.Namespace, client: Client) -> int:
    kinds = ["models", "datasets"] if args.kind == "all" else [args.kind]
    items = [u for kind in kinds for u in client.uploads(kind, state=args.state, name=args.name, tag=args.tag,
                                                         created_after=args.after, created_before=args.before,
                                                         limit=args.limit)]  # fmt: skip

    def human() -> None:
        table([[u.id, u.kind, u.name, u.format, u.state, human_size(u.size_bytes), ",".join(u.tags), when(u.created_at)]
               for u in items], ["id", "kind", "name", "format", "state", "size", "tags", "created"])  # fmt: skip

    emit(args, [dump(u) for u in items], human)
    return 0


def cmd_show(args: argparse.Namespace, client: Client) -> int:
    up = client.get_upload(args.upload_id)

    def human() -> None:
        print(f"{up.id}  {up.kind} {up.name!r}  {up.state}")
        print(f"  format {up.format}   {human_size(up.size_bytes)}   sha256 {up.sha256}")
        if up.tags:
            print(f"  tags   {', '.join(up.tags)}")
        if up.error:
            print(f"  invalid: {up.error.detail}")
        for key, value in (up.summary or {}).items():
            print(f"  {key:<16} {value}")

    emit(args, dump(up), human)
    return 0


def cmd_delete(args: argparse.Namespace, client: Client) -> int:
    client.delete_upload(args.upload_id)
    emit(args, {"deleted": args.upload_id}, lambda: print(f"deleted {args.upload_id}"))
    return 0


def cmd_add(args: argparse.Namespace, client: Client) -> int:
    up = client.upload(args.file, kind=args.kind, format=args.format, name=args.name, tags=args.tag or (),
                       progress=not args.quiet, wait=not args.no_wait, **pairs(args.option, "--option"))  # fmt: skip
    emit(args, dump(up), lambda: print(f"{up.id} {up.state}"))
    return 0


def cmd_secret(args: argparse.Namespace, client: Client) -> int:
    info = client.webhook_secret(rotate=args.rotate)

    def human() -> None:
        if info.secret:
            print(info.secret)
            print(f"webhook secret version {info.version}: shown only now, keep it with your receiver"
                  + (f"; the previous one signs along until {info.previous_valid_until}" if info.previous_valid_until
                     else ""), file=sys.stderr)  # fmt: skip
        else:
            print(f"version {info.version}, made {when(info.rotated_at)} (the secret is shown only when made: "
                  "--rotate makes a new one)")  # fmt: skip

    emit(args, dump(info), human)
    return 0


def cmd_whoami(args: argparse.Namespace, client: Client) -> int:
    me = client.me()
    def human() -> None:
        print(f"team {me.team_id} ({me.scope} key) at {client.url}")
        u = me.usage
        if u:
            print(f"storage {u['stored_bytes'] / 2**20:.1f} of {u['max_stored_bytes'] / 2**20:.0f} MiB, "
                  f"{u['unfinished_jobs']} of {u['max_unfinished_jobs']} unfinished jobs, "
                  f"time budget {u['job_time_budget_s'] / 3600:.1f} h per job")

    emit(args, dump(me), human)
    return 0


def add_parser(sub: Any) -> None:
    common = service_options()
    uploads = sub.add_parser("uploads", help="list, show, add, delete models and datasets")
    us = uploads.add_subparsers(dest="uploads_command", required=True)
    p = us.add_parser("list", parents=[common], help="uploads, newest first")
    p.add_argument("--kind", choices=["models", "datasets", "all"], default="all")
    p.add_argument("--state", choices=["validating", "ready", "invalid"])
    p.add_argument("--name", help="names starting with this")
    p.add_argument("--tag", action="append", help="has this tag (repeatable: all of them)")
    p.add_argument("--after", help="created at or after (ISO 8601 with a zone)")
    p.add_argument("--before", help="created before (ISO 8601 with a zone)")
    p.add_argument("--limit", type=int, default=20)
    p.set_defaults(handler=cmd_list)
    for name, handler, text in (("show", cmd_show, "one upload: state, summary or why it is invalid"),
                                ("delete", cmd_delete, "delete an upload (refused while a job uses it)")):  # fmt: skip
        p = us.add_parser(name, parents=[common], help=text)
        p.add_argument("upload_id", metavar="ID", help="mdl_… or ds_…")
        p.set_defaults(handler=handler)
    p = us.add_parser("add", parents=[common], help="upload a teacher or a dataset and wait for its validation")
    p.add_argument("file")
    p.add_argument("--kind", choices=["model", "dataset"], help="(guessed from the suffix when it can be)")
    p.add_argument("--format", default="auto")
    p.add_argument("--name")
    p.add_argument("--tag", action="append")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="a dataset reading field")
    p.add_argument("--no-wait", action="store_true", help="do not wait for validation")
    p.set_defaults(handler=cmd_add)

    hooks = sub.add_parser("webhooks", help="the team's webhook signing secret")
    hs = hooks.add_subparsers(dest="webhooks_command", required=True)
    p = hs.add_parser("secret", parents=[common], help="the secret's version; --rotate makes a new one (shown once)")
    p.add_argument("--rotate", action="store_true", help="make the first secret, or replace it")
    p.set_defaults(handler=cmd_secret)

    p = sub.add_parser("whoami", parents=[common], help="the team and scope of the key")
    p.set_defaults(handler=cmd_whoami)
