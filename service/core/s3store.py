"""The blob store on S3 (or MinIO, or any S3-compatible server), chosen by ``KDQ_STORAGE_URL``.

Blobs are content-addressed as in the local store: ``<prefix>sha256/<aa>/<rest>``, written once,
never modified. The endpoint, region and credentials are boto3's usual ones (``AWS_ENDPOINT_URL_S3``
or ``AWS_ENDPOINT_URL``, ``AWS_REGION``, ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, profiles,
instance roles).

* An upload (`S3Writer`) is hashed as it streams and sent as a multipart upload to a staging key
  (``<prefix>staging/<random>``), a few parts in flight: no copy of the whole file in memory or on
  disk. The API's checks read a bounded sparse mirror (`service.core.s3mirror`). ``commit``
  copies the staged object to its content address (server side) and deletes the staging key;
  an upload smaller than one part is one PUT straight to its address. Nothing is listed under
  ``sha256/`` before it is complete; ``abort`` (or `S3Store.sweep_staging`, for what an
  unreachable store kept) removes what a failed upload left under ``staging/``.
* Downloads: `fetch` (ranged, parallel, to a worker's disk), `stream` (one byte range, for the
  API's Range answers) and `presign` (a redirect for large artifacts).
* Every call that fails for want of the store (connection refused, timeouts, a 5xx) raises
  `StoreUnavailable`: the API answers 503, a worker retries.
* Objects under mutable keys (`put_bytes`, `put_file_at`, `list_keys`, …) serve the resume
  checkpoints (`service.core.checkpoints`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO, TypeVar
from urllib.parse import quote

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError

from .s3mirror import Mirror, RangedReader, prefetch_for_inspection
from .settings import Settings
from .store import CHUNK, BlobRef, StoreUnavailable, check_sha256

log = logging.getLogger(__name__)
T = TypeVar("T")
PARTS_IN_FLIGHT = 4
"""Parts of one upload being sent at once (memory: this many parts, plus the one filling)."""
HEAD = 512


def parse_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` → (``bucket``, ``some/prefix/``)."""
    rest = url.removeprefix("s3://")
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {url!r}")
    prefix = prefix.strip("/")
    return bucket, (prefix + "/" if prefix else "")


