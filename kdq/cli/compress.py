"""``kdq compress``: a whole job from a team's pipeline in one command, over HTTP only.

Uploads the teacher and the data (or takes the ids of earlier uploads), waits until they are
validated, submits the job, follows its event stream (resuming with ``Last-Event-ID`` when the
connection drops), and once the job succeeded downloads every artifact into ``--out``,
checking each sha256 (a file already there with the right hash is kept, so a rerun resumes).
The job's metrics summary goes to stdout as JSON; progress goes to stderr: one live bar on a
terminal, a few plain lines elsewhere, nothing with ``--quiet``.

Exit status: 0 the job succeeded; 1 it failed or was cancelled; 2 the service refused a
request or an upload is invalid; 3 the service could not be reached. On failure the problem is
printed on stderr and, as JSON (``{"error": …}``), on stdout.
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
from pathlib import Path
from typing import Any

from ..client import Client
from ..errors import KdqError
from ..progress import JobView
from .common import pairs, progress_mode, service_options, spec_arg

UPLOAD_ID = {"model": re.compile(r"^mdl_[0-9a-f]+$"), "dataset": re.compile(r"^ds_[0-9a-f]+$")}


def _upload(client: Client, kind: str, source: str, fmt: str, quiet: bool, **options: Any) -> str:
    """The id of a ready upload: ``source`` is a file to upload, or the id of an earlier upload."""
    path = Path(source)
    if not path.exists() and UPLOAD_ID[kind].match(source):
        up = client.wait_upload(source)
    elif not path.exists():
        raise KdqError(f"{source}: no such file or folder (nor the id of an earlier upload)")
    else:
        up = client.upload(path, kind=kind, format=fmt, progress=not quiet, **options)
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
    body["teacher_model_id"] = _upload(client, "model", args.teacher, args.teacher_format, args.quiet)
    body["dataset_id"] = _upload(client, "dataset", args.data, args.data_format, args.quiet, **options)
    if args.eval_data:
        body["eval_dataset_id"] = _upload(client, "dataset", args.eval_data, args.data_format, args.quiet, **options)
    job = client.submit(body, idempotency_key=args.idempotency_key or secrets.token_hex(16))
    view = JobView(mode=progress_mode(args), job_id=job.id)  # type: ignore[arg-type]
    if not args.quiet:
        view.say(f"job {job.id} {job.state} (queue {job.queue})")
    job = client.wait(job.id, progress=view)
    paths = [] if args.no_download else client.download(job.id, Path(args.out or f"kdq-{job.id}"))
    result = {"job_id": job.id, "state": job.state, "summary": job.summary, "files": [str(p) for p in paths]}
    print(json.dumps(result, indent=2, default=str))
    return 0


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
    p.add_argument("--idempotency-key", help="send this Idempotency-Key: a rerun finds the same job")
    p.add_argument("--out", help="where the artifacts go (default: ./kdq-<job id>)")
    p.add_argument("--no-download", action="store_true", help="do not download the artifacts")
    p.add_argument("--progress", choices=["auto", "bar", "lines"], default="auto",
                   help="a live bar (the default on a terminal) or plain lines (elsewhere)")  # fmt: skip
    p.set_defaults(handler=compress)
