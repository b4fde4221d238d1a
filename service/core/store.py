"""Content-addressed blob store: every blob is named by its sha256.

`BlobStore` is the interface the API and the worker use; `LocalStore` keeps blobs in a
local (or shared) directory, written atomically: a temp file in the store's own folder,
fsync, rename. `service.core.s3store.S3Store` implements the same methods on S3 (a streamed
multipart upload behind `BlobWriter`, ranged GETs, a download behind `fetch`);
`service.core.stores.store_for` picks one from the settings.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
CHUNK = 1 << 20


@dataclass(frozen=True)
class BlobRef:
    sha256: str
    size: int


class BlobWriter(Protocol):
    """Receives a blob in pieces; `commit` makes it visible under its hash, `abort` drops it."""

    @property
    def size(self) -> int: ...

    def write(self, data: bytes | memoryview) -> None: ...

    def head(self) -> bytes:
        """The first bytes written (for sniffing the file type)."""
        ...

    def staged_path(self) -> Path:
        """A local file holding every byte written so far (checks before `commit`; read only)."""
        ...

    def commit(self) -> BlobRef: ...

    def abort(self) -> None: ...


class BlobStore(Protocol):
    def writer(self) -> BlobWriter: ...

    def put_file(self, path: Path) -> BlobRef: ...

    def exists(self, sha256: str) -> bool: ...

    def size(self, sha256: str) -> int: ...

    def open(self, sha256: str) -> BinaryIO: ...

    def local_path(self, sha256: str) -> Path | None:
        """A readable local file holding the blob, when the backend has one (for zero-copy serving)."""
        ...

    def fetch(self, sha256: str, dest: Path) -> Path:
        """Make the blob available at ``dest`` (a hard link or a copy; never modify it)."""
        ...

    def delete(self, sha256: str) -> None: ...


class StoreUnavailable(Exception):
    """The blob store cannot be reached right now (network, timeouts, a 5xx answer): retryable.
    The API answers 503 with Retry-After; a worker retries, then hands the job back."""


def check_sha256(sha256: str) -> str:
    if not _SHA256.match(sha256):
        raise ValueError(f"not a sha256 hex digest: {sha256!r}")
    return sha256


class _LocalWriter:
    HEAD = 512
    WRITEBACK = 32 << 20
    """Start writing dirty pages to disk every this many bytes, so the final fsync is short."""

    def __init__(self, store: LocalStore) -> None:
        self._store = store
        fd, name = tempfile.mkstemp(dir=store.tmp_dir, prefix="upload-")
        self._file = os.fdopen(fd, "wb", buffering=0)
        self._tmp = Path(name)
        self._hash = hashlib.sha256()
        # hashlib and file writes release the GIL: each piece is hashed and written on two more
        # cores while the caller produces the next one (one piece in flight each, in order)
        self._threads = ThreadPoolExecutor(2, thread_name_prefix="blob-writer")
        self._pending: list[Future[None]] = []
        self._size = 0
        self._head = b""
        self._flushed = 0

    @property
    def size(self) -> int:
        return self._size

    def head(self) -> bytes:
        return self._head

    def staged_path(self) -> Path:
        self._wait()  # the file is unbuffered: once the pending writes are done, the bytes are there
        return self._tmp

    def write(self, data: bytes | memoryview) -> None:
        """``data`` must stay unchanged after the call (it is hashed and written on other threads)."""
        if len(self._head) < self.HEAD:
            self._head += data[: self.HEAD - len(self._head)]
        self._wait()
        self._size += len(data)
        writeback = self._size - self._flushed >= self.WRITEBACK
        self._pending = [
            self._threads.submit(self._hash.update, data),
            self._threads.submit(self._write, data, self._flushed if writeback else -1),
        ]
        if writeback:
            self._flushed = self._size

    def _write(self, data: bytes | memoryview, writeback_from: int) -> None:
        view = memoryview(data)
        while view:
            view = view[self._file.write(view) :]
        if writeback_from >= 0:  # DONTNEED starts asynchronous writeback of the dirty range
            os.posix_fadvise(self._file.fileno(), writeback_from, 0, os.POSIX_FADV_DONTNEED)

    def _wait(self) -> None:
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def commit(self) -> BlobRef:
        try:
            self._wait()
        finally:
            self._threads.shutdown()
        os.fsync(self._file.fileno())
        self._file.close()
        ref = BlobRef(self._hash.hexdigest(), self._size)
        self._store._install(self._tmp, ref.sha256)
        return ref

    def abort(self) -> None:
        self._threads.shutdown(wait=True)
        self._file.close()
        self._tmp.unlink(missing_ok=True)


class LocalStore:
    """Blobs at ``<root>/sha256/<aa>/<rest-of-hash>``, read-only once written."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.tmp_dir = self.root / "tmp"

    def path(self, sha256: str) -> Path:
        check_sha256(sha256)
        return self.root / "sha256" / sha256[:2] / sha256[2:]

    def writer(self) -> BlobWriter:
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        return _LocalWriter(self)

    def put_file(self, path: Path) -> BlobRef:
        w = self.writer()
        try:
            with open(path, "rb") as f:
                while chunk := f.read(CHUNK):
                    w.write(chunk)
            return w.commit()
        except BaseException:
            w.abort()
            raise

    def _install(self, tmp: Path, sha256: str) -> None:
        final = self.path(sha256)
        if final.exists():  # same content already stored: keep the existing file untouched
            tmp.unlink()
            return
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp.chmod(0o444)
        os.replace(tmp, final)
        dir_fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def size(self, sha256: str) -> int:
        return self.path(sha256).stat().st_size

    def open(self, sha256: str) -> BinaryIO:
        return open(self.path(sha256), "rb")

    def local_path(self, sha256: str) -> Path | None:
        return self.path(sha256)

    def fetch(self, sha256: str, dest: Path) -> Path:
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.unlink(missing_ok=True)
        try:
            os.link(self.path(sha256), dest)
        except OSError:
            shutil.copyfile(self.path(sha256), dest)
        return dest

    def delete(self, sha256: str) -> None:
        self.path(sha256).unlink(missing_ok=True)


def make_store(storage_dir: Path) -> BlobStore:
    return LocalStore(storage_dir)
