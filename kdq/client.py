"""`Client`: every call of the kdq HTTP API as a method, with typed results (`kdq.models`).

Errors are `kdq.errors` exceptions with the exit status the ``kdq`` command gives them. Event
streams resume after the last event seen (``Last-Event-ID``) when a connection drops; downloads
are checked against their sha256 and written atomically (a file already there with the right
hash is kept, so a rerun resumes).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

import httpx

from .errors import JobFailed, Refused, Unreachable, UploadInvalid
from .models import TERMINAL, Artifact, Delivery, Job, Me, Upload, WebhookSecret
from .packing import packed
from .progress import JobView, UploadView

DEFAULT_URL = "http://127.0.0.1:8000"
RECONNECTS = 20
"""Times in a row an event stream may drop before `Client.events` gives up (pausing between)."""
STREAM_TIMEOUT = httpx.Timeout(30, read=60)
"""The service sends a keepalive every 15 s: a minute of silence is a dead connection (resumed)."""
SLOW_VALIDATION_S = 30.0
DATASET_SUFFIXES = {".npz", ".csv", ".tsv", ".parquet", ".jsonl", ".json"}
MODEL_SUFFIXES = {".onnx", ".pt2", ".ts", ".torchscript"}


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class _Counting:
    """A file whose reads advance an `UploadView` (httpx streams multipart files by ``read``)."""

    def __init__(self, f: Any, view: UploadView) -> None:
        self.f, self.view, self.name = f, view, f.name

    def read(self, n: int = -1) -> bytes:
        chunk = self.f.read(n)
        self.view.advance(len(chunk))
        return chunk

    def fileno(self) -> int:
        return self.f.fileno()

    def seek(self, *args: Any) -> int:
        return self.f.seek(*args)

    def tell(self) -> int:
        return self.f.tell()


class Client:
    """A kdq service. ``url`` and ``key`` default to ``KDQ_URL`` and ``KDQ_API_KEY``; ``log``
    receives the progress lines and bars (stderr)."""

    def __init__(self, url: str | None = None, key: str | None = None, *, timeout: float = 60,
                 log: TextIO | None = None, poll_s: float = 0.25, http: httpx.Client | None = None) -> None:  # fmt: skip
        self.url = (url or os.environ.get("KDQ_URL") or DEFAULT_URL).rstrip("/")
        key = key if key is not None else os.environ.get("KDQ_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = http or httpx.Client(base_url=self.url, headers=headers, timeout=httpx.Timeout(timeout, connect=10))
        self.log, self.poll_s = log or sys.stderr, poll_s

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def say(self, line: str) -> None:
        print(line, file=self.log, flush=True)

    # --- plumbing -------------------------------------------------------------------------------

    def request(self, method: str, path: str, *ok: int, **kw: Any) -> httpx.Response:
        try:
            r = self.http.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise Unreachable(f"cannot reach {self.url}: {exc or type(exc).__name__}") from None
        if r.status_code not in (ok or (200,)):
            raise Refused.of(r)
        return r

    def _get(self, path: str, **params: Any) -> Any:
        clean = {k: v for k, v in params.items() if v not in (None, [], ())}
        return self.request("GET", path, params=clean).json()

    def _pages(self, path: str, limit: int | None, params: dict[str, Any]) -> Iterator[dict[str, Any]]:
        token, seen = None, 0
        while True:
            page_size = min(200, limit - seen) if limit else 100
            body = self._get(path, **params, page_size=page_size, page_token=token)
            for item in body["items"]:
                yield item
                seen += 1
                if limit and seen >= limit:
                    return
            token = body.get("next_page_token")
            if not token:
                return

    # --- who --------------------------------------------------------------------------------------

    def me(self) -> Me:
        return Me.model_validate(self._get("/v1/me")).bind(self)

    def webhook_secret(self, rotate: bool = False) -> WebhookSecret:
        """The team's webhook secret's version, or (``rotate``) a new secret, shown only now."""
        if rotate:
            return WebhookSecret.model_validate(self.request("POST", "/v1/webhooks/secret", 201).json())
        return WebhookSecret.model_validate(self._get("/v1/webhooks/secret"))

    # --- uploads ----------------------------------------------------------------------------------

    def upload(self, path: str | Path, *, kind: str | None = None, format: str = "auto", name: str | None = None,
               tags: list[str] | tuple[str, ...] = (), progress: bool = False, wait: bool = True,
               reuse_tag: str | None = None, **options: Any) -> Upload:  # fmt: skip
        """Upload a teacher (``kind="model"``) or a dataset (``"dataset"``; guessed from the
        suffix when not given), and (``wait``) wait for its validation: an invalid upload raises
        `UploadInvalid` with the reason. ``options``: the dataset's reading fields
        (``label_column=…``). A folder (a transformers ``save_pretrained`` one, say) and an ONNX graph
        with its external data file beside it are zipped first (`kdq.packing`). ``reuse_tag``: the
        oldest upload carrying this tag with the same sha256 (and not invalid) is taken instead of
        uploading again, else the new upload gets the tag (how ``kdq compress --idempotency-key``
        reruns find their uploads)."""
        path = Path(path)
        if not path.is_file() and not path.is_dir():
            raise UploadInvalid(f"{path}: no such file or folder")
        kind = kind or ("dataset" if path.suffix.lower() in DATASET_SUFFIXES else
                        "model" if path.suffix.lower() in MODEL_SUFFIXES or path.is_dir() else None)  # fmt: skip
        if kind not in ("model", "dataset"):
            raise UploadInvalid(f"{path}: say kind='model' or kind='dataset' (the suffix does not tell)")
        with packed(path, format) as (sent, sent_format):  # a folder, or a graph with its .onnx.data: one zip
            if reuse_tag and (earlier := self._tagged(kind, reuse_tag, _sha256(sent))) is not None:
                if progress:
                    self.say(f"{kind} {earlier.id}: the same file, uploaded before under this key; reused")
                return self.wait_upload(earlier.id) if wait else earlier
            tags = [*tags, reuse_tag] if reuse_tag else tags
            fields = {"format": sent_format, **{k: _form_value(v) for k, v in options.items()}}
            if name:
                fields["name"] = name
            if tags:
                fields["tags"] = ",".join(tags)
            view = UploadView(sent.name, sent.stat().st_size, self.log, "auto" if progress else "quiet")
            try:
                with open(sent, "rb") as f:
                    r = self.request("POST", f"/v1/{kind}s", 201, files={"file": (sent.name, _Counting(f, view))},
                                     data=fields)  # fmt: skip
            finally:
                view.close()
        up = Upload.model_validate(r.json()).bind(self)
        return self.wait_upload(up.id) if wait else up

    def _tagged(self, kind: str, tag: str, sha256: str) -> Upload | None:
        """The oldest upload of ``kind`` with ``tag`` and these bytes that is not invalid."""
        same = [u for u in self.uploads(f"{kind}s", tag=tag) if u.sha256 == sha256 and u.state != "invalid"]
        return same[-1] if same else None  # (listed newest first)

    def get_upload(self, ident: str) -> Upload:
        kind = "models" if ident.startswith("mdl_") else "datasets"
        return Upload.model_validate(self._get(f"/v1/{kind}/{ident}")).bind(self)

    def wait_upload(self, ident: str) -> Upload:
        """Until validated: the ready upload, or `UploadInvalid` with the reason."""
        started, hinted = time.monotonic(), False
        while True:
            up = self.get_upload(ident)
            if up.state == "ready":
                return up
            if up.state == "invalid":
                reason = up.error.detail if up.error and up.error.detail else "no reason given"
                problem = up.error.model_dump(exclude_none=True) if up.error else None
                raise UploadInvalid(f"{up.kind} {ident} is invalid: {reason}", problem)
            if not hinted and time.monotonic() - started > SLOW_VALIDATION_S:
                hinted = True
                self.say(f"{up.kind} {ident} still validating after {SLOW_VALIDATION_S:.0f} s "
                         "(a worker on the validate queue checks it); still waiting")  # fmt: skip
            time.sleep(self.poll_s)

    def uploads(self, kind: str = "models", *, state: str | None = None, name: str | None = None,
                tag: list[str] | str | None = None, created_after: datetime | str | None = None,
                created_before: datetime | str | None = None, limit: int | None = None) -> Iterator[Upload]:  # fmt: skip
        params = {"state": state, "name": name, "tag": [tag] if isinstance(tag, str) else tag,
                  "created_after": _when(created_after), "created_before": _when(created_before)}  # fmt: skip
        for item in self._pages(f"/v1/{kind}", limit, params):
            yield Upload.model_validate(item).bind(self)

    def delete_upload(self, ident: str) -> None:
        kind = "models" if ident.startswith("mdl_") else "datasets"
        self.request("DELETE", f"/v1/{kind}/{ident}", 204)

    # --- jobs -------------------------------------------------------------------------------------

    def submit(self, spec: dict[str, Any] | None = None, /, *, teacher: Upload | str | None = None,
               dataset: Upload | str | None = None, eval_dataset: Upload | str | None = None,
               idempotency_key: str | None = None, **fields: Any) -> Job:  # fmt: skip
        """Submit a job: ``spec`` (a dict of the job's fields) and/or keyword fields (``student=…``,
        ``name=…``, ``tags=[…]``, ``notify={"url": …}``); ``teacher``/``dataset`` take uploads or ids."""
        body: dict[str, Any] = {**(spec or {}), **fields}
        for key, value in (("teacher_model_id", teacher), ("dataset_id", dataset), ("eval_dataset_id", eval_dataset)):
            if value is not None:
                body[key] = value.id if isinstance(value, Upload) else value
        headers = {"Idempotency-Key": idempotency_key or secrets.token_hex(16)}
        return Job.model_validate(self.request("POST", "/v1/jobs", 202, json=body, headers=headers).json()).bind(self)

    def job(self, ident: str) -> Job:
        return Job.model_validate(self._get(f"/v1/jobs/{ident}")).bind(self)

    def jobs(self, *, state: list[str] | str | None = None, name: str | None = None,
             tag: list[str] | str | None = None, teacher: str | None = None, dataset: str | None = None,
             created_after: datetime | str | None = None, created_before: datetime | str | None = None,
             limit: int | None = None) -> Iterator[Job]:  # fmt: skip
        """Jobs, newest first, matching every filter given (paged as you iterate)."""
        params = {"state": [state] if isinstance(state, str) else state, "name": name,
                  "tag": [tag] if isinstance(tag, str) else tag, "teacher": teacher, "dataset": dataset,
                  "created_after": _when(created_after), "created_before": _when(created_before)}  # fmt: skip
        for item in self._pages("/v1/jobs", limit, params):
            yield Job.model_validate(item).bind(self)

    def cancel(self, ident: str) -> Job:
        return Job.model_validate(self.request("POST", f"/v1/jobs/{ident}/cancel", 202).json()).bind(self)

    def delete_job(self, ident: str) -> Job:
        """Delete a finished job's files (it stays as a record, ``deleted_at`` set)."""
        return Job.model_validate(self.request("DELETE", f"/v1/jobs/{ident}", 200).json()).bind(self)

    def delete_artifact(self, ident: str, name: str) -> None:
        self.request("DELETE", f"/v1/jobs/{ident}/artifacts/{name}", 204)

    def metrics(self, ident: str) -> dict[str, Any]:
        return self._get(f"/v1/jobs/{ident}/metrics")

    def deliveries(self, ident: str) -> list[Delivery]:
        return [Delivery.model_validate(d) for d in self._get(f"/v1/jobs/{ident}/deliveries")["items"]]

    def artifacts(self, ident: str) -> list[Artifact]:
        return [Artifact.model_validate(a) for a in self._get(f"/v1/jobs/{ident}/artifacts")["items"]]

    def events(self, ident: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """The job's events as (kind, data) until its terminal state, across dropped connections."""
        last_id: str | None = None
        drops = 0
        while True:
            headers = {"Last-Event-ID": last_id} if last_id else {}
            kind, reason = "message", "the stream ended before the job did"
            try:
                with self.http.stream("GET", f"/v1/jobs/{ident}/events", headers=headers, timeout=STREAM_TIMEOUT) as r:
                    if r.status_code == 204:  # finished, nothing after last_id
                        return
                    if r.status_code != 200:
                        r.read()
                        raise Refused.of(r)
                    for line in r.iter_lines():
                        if not line:
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
                raise Unreachable(f"lost the event stream of job {ident}: {reason}")
            self.say(f"event stream interrupted ({reason}); resuming after event {last_id}")
            time.sleep(min(0.5 * drops, 5.0))

    def wait(self, ident: str, progress: bool | JobView = False, *, raise_on_failure: bool = True,
             timeout: float | None = None) -> Job:  # fmt: skip
        """Follow the job until it ends; its final document (`JobFailed` unless it succeeded,
        with ``raise_on_failure``). ``timeout``: seconds, then `TimeoutError`."""
        view = progress if isinstance(progress, JobView) else JobView(self.log, "auto" if progress else "quiet", ident)
        view.job_id = ident
        deadline = time.monotonic() + timeout if timeout else None
        job = self.job(ident)
        if job.started_at is not None and not job.finished:
            view.started -= max(0.0, time.time() - job.started_at.timestamp())
        state: str | None = None
        try:
            if not job.finished:
                for kind, data in self.events(ident):
                    view.event(kind, data)
                    if kind == "state" and data.get("state") in TERMINAL:
                        break
                    if deadline and time.monotonic() > deadline:
                        raise TimeoutError(f"job {ident} still {data.get('state', 'running')} after {timeout} s")
            job = self.job(ident)
            state = job.state
        finally:
            view.close(state, job.error.detail if state and state != "SUCCEEDED" and job.error else None)
        if raise_on_failure and not job.succeeded:
            raise JobFailed(job)
        return job

    def download(self, ident: str, folder: Path, names: list[str] | None = None) -> list[Path]:
        """Every artifact (or those ``names``) into ``folder``, each checked against its sha256."""
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for art in self.artifacts(ident):
            if names and art.name not in names:
                continue
            dest = folder / Path(art.name).name
            paths.append(dest)
            if dest.is_file() and _sha256(dest) == art.sha256:
                self.say(f"{dest} already there")
                continue
            partial = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.part")
            digest = hashlib.sha256()
            try:
                # (a large artifact may answer with a redirect to the object store; httpx drops the
                # Authorization header when it leaves the service's origin)
                with self.http.stream("GET", f"/v1/jobs/{ident}/artifacts/{art.name}", follow_redirects=True) as r:
                    if r.status_code != 200:
                        r.read()
                        raise Refused.of(r)
                    with open(partial, "wb") as f:
                        for chunk in r.iter_bytes(1 << 20):
                            digest.update(chunk)
                            f.write(chunk)
                if digest.hexdigest() != art.sha256:
                    raise Unreachable(f"{art.name}: the download does not match its sha256; try again")
                os.replace(partial, dest)
            except httpx.TransportError as exc:
                raise Unreachable(f"downloading {art.name}: {exc or type(exc).__name__}") from None
            finally:
                partial.unlink(missing_ok=True)
            self.say(f"{dest} ({art.size_bytes} bytes, sha256 ok)")
        return paths


def _when(value: datetime | str | None) -> str | None:
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def _form_value(value: Any) -> str:
    """A reading option as a form field: lists (``target_columns=["load"]``) as JSON, the rest as text."""
    return json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