def unavailable(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or what it wraps, as boto3's transfer errors do) means the store cannot be
    reached right now (worth retrying later)."""
    for _ in range(5):
        if exc is None:
            return False
        if isinstance(exc, StoreUnavailable | BotoConnectionError | HTTPClientError):
            return True
        if isinstance(exc, ClientError):
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            return status >= 500 or exc.response.get("Error", {}).get("Code") in ("SlowDown", "RequestTimeout")
        exc = exc.__cause__ or exc.__context__
    return False


def _not_found(exc: ClientError) -> bool:
    return exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound", "NoSuchUpload")


def calling(what: str, fn: Callable[[], T]) -> T:
    """``fn()``, with a store outage raised as `StoreUnavailable`."""
    try:
        return fn()
    except Exception as exc:
        if unavailable(exc) and not isinstance(exc, StoreUnavailable):
            raise StoreUnavailable(f"the object store is unreachable ({what}: {type(exc).__name__})") from exc
        raise


class S3Store:
    remote = True

    def __init__(self, url: str, *, tmp_dir: Path, part_bytes: int = 8 << 20, addressing_style: str = "auto",
                 timeout_s: float = 10.0, presign_min_bytes: int | None = None, presign_ttl_s: int = 300,
                 scan_bytes: int = 64 << 20, max_entries: int = 200_000) -> None:  # fmt: skip
        self.url = url
        self.bucket, self.prefix = parse_url(url)
        self.tmp_dir = tmp_dir
        self.part_bytes = part_bytes
        self.presign_min_bytes, self.presign_ttl_s = presign_min_bytes, presign_ttl_s
        self.scan_bytes, self.max_entries = scan_bytes, max_entries
        self.writing: set[str] = set()
        """Staging keys this process is writing: the staging sweep leaves them alone whatever the
        store says of their age (moto dates every multipart upload 2010-11-10)."""
        config = Config(
            retries={"max_attempts": 3, "mode": "standard"},
            connect_timeout=timeout_s,
            read_timeout=timeout_s,
            max_pool_connections=32,
            s3={"addressing_style": addressing_style},
        )
        self.client: Any = boto3.session.Session().client("s3", config=config)
        self.transfer = TransferConfig(multipart_threshold=part_bytes, multipart_chunksize=part_bytes,
                                       max_concurrency=PARTS_IN_FLIGHT)  # fmt: skip
        self.parts = ThreadPoolExecutor(16, thread_name_prefix="s3-parts")

    @classmethod
    def from_settings(cls, s: Settings) -> S3Store:
        return cls(s.storage_url, tmp_dir=s.data_dir / "s3-staging", part_bytes=s.s3_part_bytes,
                   addressing_style=s.s3_addressing_style, timeout_s=s.s3_timeout_s,
                   presign_min_bytes=s.s3_presign_min_bytes, presign_ttl_s=s.s3_presign_ttl_s,
                   scan_bytes=s.archive_scan_bytes, max_entries=s.archive_max_entries)  # fmt: skip

    # --- keys ----------------------------------------------------------------------------------

    def key(self, sha256: str) -> str:
        check_sha256(sha256)
        return f"{self.prefix}sha256/{sha256[:2]}/{sha256[2:]}"

    def staging_prefix(self) -> str:
        return self.prefix + "staging/"

    # --- the BlobStore interface -----------------------------------------------------------------

    def writer(self) -> S3Writer:
        return S3Writer(self)

    def put_file(self, path: Path) -> BlobRef:
        """Hash the file, then upload it to its address unless it is already there."""
        h, size = hashlib.sha256(), 0
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
                size += len(chunk)
        ref = BlobRef(h.hexdigest(), size)
        if not self.exists(ref.sha256):
            self.put_file_at(self.key(ref.sha256), path)
        return ref

    def exists(self, sha256: str) -> bool:
        return self.key_exists(self.key(sha256))

    def key_exists(self, key: str) -> bool:
        try:
            calling("HEAD", lambda: self.client.head_object(Bucket=self.bucket, Key=key))
            return True
        except ClientError as exc:
            if _not_found(exc):
                return False
            raise

    def size(self, sha256: str) -> int:
        head = calling("HEAD", lambda: self.client.head_object(Bucket=self.bucket, Key=self.key(sha256)))
        return int(head["ContentLength"])

    def open(self, sha256: str) -> BinaryIO:
        body = calling("GET", lambda: self.client.get_object(Bucket=self.bucket, Key=self.key(sha256)))["Body"]
        return body  # type: ignore[no-any-return]

    def local_path(self, sha256: str) -> Path | None:
        return None

    def fetch(self, sha256: str, dest: Path) -> Path:
        """Download (ranged parts in parallel) to a temp name beside ``dest``, then rename."""
        return self.download_key(self.key(sha256), dest)

    def delete(self, sha256: str) -> None:
        self.delete_keys([self.key(sha256)])

    # --- serving -------------------------------------------------------------------------------

    def stream(self, sha256: str, start: int, end: int) -> Iterator[bytes]:
        """Bytes ``[start, end)`` of the blob, as they arrive. The request is made now (so an
        unreachable store raises here, before an answer has started); the body is read lazily."""
        rng = f"bytes={start}-{end - 1}"
        try:
            body = calling("GET", lambda: self.client.get_object(Bucket=self.bucket, Key=self.key(sha256),
                                                                 Range=rng))  # fmt: skip
        except ClientError as exc:
            if _not_found(exc):
                raise FileNotFoundError(self.key(sha256)) from None
            raise
        return _chunks(body["Body"])

    def presign(self, sha256: str, *, filename: str, media_type: str, disposition: str) -> str:
        params = {
            "Bucket": self.bucket,
            "Key": self.key(sha256),
            "ResponseContentType": media_type,
            "ResponseContentDisposition": f"{disposition}; filename*=utf-8''{quote(filename)}",
        }
        url = self.client.generate_presigned_url("get_object", Params=params, ExpiresIn=self.presign_ttl_s)
        return str(url)

    def presigns(self, size: int) -> bool:
        return self.presign_min_bytes is not None and size >= self.presign_min_bytes

    # --- objects under mutable keys (checkpoints) -----------------------------------------------

    def put_file_at(self, key: str, path: Path) -> None:
        calling("PUT", lambda: self.client.upload_file(str(path), self.bucket, key, Config=self.transfer))

    def put_bytes(self, key: str, data: bytes) -> None:
        calling("PUT", lambda: self.client.put_object(Bucket=self.bucket, Key=key, Body=data))

    def get_bytes(self, key: str) -> bytes | None:
        try:
            body = calling("GET", lambda: self.client.get_object(Bucket=self.bucket, Key=key))["Body"]
        except ClientError as exc:
            if _not_found(exc):
                return None
            raise
        with body:
            return bytes(body.read())

    def download_key(self, key: str, dest: Path) -> Path:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
        try:
            calling("GET", lambda: self.client.download_file(self.bucket, key, str(tmp), Config=self.transfer))
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return dest

    def list_keys(self, prefix: str) -> list[dict[str, Any]]:
        """Every object under ``prefix``: ``Key``, ``Size``, ``LastModified``."""
        out: list[dict[str, Any]] = []
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        calling("LIST", lambda: [out.extend(page.get("Contents", [])) for page in pages])
        return out

    def delete_keys(self, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):
            batch = {"Objects": [{"Key": k} for k in keys[i : i + 1000]], "Quiet": True}
            calling("DELETE", lambda batch=batch: self.client.delete_objects(Bucket=self.bucket, Delete=batch))

    def sweep_staging(self, older_than_s: float = 3600.0) -> int:
        """Remove what failed uploads left under ``staging/`` (multipart uploads never completed or
        aborted, staged objects never copied) before ``older_than_s`` ago; how many."""
        cutoff = datetime.now(UTC) - timedelta(seconds=older_than_s)
        done = 0
        pages = self.client.get_paginator("list_multipart_uploads").paginate(
            Bucket=self.bucket, Prefix=self.staging_prefix()
        )
        uploads = [u for page in calling("LIST", lambda: list(pages)) for u in page.get("Uploads", [])]
        for u in uploads:
            if u["Initiated"] <= cutoff and u["Key"] not in self.writing:
                self.abort_upload(u["Key"], u["UploadId"])
                done += 1
        stale = [o["Key"] for o in self.list_keys(self.staging_prefix())
                 if o["LastModified"] <= cutoff and o["Key"] not in self.writing]
        self.delete_keys(stale)
        return done + len(stale)

    def abort_upload(self, key: str, upload_id: str) -> None:
        try:
            calling("ABORT", lambda: self.client.abort_multipart_upload(Bucket=self.bucket, Key=key,
                                                                         UploadId=upload_id))  # fmt: skip
        except ClientError as exc:
            if not _not_found(exc):
                raise


class S3Writer:
    """One upload on its way to S3 (see the module doc). `write` never raises for the store: a
    failure is kept, the rest of the body is dropped, and `staged_path` / `commit` raise
    `StoreUnavailable`, so the API answers 503 after reading the request."""

    def __init__(self, store: S3Store) -> None:
        self.store = store
        self._hash = hashlib.sha256()
        self._size = 0
        self._head = b""
        self._buf = bytearray()
        self._mirror = Mirror(store.tmp_dir, keep=store.part_bytes)
        self._staging = store.staging_prefix() + uuid.uuid4().hex
        store.writing.add(self._staging)
        self._upload_id: str | None = None
        self._parts: list[Future[dict[str, Any]]] = []
        self._slots = threading.BoundedSemaphore(PARTS_IN_FLIGHT)
        self._error: BaseException | None = None
        self._staged = False
        self._finished = False
        self._prefetched = False
        self._closed = False

    @property
    def size(self) -> int:
        return self._size

    def head(self) -> bytes:
        return self._head

    def write(self, data: bytes | memoryview) -> None:
        if len(self._head) < HEAD:
            self._head += bytes(data[: HEAD - len(self._head)])
        self._hash.update(data)
        self._mirror.write(self._size, data)
        self._size += len(data)
        if self._error is not None:
            return
        self._buf += data
        part = self.store.part_bytes
        while len(self._buf) >= part and self._error is None:
            with memoryview(self._buf) as view:
                piece = bytes(view[:part])
            del self._buf[:part]
            self._send(piece)

    def _send(self, data: bytes) -> None:
        s = self.store
        try:
            if self._upload_id is None:
                made = calling("create multipart upload",
                               lambda: s.client.create_multipart_upload(Bucket=s.bucket, Key=self._staging))
                self._upload_id = made["UploadId"]
        except Exception as exc:
            self._error = exc
            return
        self._slots.acquire()  # at most PARTS_IN_FLIGHT parts in memory
        number = len(self._parts) + 1
        future = s.parts.submit(self._upload_part, number, data)
        future.add_done_callback(lambda _: self._slots.release())
        self._parts.append(future)

    def _upload_part(self, number: int, data: bytes) -> dict[str, Any]:
        s = self.store
        try:
            answer = calling("upload part", lambda: s.client.upload_part(
                Bucket=s.bucket, Key=self._staging, UploadId=self._upload_id, PartNumber=number, Body=data))
        except BaseException as exc:
            self._error = self._error or exc
            raise
        return {"PartNumber": number, "ETag": answer["ETag"]}

    def _finish(self) -> None:
        """Everything received is in S3 (staged) or, for a small upload, in the mirror."""
        if self._finished:
            return
        if self._upload_id is not None and self._buf and self._error is None:
            self._send(bytes(self._buf))
            self._buf.clear()
        done = []
        for future in self._parts:
            try:
                done.append(future.result())
            except BaseException:
                pass
        if self._error is not None:
            raise StoreUnavailable(f"the object store failed during the upload: {self._error}") from self._error
        if self._upload_id is not None:
            s = self.store
            calling("complete multipart upload", lambda: s.client.complete_multipart_upload(
                Bucket=s.bucket, Key=self._staging, UploadId=self._upload_id, MultipartUpload={"Parts": done}))
            self._upload_id = None
            self._staged = True
        self._mirror.finish(self._size)
        self._finished = True

    def staged_path(self) -> Path:
        """A local file with every byte the API's checks read (the whole upload when it is small)."""
        self._finish()
        if not self._prefetched and not self._mirror.complete:
            s = self.store

            def fetch(start: int, end: int) -> bytes:
                rng = f"bytes={start}-{end - 1}"
                got = calling("GET", lambda: s.client.get_object(Bucket=s.bucket, Key=self._staging, Range=rng))
                with got["Body"] as body:
                    return bytes(body.read())

            reader = RangedReader(self._mirror, fetch)
            prefetch_for_inspection(reader, scan_bytes=s.scan_bytes, max_entries=s.max_entries)
            log.debug("upload of %d bytes: %d bytes mirrored for the checks (%d fetches)",
                      self._size, self._mirror.held_bytes(), reader.fetches)  # fmt: skip
        self._prefetched = True
        return self._mirror.path

    def commit(self) -> BlobRef:
        s = self.store
        self._finish()
        ref = BlobRef(self._hash.hexdigest(), self._size)
        key = s.key(ref.sha256)
        try:
            if not s.key_exists(key):
                if self._staged:
                    source = {"Bucket": s.bucket, "Key": self._staging}
                    calling("COPY", lambda: s.client.copy(source, s.bucket, key, Config=s.transfer))
                else:
                    with open(self._mirror.path, "rb") as f:
                        calling("PUT", lambda: s.client.put_object(Bucket=s.bucket, Key=key, Body=f,
                                                                   ContentLength=self._size))  # fmt: skip
        finally:
            self.abort()
        return ref

    def abort(self) -> None:
        """Drop the upload: what was sent to S3 and the local mirror. A no-op once done."""
        if self._closed:
            return
        self._closed = True
        for future in self._parts:
            future.cancel()
        s = self.store
        try:
            if self._upload_id is not None:
                for future in self._parts:
                    try:
                        future.result()
                    except BaseException:
                        pass
                s.abort_upload(self._staging, self._upload_id)
            if self._staged:
                s.delete_keys([self._staging])
        except Exception as exc:  # the store is away: `S3Store.sweep_staging` removes it later
            log.warning("could not remove the staged upload %s (%s); the staging sweep will", self._staging, exc)
        finally:
            self._mirror.close()
            s.writing.discard(self._staging)


def _chunks(body: Any) -> Iterator[bytes]:
    try:
        yield from body.iter_chunks(CHUNK)
    finally:
        body.close()
