"""``kdq compress``: a whole job from a team's pipeline in one command, over HTTP only.

Uploads the teacher and the data (or takes the ids of earlier uploads), waits until they are
validated, submits the job, follows its event stream (resuming with ``Last-Event-ID`` when the
connection drops), and once the job succeeded downloads every artifact into ``--out``,
checking each sha256 (a file already there with the right hash is kept, so a rerun resumes).
The job's metrics summary goes to stdout as JSON; progress goes to stderr: one live bar on a
terminal, a few plain lines elsewhere, nothing with ``--quiet``.

With ``--idempotency-key K`` the uploads are tagged ``kdq-idem:<digest of K, role, format and
options>``, and a rerun with the same key reuses the tagged upload whose sha256 matches the file
instead of uploading it again: an identical rerun finds the same job; other files or another spec
under the same key are refused (exit 2).

Exit status: 0 the job succeeded; 1 it failed or was cancelled; 2 the service refused a
request or an upload is invalid; 3 the service could not be reached; 4 the job succeeded but its
verdict is do_not_ship (its files are still downloaded, for inspection; ``--allow-do-not-ship``
makes that 0). On failure the problem is printed on stderr and, as JSON (``{"error": …}``), on
stdout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import secrets
from pathlib import Path
from typing import Any

from ..client import Client
from ..errors import KdqError, Refused
from ..progress import JobView
from .common import pairs, progress_mode, service_options, spec_arg

UPLOAD_ID = {"model": re.compile(r"^mdl_[0-9a-f]+$"), "dataset": re.compile(r"^ds_[0-9a-f]+$")}
DO_NOT_SHIP = 4
"""The exit status of a job that succeeded with the verdict do_not_ship (without --allow-do-not-ship)."""


def reuse_tag(key: str | None, role: str, fmt: str, options: dict[str, Any]) -> str | None:
    """The tag that marks the upload of ``role`` (teacher, data, eval) under an idempotency key, so
    that a rerun with the same key finds it: a digest of the key, the role, the format and the
    reading options (other options under the same key are another upload, and so another job body)."""
    if not key:
        return None
    what = json.dumps([key, role, fmt, sorted(options.items())], default=str)
    return "kdq-idem:" + hashlib.sha256(what.encode()).hexdigest()[:40]


def _upload(client: Client, kind: str, source: str, fmt: str, quiet: bool, reuse: str | None = None,
            **options: Any) -> str:  # fmt: skip
    """The id of a ready upload: ``source`` is a file to upload, or the id of an earlier upload."""
    path = Path(source)
    if not path.exists() and UPLOAD_ID[kind].match(source):
        up = client.wait_upload(source)
    elif not path.exists():
        raise KdqError(f"{source}: no such file or folder (nor the id of an earlier upload)")
    else:
        up = client.upload(path, kind=kind, format=fmt, progress=not quiet, reuse_tag=reuse, **options)
    if not quiet:
        client.say(f"{kind} {up.id} ready: {json.dumps(up.summary or {})[:300]}")
    return up.id


def compress(args: argparse.Namespace, client: Client) -> int:
    args.json = True  # stdout is JSON: the summary, or the error
    body = spec_arg(args.spec)
    options = pairs(args.data_option, "--data-option")
    if args.name:
        body["name"] = args.name
    if args.tag:
        body["tags"] = args.tag
    if args.notify:
        body["notify"] = {"url": args.notify}
    key = args.idempotency_key
    body["teacher_model_id"] = _upload(client, "model", args.teacher, args.teacher_format, args.quiet,
                                       reuse_tag(key, "teacher", args.teacher_format, {}))  # fmt: skip
    body["dataset_id"] = _upload(client, "dataset", args.data, args.data_format, args.quiet,
                                 reuse_tag(key, "data", args.data_format, options), **options)  # fmt: skip
    if args.eval_data:
        body["eval_dataset_id"] = _upload(client, "dataset", args.eval_data, args.data_format, args.quiet,
                                          reuse_tag(key, "eval", args.data_format, options), **options)  # fmt: skip
    try:
        job = client.submit(body, idempotency_key=key or secrets.token_hex(16))
    except Refused as exc:
        if not key or not any(e.get("parameter") == "Idempotency-Key" for e in exc.problem.get("errors") or []):
            raise
        raise Refused(exc.status, exc.problem, f"{exc}\n  --idempotency-key {key!r} was used before with other "
                      "files, data options or spec: a rerun under the same key must send the same ones "
                      "(a new job needs a new key)") from None  # fmt: skip
    view = JobView(mode=progress_mode(args), job_id=job.id)  # type: ignore[arg-type]
    if not args.quiet:
        view.say(f"job {job.id} {job.state} (queue {job.queue})")
    job = client.wait(job.id, progress=view)
    paths = [] if args.no_download else client.download(job.id, Path(args.out or f"kdq-{job.id}"))
    label = (job.verdict or {}).get("label")
    result = {"job_id": job.id, "state": job.state, "verdict": label, "summary": job.summary,
              "files": [str(p) for p in paths]}  # fmt: skip
    status = DO_NOT_SHIP if label == "do_not_ship" and not args.allow_do_not_ship else 0
    if status:
        result["exit_code"] = status
        headline = (job.verdict or {}).get("headline") or "; ".join(
            str(r.get("message", r)) if isinstance(r, dict) else str(r) for r in (job.verdict or {}).get("reasons", []))
        where = f"; its files are in {args.out or f'kdq-{job.id}'} for inspection" if paths else ""
        client.say(f"kdq compress: job {job.id} succeeded but its verdict is do_not_ship ({headline}){where}; "
                   f"exit {status} (--allow-do-not-ship accepts it)")  # fmt: skip
    print(json.dumps(result, indent=2, default=str))
    return status


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "compress",
        parents=[service_options()],
        help="run a whole job against a kdq service: upload, submit, follow, download",
        description="\n\n".join((__doc__ or "").split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--teacher", required=True, help="the teacher's file, or the id of an earlier upload (mdl_…)")
    p.add_argument("--teacher-format", default="auto", help="zoo_zip, hf_zip, onnx, … (default: auto)")
    p.add_argument("--data", required=True, help="the dataset's file, or the id of an earlier upload (ds_…)")
    p.add_argument("--data-format", default="auto", help="npz, safetensors, csv, parquet, jsonl, … (default: auto)")
    p.add_argument("--data-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a dataset form field, e.g. label_column=species (repeatable)")  # fmt: skip
    p.add_argument("--eval-data", help="a held-out evaluation set (file or ds_… id), read like --data")
    p.add_argument("--spec", help="the job's fields as JSON, or a JSON file (student, distillation, …)")
    p.add_argument("--name", help="the job's name (lists filter by its prefix)")
    p.add_argument("--tag", action="append", default=[], help="a tag for the job (repeatable)")
    p.add_argument("--notify", metavar="URL", help="a webhook: the job document is POSTed there when it ends")
    p.add_argument("--idempotency-key",
                   help="send this Idempotency-Key: a rerun finds the same job (and reuses the uploads)")  # fmt: skip
    p.add_argument("--out", help="where the artifacts go (default: ./kdq-<job id>)")
    p.add_argument("--no-download", action="store_true", help="do not download the artifacts")
    p.add_argument("--allow-do-not-ship", action="store_true",
                   help=f"exit 0 when the job's verdict is do_not_ship (else exit {DO_NOT_SHIP}, the files downloaded)")
    p.add_argument("--progress", choices=["auto", "bar", "lines"], default="auto",
                   help="a live bar (the default on a terminal) or plain lines (elsewhere)")  # fmt: skip
    p.set_defaults(handler=compress)
