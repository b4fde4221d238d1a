"""What every client command shares: the service options, JSON or human output, exit status."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from ..client import Client
from ..errors import KdqError

Handler = Callable[[argparse.Namespace, Client], int]


def service_options() -> argparse.ArgumentParser:
    """--url, --key, --json, --quiet: a parent parser of every client command."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--url", default=os.environ.get("KDQ_URL", "http://127.0.0.1:8000"),
                   help="the service (default: KDQ_URL or http://127.0.0.1:8000)")  # fmt: skip
    p.add_argument("--key", default=os.environ.get("KDQ_API_KEY"), help="the team's API key (default: KDQ_API_KEY)")
    p.add_argument("--json", action="store_true", help="print the result (or the error) as JSON on stdout")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    return p


def run(args: argparse.Namespace) -> int:
    """Call the command's handler; a `KdqError` is printed on stderr (and as JSON on stdout with
    ``--json``), and its exit status returned."""
    handler: Handler = args.handler
    try:
        with Client(args.url, args.key or "", log=sys.stderr) as client:
            return handler(args, client)
    except KdqError as exc:
        print(f"kdq {args.command}: {exc}", file=sys.stderr)
        if getattr(args, "json", False):
            print(json.dumps(exc.as_json(), indent=2, default=str))
        return exc.exit_code
    except TimeoutError as exc:
        print(f"kdq {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"kdq {args.command}: interrupted; a submitted job goes on in the service", file=sys.stderr)
        return 130


def emit(args: argparse.Namespace, data: Any, human: Callable[[], None]) -> None:
    if args.json:
        print(json.dumps(data, indent=2, default=str))
    else:
        human()


def dump(model: Any) -> Any:
    return model.model_dump(mode="json") if hasattr(model, "model_dump") else model


def when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> None:
    """Columns padded to their widest cell (plain text, so it greps and pipes)."""
    cells = [[str(c) if c is not None else "-" for c in row] for row in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def human_size(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def number(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, (int, float)) else "-"


def progress_mode(args: argparse.Namespace) -> str:
    return "quiet" if args.quiet else getattr(args, "progress", "auto")


def spec_arg(value: str | None) -> dict[str, Any]:
    """``--spec``: a JSON object, or a file holding one."""
    if not value:
        return {}
    text = value if value.lstrip().startswith("{") else Path(value).read_text()
    try:
        spec = json.loads(text)
    except ValueError as exc:
        raise KdqError(f"--spec is not JSON: {exc}") from None
    if not isinstance(spec, dict):
        raise KdqError("--spec must be a JSON object (the job's fields)")
    return spec


def pairs(values: list[str], flag: str) -> dict[str, str]:
    out = {}
    for pair in values:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise KdqError(f"{flag} {pair!r}: expected KEY=VALUE")
        out[key] = value
    return out


def set_path(body: dict[str, Any], dotted: str, raw: str) -> None:
    """``distillation.epochs=5``: set a nested field (the value read as JSON when it is JSON)."""
    try:
        value: Any = json.loads(raw)
    except ValueError:
        value = raw
    *parents, leaf = dotted.split(".")
    node = body
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[leaf] = value
