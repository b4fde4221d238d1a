"""``kdq compress``: a whole job from a team's pipeline in one command, over HTTP only.

Uploads the teacher and the data (or takes the ids of earlier uploads), waits until they are
validated, submits the job, follows its event stream (resuming with ``Last-Event-ID`` when the
connection drops), and once the job succeeded downloads every artifact into ``--out``,
checking each sha256 (a file already there with the right hash is kept, so a rerun resumes).
The job's metrics summary goes to stdout as JSON; progress goes to stderr.

Exit status: 0 the job succeeded; 1 it failed or was cancelled; 2 the service refused a
request or an upload is invalid (its problem is printed); 3 the service could not be reached.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import secrets
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import httpx

SUCCEEDED, TERMINAL = "SUCCEEDED", ("SUCCEEDED", "FAILED", "CANCELLED")
UPLOAD_ID = {"models": re.compile(r"^mdl_[0-9a-f]+$"), "datasets": re.compile(r"^ds_[0-9a-f]+$")}
RECONNECTS = 20
"""Times in a row the event stream may drop before the command gives up (with a pause between)."""
STREAM_TIMEOUT = httpx.Timeout(30, read=60)
"""The service sends a keepalive every 15 s: a minute of silence is a dead connection (resumed)."""
SLOW_VALIDATION_S = 30.0


class ClientError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def describe(r: httpx.Response) -> str:
    """A refused request as one readable block: status, title, detail, and each bad field."""
    try:
        body = r.json()
    except ValueError:
        return f"HTTP {r.status_code}: {r.text[:500]}"
    if not isinstance(body, dict):
        return f"HTTP {r.status_code}: {body}"
    lines = [f"HTTP {r.status_code} {body.get('title', '')}: {body.get('detail', '')}".rstrip(": ")]
    for error in body.get("errors") or []:
        lines.append(f"  {error.get('pointer', '')}: {error.get('detail', '')}")
    return "\n".join(lines)


def _check(r: httpx.Response, *ok: int) -> dict[str, Any]:
    if r.status_code not in ok:
        raise ClientError(2, describe(r))
    return r.json()


class Session:
    """The calls one ``kdq compress`` makes; ``log`` receives the progress lines."""

    def __init__(self, client: httpx.Client, log: TextIO = sys.stderr, poll_s: float = 0.25) -> None:
        self.client, self.log, self.poll_s = client, log, poll_s

    def say(self, line: str) -> None:
        print(line, file=self.log, flush=True)

    def upload(self, kind: str, source: str, fields: dict[str, str]) -> str:
        """The id of a ready upload: ``source`` is a file to upload, or the id of an earlier upload."""
        path = Path(source)
        if not path.exists() and UPLOAD_ID[kind].match(source):
            ident = source
        elif not path.is_file():
            raise ClientError(2, f"{source}: no such file (nor the id of an earlier upload)")
        else:
            self.say(f"uploading {path} ({path.stat().st_size} bytes) to /v1/{kind}")
            with open(path, "rb") as f:
                r = self.client.post(f"/v1/{kind}", files={"file": (path.name, f)}, data=fields)
            ident = _check(r, 201)["id"]
        started, hinted = time.monotonic(), False
        while True:
            body = _check(self.client.get(f"/v1/{kind}/{ident}"), 200)
            if body["state"] == "ready":
                self.say(f"{kind[:-1]} {ident} ready: {json.dumps(body.get('summary') or {})[:300]}")
                return ident
            if body["state"] == "invalid":
                reason = (body.get("error") or {}).get("detail", "no reason given")
                raise ClientError(2, f"{kind[:-1]} {ident} is invalid: {reason}")
            if not hinted and time.monotonic() - started > SLOW_VALIDATION_S:
                hinted = True
                self.say(f"{kind[:-1]} {ident} still validating after {SLOW_VALIDATION_S:.0f} s "
                         "(a worker on the validate queue checks it); still waiting")  # fmt: skip
            time.sleep(self.poll_s)

    def submit(self, body: dict[str, Any], idempotency_key: str) -> str:
        r = self.client.post("/v1/jobs", json=body, headers={"Idempotency-Key": idempotency_key})
        job = _check(r, 202)
        self.say(f"job {job['id']} {job['state']} (queue {job['queue']})")
        return job["id"]

    def events(self, job_id: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """The job's events as (kind, data) until its terminal state, across dropped connections."""
        last_id: str | None = None
        drops = 0
        while True:
            headers = {"Last-Event-ID": last_id} if last_id else {}
            kind, reason = "message", "the stream ended before the job did"
            try:
                with self.client.stream(
                    "GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=STREAM_TIMEOUT
                ) as r:
                    if r.status_code != 200:
                        r.read()
                        raise ClientError(2, describe(r))
                    for line in r.iter_lines():
                        if not line:  # the end of one event
                            kind = "message"
                        elif line.startswith("id: "):
                            last_id = line[4:]
                        elif line.startswith("event: "):
                            kind = line[7:]
                        elif line.startswith("data: "):
                            data = json.loads(line[6:])
                            drops = 0
                            yield kind, data
                            if kind == "state" and data.get("state") in TERMINAL:
                                return
            except httpx.TransportError as exc:
                reason = str(exc) or type(exc).__name__
            drops += 1
            if drops > RECONNECTS:
                raise ClientError(3, f"lost the event stream of job {job_id}: {reason}")
            self.say(f"event stream interrupted ({reason}); resuming after event {last_id}")
            time.sleep(min(0.5 * drops, 5.0))

    def follow(self, job_id: str) -> dict[str, Any]:
        """Print the job's progress until it ends; its final state event."""
        for kind, data in self.events(job_id):
            if kind == "progress":
                eta = f" eta {data['eta_s']:.0f}s" if data.get("eta_s") is not None else ""
                loss = f" loss {data['loss']:.4g}" if data.get("loss") is not None else ""
                self.say(f"[{data.get('stage')}] {data.get('step')}/{data.get('total')}{loss}{eta}")
            elif kind == "log":
                self.say(f"[{data.get('stage') or '-'}] {data.get('message')}")
            elif kind == "state":
                self.say(f"job {job_id} {data.get('state')}")
                if data.get("state") in TERMINAL:
                    return data
        raise ClientError(3, f"the event stream of job {job_id} ended before the job did")

    def download(self, job_id: str, out: Path) -> list[Path]:
        """Every artifact into ``out``, each checked against its sha256 (kept when already there)."""
        out.mkdir(parents=True, exist_ok=True)
        listed = _check(self.client.get(f"/v1/jobs/{job_id}/artifacts"), 200)["items"]
        paths = []
        for art in listed:
            dest = out / Path(art["name"]).name
            paths.append(dest)
            if dest.is_file() and _sha256(dest) == art["sha256"]:
                self.say(f"{dest} already there")
                continue
            partial = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.part")
            digest = hashlib.sha256()
            try:
                with self.client.stream("GET", f"/v1/jobs/{job_id}/artifacts/{art['name']}") as r:
                    if r.status_code != 200:
                        r.read()
                        raise ClientError(2, describe(r))
                    with open(partial, "wb") as f:
                        for chunk in r.iter_bytes(1 << 20):
                            digest.update(chunk)
                            f.write(chunk)
                if digest.hexdigest() != art["sha256"]:
                    raise ClientError(3, f"{art['name']}: the download does not match its sha256; try again")
                os.replace(partial, dest)
            finally:
                partial.unlink(missing_ok=True)
            self.say(f"{dest} ({art['size_bytes']} bytes, sha256 ok)")
        return paths


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _spec(value: str | None) -> dict[str, Any]:
    if not value:
        return {}
    text = Path(value).read_text() if not value.lstrip().startswith("{") else value
    try:
        spec = json.loads(text)
    except ValueError as exc:
        raise ClientError(2, f"--spec is not JSON: {exc}") from None
    if not isinstance(spec, dict):
        raise ClientError(2, "--spec must be a JSON object (the job's fields)")
    return spec


