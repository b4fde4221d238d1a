"""A bounded local view of an upload that went to S3, for the API's synchronous checks.

The checks (`service.api.inspection`) read a file by path, but an upload to S3 is streamed
part by part and never copied whole to the API's disk. `Mirror` is a sparse local file of the
upload's size that holds only some of its bytes: the first and last ``keep`` bytes (kept as
they stream past), and whatever `prefetch_for_inspection` then reads from the staged object
through a `RangedReader`, which keeps every block it fetches in the mirror. The prefetch
reads, with the same standard-library parsers, the bytes the checks read: a zip's central
directory and the first bytes of the members the checks open (safetensors headers, ``.npy``
headers, PNG headers, pickle markers), a tar's member headers up to ``scan_bytes``, a raw
safetensors header. So the checks see every byte they look at, and the local disk holds a
bounded amount whatever the upload's size (headers, not payloads).
"""

from __future__ import annotations

import io
import os
import struct
import tarfile
import tempfile
import zipfile
from collections import deque
from collections.abc import Callable
from pathlib import Path, PurePosixPath

BLOCK = 16 << 10
"""Fetches are aligned to this many bytes (one GET per missing block run)."""
CODE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle", ".pt2", ".jit", ".ptl")
PROBES = {".npy": 16 << 10, ".png": 24, **{suffix: 2 for suffix in CODE_SUFFIXES}}
"""Archive members whose first bytes the checks read, and how many they read at most (an .npy
header is at most 10 kB; a PNG's size is in its first 24 bytes; a pickle shows in 2); safetensors
members: their header, whatever its length."""
MAX_SAFETENSORS_HEADER = 100 << 20


class Mirror:
    """A sparse temp file in ``folder`` standing for a ``size``-byte upload, and the byte ranges
    of it that it really holds."""

    def __init__(self, folder: Path, keep: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=folder, prefix="s3-staged-")
        self.fd, self.path, self.keep = fd, Path(name), keep
        self.size = 0
        self.ranges: list[tuple[int, int]] = []
        self._tail: deque[tuple[int, bytes]] = deque()
        self._tail_bytes = 0

    def write(self, offset: int, data: bytes | memoryview) -> None:
        """The upload's next bytes, as they stream past: the head is written, the tail kept."""
        if offset < self.keep:
            self.put(offset, data[: self.keep - offset])
        piece = bytes(data) if isinstance(data, memoryview) else data
        self._tail.append((offset, piece))
        self._tail_bytes += len(piece)
        while self._tail and self._tail_bytes - len(self._tail[0][1]) >= self.keep:
            self._tail_bytes -= len(self._tail.popleft()[1])

    def finish(self, size: int) -> None:
        """The upload is complete: write the tail and give the file the upload's size."""
        for offset, piece in self._tail:
            self.put(offset, piece)
        self._tail.clear()
        self._tail_bytes = 0
        os.ftruncate(self.fd, size)
        self.size = size

    def put(self, offset: int, data: bytes | memoryview) -> None:
        view = memoryview(data)
        at = offset
        while view:
            n = os.pwrite(self.fd, view, at)
            view, at = view[n:], at + n
        self._add(offset, offset + len(data))

    def _add(self, start: int, end: int) -> None:
        if start >= end:
            return
        merged: list[tuple[int, int]] = []
        for a, b in sorted([*self.ranges, (start, end)]):
            if merged and a <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], b))
            else:
                merged.append((a, b))
        self.ranges = merged

    def missing(self, start: int, end: int) -> list[tuple[int, int]]:
        """The parts of ``[start, end)`` the mirror does not hold."""
        gaps, at = [], start
        for a, b in self.ranges:
            if b <= at:
                continue
            if a >= end:
                break
            if a > at:
                gaps.append((at, min(a, end)))
            at = max(at, b)
            if at >= end:
                break
        if at < end:
            gaps.append((at, end))
        return gaps

    @property
    def complete(self) -> bool:
        return not self.missing(0, self.size)

    def held_bytes(self) -> int:
        return sum(b - a for a, b in self.ranges)

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass
        self.path.unlink(missing_ok=True)


class RangedReader(io.RawIOBase):
    """A seekable, read-only file over the staged object: bytes the mirror lacks are fetched with
    ``fetch(start, end)`` (end exclusive) in aligned blocks and kept in the mirror."""

    def __init__(self, mirror: Mirror, fetch: Callable[[int, int], bytes]) -> None:
        super().__init__()
        self.mirror, self.fetch, self.pos = mirror, fetch, 0
        self.fetches = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.pos, os.SEEK_END: self.mirror.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        n = max(0, min(len(buffer), self.mirror.size - self.pos))
        if n == 0:
            return 0
        self._ensure(self.pos, self.pos + n)
        got = os.preadv(self.mirror.fd, [memoryview(buffer)[:n]], self.pos)
        self.pos += got
        return got

    def _ensure(self, start: int, end: int) -> None:
        for a, b in self.mirror.missing(start, end):
            a = a - a % BLOCK
            b = min(self.mirror.size, b + (-b) % BLOCK)
            for ga, gb in self.mirror.missing(a, b):
                self.mirror.put(ga, self.fetch(ga, gb))
                self.fetches += 1


def prefetch_for_inspection(reader: RangedReader, *, scan_bytes: int, max_entries: int) -> None:
    """Read through ``reader`` what the upload checks will read (see the module doc)."""
    reader.seek(0)
    head = reader.read(16)
    reader.seek(0)
    if zipfile.is_zipfile(reader):
        _zip(reader, max_entries)
        return
    reader.seek(0)
    if len(head) >= 9 and head[8:9] == b"{":
        (n,) = struct.unpack("<Q", head[:8])
        reader.seek(8)
        reader.read(min(n, MAX_SAFETENSORS_HEADER))
        return
    reader.seek(0)
    _tar(reader, scan_bytes, max_entries)


def _zip(reader: RangedReader, max_entries: int) -> None:
    try:
        zf = zipfile.ZipFile(reader)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return
    with zf:
        infos = zf.infolist()
        if len(infos) > max_entries:
            return  # refused on the count alone
        for info in infos:
            suffix = PurePosixPath(info.filename).suffix.lower()
            if info.is_dir() or (suffix not in PROBES and suffix != ".safetensors"):
                continue
            try:
                with zf.open(info) as fh:
                    if suffix == ".safetensors":
                        length = fh.read(8)
                        if len(length) == 8:
                            fh.read(min(struct.unpack("<Q", length)[0], MAX_SAFETENSORS_HEADER))
                    else:
                        fh.read(PROBES[suffix])
            except Exception:  # a damaged member: the checks leave it to the worker too
                continue


def _tar(reader: RangedReader, scan_bytes: int, max_entries: int) -> None:
    try:
        tf = tarfile.open(fileobj=reader, mode="r:*")  # type: ignore[call-overload]
    except (tarfile.TarError, OSError, EOFError, ValueError):
        return
    with tf:
        for _ in range(max_entries + 1):
            try:
                info = tf.next()
            except (tarfile.TarError, OSError, EOFError, ValueError):
                return
            if info is None:
                return
            if info.isfile() and info.name.lower().endswith(".png"):
                try:
                    (tf.extractfile(info) or io.BytesIO()).read(24)
                except Exception:
                    pass
            if info.offset_data + info.size > scan_bytes:
                return
