"""A job's checkpoints kept in the remote store, so that any host can resume any job, and storing
that outlasts a short store outage.

With the local store, a job's checkpoints stay in its work folder as before (`worker.files`:
a retry on a host that shares ``KDQ_WORK_DIR`` renames them into place). With S3
(`service.core.s3store`), `StoreCheckpoints` also mirrors the work folder to
``<prefix>checkpoints/<job>/``:

* every ``checkpoint_sync_s`` the engine's progress callback (the engine's own thread, so never
  in the middle of writing a checkpoint) compares the work folder with what was last sent, and if
  it changed, hard-links its files into a snapshot folder (microseconds, a consistent set);
* a thread uploads the snapshot's files as ``blobs/<sha256>`` (each content once: the teacher's
  cached outputs go up once, the weights at each checkpoint), then writes this attempt's manifest
  ``attempt-<n>.json`` (path → sha256) last, so a manifest only names blobs that are there;
* a new attempt restores the newest manifest of an earlier attempt (unless this host holds a newer
  or equal local folder); every write is fenced: an attempt that lost the job writes nothing more,
  and an old attempt only ever writes its own manifest, never the newer attempt's;
* a job that ends deletes its checkpoint folder in the store.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

from service.core.lifecycle import Fence
from service.core.store import CHUNK, BlobStore, StoreUnavailable
from service.core.stores import is_remote

log = logging.getLogger(__name__)
T = TypeVar("T")
_MANIFEST = re.compile(r"attempt-(\d+)\.json$")


def store_retry(what: str, fn: Callable[[], T], within_s: float, fence: Fence,
                note: Callable[[str], None] | None = None) -> T:  # fmt: skip
    """``fn()``, retried while the store is unreachable, for up to ``within_s`` seconds (then
    `StoreUnavailable` propagates: the caller hands the job back). ``note`` hears the first retry."""
    deadline, pause = time.monotonic() + within_s, 0.5
    while True:
        try:
            return fn()
        except StoreUnavailable as exc:
            if fence.lost.is_set() or time.monotonic() + pause > deadline:
                raise
            log.warning("%s: %s; retrying in %.1f s", what, exc, pause)
            if note is not None:
                note(f"{what}: the artifact store is unreachable; retrying (up to {within_s:.0f} s)")
                note = None
        time.sleep(pause)
        pause = min(pause * 2, 5.0)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files(root: Path) -> dict[str, os.stat_result]:
    """Relative path → stat of every file under ``root``, skipping dot-named temp files and folders."""
    out = {}
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            if not name.startswith(".") and not name.endswith(".tmp"):
                path = Path(folder) / name
                try:
                    out[path.relative_to(root).as_posix()] = path.stat()
                except FileNotFoundError:
                    continue
    return out


class NoCheckpoints:
    """The local store: checkpoints stay in the work folder (`worker.files.take_over_work`)."""

    def take_over(self, previous: int | None) -> int | None:
        return previous

    def wrap(self, progress: Callable[[Any], None]) -> Callable[[Any], None]:
        return progress

    def final_sync(self) -> None:
        pass

    def close(self, ended: bool) -> None:
        pass


class StoreCheckpoints(NoCheckpoints):
    def __init__(self, store: Any, job_id: str, attempt: int, fence: Fence, work: Path, interval_s: float) -> None:
        self.store, self.attempt, self.fence, self.work = store, attempt, fence, work
        self.prefix = f"{store.prefix}checkpoints/{job_id}/"
        self.interval_s = interval_s
        self.snaps = work.parent / "snapshots"
        self.known: set[str] = set()
        """Blobs in the store under this job (uploaded, or found in the manifest taken over)."""
        self.mine: set[str] = set()
        self.hashes: dict[tuple[int, int, int], str] = {}
        self.last_check = 0.0
        self.last_sent: dict[str, tuple[int, int, int]] | None = None
        self.seq = 0
        self._pending: Path | None = None
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._busy = False
        self._stop = False
        self._thread = threading.Thread(target=self._uploader, daemon=True, name=f"checkpoints-{job_id}")
        self._thread.start()

    # --- taking over -----------------------------------------------------------------------

    def take_over(self, previous: int | None) -> int | None:
        """Restore the newest earlier attempt's manifest into the work folder, unless this host's
        own folder (``previous``, from `take_over_work`) is as new; the attempt resumed from."""
        manifests = [(int(m.group(1)), o["Key"]) for o in self.store.list_keys(self.prefix)
                     if (m := _MANIFEST.search(o["Key"])) and int(m.group(1)) < self.attempt]  # fmt: skip
        if not manifests:
            return previous
        number, key = max(manifests)
        raw = self.store.get_bytes(key)
        if raw is None:
            return previous
        files = json.loads(raw)["files"]
        self.known.update(entry["sha256"] for entry in files.values())
        if previous is not None and previous >= number:
            return previous
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True)
        for rel, entry in files.items():
            path = PurePosixPath(rel)
            if path.is_absolute() or ".." in path.parts:
                continue
            self.store.download_key(self.prefix + "blobs/" + entry["sha256"], self.work / rel)
        log.info("restored %d checkpoint files of attempt %d from the store", len(files), number)
        return number

    # --- syncing ---------------------------------------------------------------------------

    def wrap(self, progress: Callable[[Any], None]) -> Callable[[Any], None]:
        def report(p: Any) -> None:
            progress(p)
            if time.monotonic() - self.last_check >= self.interval_s:
                self.last_check = time.monotonic()
                self.snapshot()

        return report

    def snapshot(self) -> bool:
        """Hard-link the work folder's files into a snapshot for the uploader, if they changed
        since the last one (called between the engine's writes); whether one was taken."""
        if self.fence.lost.is_set():
            return False
        files = _files(self.work)
        state = {rel: (st.st_ino, st.st_size, st.st_mtime_ns) for rel, st in files.items()}
        with self._lock:
            if state == self.last_sent or self._busy:
                return False
        self.seq += 1
        snap = self.snaps / f"{self.seq:06d}"
        try:
            for rel in files:
                (snap / rel).parent.mkdir(parents=True, exist_ok=True)
                os.link(self.work / rel, snap / rel)
        except OSError:  # a file went away meanwhile: try again next time
            shutil.rmtree(snap, ignore_errors=True)
            return False
        with self._lock:
            if self._pending is not None:
                shutil.rmtree(self._pending, ignore_errors=True)
            self._pending, self.last_sent = snap, state
            self._wake.notify()
        return True

    def _uploader(self) -> None:
        while True:
            with self._lock:
                while self._pending is None and not self._stop:
                    self._wake.wait()
                if self._pending is None:
                    return
                snap, self._pending, self._busy = self._pending, None, True
            try:
                self._send(snap)
            except Exception as exc:  # the next snapshot tries again
                with self._lock:
                    self.last_sent = None
                log.warning("checkpoint upload failed (%s: %s); the next one retries", type(exc).__name__, exc)
            finally:
                shutil.rmtree(snap, ignore_errors=True)
                with self._lock:
                    self._busy = False
                    self._wake.notify_all()

    def _send(self, snap: Path) -> None:
        files: dict[str, dict[str, Any]] = {}
        for rel, st in _files(snap).items():
            ident = (st.st_ino, st.st_size, st.st_mtime_ns)
            sha = self.hashes.get(ident) or _sha256(snap / rel)
            self.hashes[ident] = sha
            if sha not in self.known:
                if self.fence.lost.is_set():
                    return
                self.store.put_file_at(self.prefix + "blobs/" + sha, snap / rel)
                self.known.add(sha)
                self.mine.add(sha)
            files[rel] = {"sha256": sha, "size": st.st_size}
        if self.fence.lost.is_set():
            return
        manifest = {"attempt": self.attempt, "seq": snap.name, "files": files, "written_at": time.time()}
        self.store.put_bytes(f"{self.prefix}attempt-{self.attempt}.json", json.dumps(manifest).encode())
        used = {f["sha256"] for f in files.values()}
        dropped = sorted(self.mine - used)  # this attempt's older checkpoints
        if dropped:
            self.store.delete_keys([self.prefix + "blobs/" + sha for sha in dropped])
            self.mine -= set(dropped)
            self.known -= set(dropped)

    def final_sync(self, timeout_s: float = 30.0) -> None:
        """Send the work folder as it is now and wait for it (a hand-back: the next host resumes
        from there)."""
        deadline = time.monotonic() + timeout_s
        self._idle(deadline)
        with self._lock:
            self.last_sent = None
        self.snapshot()
        self._idle(deadline)

    def _idle(self, deadline: float) -> None:
        with self._lock:
            while (self._busy or self._pending is not None) and time.monotonic() < deadline:
                self._wake.wait(0.2)

    def close(self, ended: bool) -> None:
        """Stop the uploader; ``ended``: the job is over, its checkpoints in the store go too."""
        with self._lock:
            self._stop = True
            if self._pending is not None:
                shutil.rmtree(self._pending, ignore_errors=True)
                self._pending = None
            self._wake.notify_all()
        self._thread.join(30)
        shutil.rmtree(self.snaps, ignore_errors=True)
        if ended:
            try:
                keys = [o["Key"] for o in self.store.list_keys(self.prefix)]
                self.store.delete_keys(keys)
            except StoreUnavailable as exc:
                log.warning("could not delete the job's checkpoints from the store (%s)", exc)


def checkpoints_for(store: BlobStore, job_id: str, attempt: int, fence: Fence, work: Path,
                    interval_s: float) -> NoCheckpoints:  # fmt: skip
    """`StoreCheckpoints` with a remote store, else `NoCheckpoints`."""
    if is_remote(store):
        return StoreCheckpoints(store, job_id, attempt, fence, work, interval_s)
    return NoCheckpoints()