def _options(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ClientError(2, f"--data-option {pair!r}: expected KEY=VALUE")
        out[key] = value
    return out


def run(args: argparse.Namespace, stdout: TextIO = sys.stdout) -> int:
    headers = {"Authorization": f"Bearer {args.key}"} if args.key else {}
    timeout = httpx.Timeout(60, connect=10)
    try:
        with httpx.Client(base_url=args.url, headers=headers, timeout=timeout) as client:
            s = Session(client)
            body = _spec(args.spec)
            data_fields = {"format": args.data_format, **_options(args.data_option)}
            body["teacher_model_id"] = s.upload("models", args.teacher, {"format": args.teacher_format})
            body["dataset_id"] = s.upload("datasets", args.data, data_fields)
            if args.eval_data:
                body["eval_dataset_id"] = s.upload("datasets", args.eval_data, data_fields)
            job_id = s.submit(body, args.idempotency_key or secrets.token_hex(16))
            end = s.follow(job_id)
            job = _check(client.get(f"/v1/jobs/{job_id}"), 200)
            if end.get("state") != SUCCEEDED:
                problem = job.get("error") or end.get("error") or {}
                s.say(f"job {job_id} {end.get('state')}: {problem.get('detail', '')}".rstrip(": "))
                return 1
            if not args.no_download:
                s.download(job_id, Path(args.out or f"kdq-{job_id}"))
            print(json.dumps({"job_id": job_id, "summary": job.get("summary")}, indent=2), file=stdout)
            return 0
    except ClientError as exc:
        print(f"kdq compress: {exc}", file=sys.stderr)
        return exc.status
    except httpx.TransportError as exc:
        print(f"kdq compress: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("kdq compress: interrupted; the job (if submitted) goes on in the service", file=sys.stderr)
        return 130


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "compress",
        help="run a whole job against a kdq service: upload, submit, follow, download",
        description="\n\n".join((__doc__ or "").split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--url", default=os.environ.get("KDQ_URL", "http://127.0.0.1:8000"),
                   help="the service (default: KDQ_URL or http://127.0.0.1:8000)")  # fmt: skip
    p.add_argument("--key", default=os.environ.get("KDQ_API_KEY"), help="the team's API key (default: KDQ_API_KEY)")
    p.add_argument("--teacher", required=True, help="the teacher's file, or the id of an earlier upload (mdl_…)")
    p.add_argument("--teacher-format", default="auto", help="zoo_zip, hf_zip, onnx, … (default: auto)")
    p.add_argument("--data", required=True, help="the dataset's file, or the id of an earlier upload (ds_…)")
    p.add_argument("--data-format", default="auto", help="npz, safetensors, csv, parquet, jsonl, … (default: auto)")
    p.add_argument("--data-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a dataset form field, e.g. label_column=species (repeatable)")  # fmt: skip
    p.add_argument("--eval-data", help="a held-out evaluation set (file or ds_… id), read like --data")
    p.add_argument("--spec", help="the job's fields as JSON, or a JSON file (student, distillation, …)")
    p.add_argument("--idempotency-key", help="send this Idempotency-Key: a rerun finds the same job")
    p.add_argument("--out", help="where the artifacts go (default: ./kdq-<job id>)")
    p.add_argument("--no-download", action="store_true", help="do not download the artifacts")
    p.set_defaults(func=run)
