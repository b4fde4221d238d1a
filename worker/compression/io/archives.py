"""Safe handling of uploaded archives (zip, tar, tar.gz / .bz2 / .xz), shared by every caller.

Two entry points, both torch-free (the API uses the first):

* `walk_members` / `list_members` read only the archive's directory (zip) or member headers
  (tar) and refuse what extraction would refuse: absolute paths, ``..``, links, devices and fifos,
  sparse or encrypted members, too many entries, and bombs by their *declared* sizes.
* `safe_extract` extracts into a private folder (mode 0700) and enforces the same caps
  again on the bytes actually written, since declared sizes can lie: the entry count, the
  total uncompressed size, and the compression ratio of each entry (tar: of the archive
  so far, as tar members carry no compressed size).

Member modes, owners and times are never applied: every file is written as a plain file.
"""

from __future__ import annotations

import lzma
import os
import stat
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Literal

from ..errors import UnsafeFileError, UnsupportedFormatError

CHUNK = 1 << 20
ArchiveKind = Literal["zip", "tar"]
RatioOf = Callable[[int], tuple[int, int]]
"""Given the bytes written of the current member: (compressed bytes, uncompressed bytes) to compare."""


@dataclass(frozen=True)
class ArchiveLimits:
    max_entries: int = 10_000
    max_total_bytes: int = 8 << 30
    """Largest total uncompressed size."""
    max_ratio: float = 200.0
    """Largest uncompressed/compressed ratio of one entry (tar: of the archive so far)."""
    ratio_grace_bytes: int = 1 << 20
    """The ratio is checked only past this many uncompressed bytes (tiny files compress well)."""


@dataclass(frozen=True)
class Member:
    """One archive entry as its header declares it."""

    name: str
    path: PurePosixPath
    is_dir: bool
    size: int
    """Declared uncompressed size."""
    compressed: int | None
    """Declared compressed size (zip only)."""


def archive_kind(path: str | os.PathLike[str]) -> ArchiveKind | None:
    """``zip``, ``tar`` (plain or compressed), or None when ``path`` is neither."""
    path = Path(path)
    if zipfile.is_zipfile(path):
        return "zip"
    try:
        if tarfile.is_tarfile(path):
            return "tar"
    except (OSError, EOFError, tarfile.TarError):
        pass
    return None


def member_path(name: str) -> PurePosixPath:
    """The member's relative path, or `UnsafeFileError` when it could land outside the folder."""
    if "\0" in name:
        raise UnsafeFileError(f"archive member {name!r} has a NUL byte in its name")
    p = PurePosixPath(name.replace("\\", "/"))
    if name.startswith(("/", "\\")) or p.is_absolute() or (p.parts and ":" in p.parts[0]):
        raise UnsafeFileError(f"archive member {name!r} has an absolute path")
    if any(part == ".." for part in p.parts):
        raise UnsafeFileError(f"archive member {name!r} escapes its folder ('..')")
    if not [part for part in p.parts if part != "."]:
        raise UnsafeFileError(f"archive member {name!r} has an empty name")
    return p


def _ratio_error(name: str, limits: ArchiveLimits) -> UnsafeFileError:
    return UnsafeFileError(f"archive member {name!r} has a compression ratio over {limits.max_ratio:.0f}:1 "
                           "(an archive bomb?)")


def _too_big(limits: ArchiveLimits) -> UnsafeFileError:
    return UnsafeFileError(f"the archive expands past {limits.max_total_bytes:,} bytes (limit)")


def _too_many(count: int | str, limits: ArchiveLimits) -> UnsafeFileError:
    return UnsafeFileError(f"the archive has {count} entries (limit {limits.max_entries:,})")


# --- zip ---------------------------------------------------------------------------------------

def _zip_member(info: zipfile.ZipInfo) -> Member:
    rel = member_path(info.filename)
    mode = info.external_attr >> 16
    # no file-type bits (zipfile.writestr, Windows tools) means a plain file; any other type is refused
    if stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        kind = "a symbolic link" if stat.S_ISLNK(mode) else "a device, fifo or socket"
        raise UnsafeFileError(f"archive member {info.filename!r} is {kind}; only files and folders are accepted")
    if info.flag_bits & 0x1:
        raise UnsafeFileError(f"archive member {info.filename!r} is encrypted")
    return Member(info.filename, rel, info.is_dir(), info.file_size, info.compress_size)


def _zip_members(zf: zipfile.ZipFile, limits: ArchiveLimits) -> list[tuple[zipfile.ZipInfo, Member]]:
    infos = zf.infolist()
    if len(infos) > limits.max_entries:
        raise _too_many(len(infos), limits)
    return [(info, _zip_member(info)) for info in infos]


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise UnsupportedFormatError(f"{path.name} is not a readable zip archive: {exc}") from exc


# --- tar ---------------------------------------------------------------------------------------

def _tar_member(info: tarfile.TarInfo) -> Member:
    rel = member_path(info.name)
    if info.issym() or info.islnk():
        kind = "a symbolic link" if info.issym() else "a hard link"
        raise UnsafeFileError(f"archive member {info.name!r} is {kind} (to {info.linkname!r}); "
                              "only files and folders are accepted")
    if info.ischr() or info.isblk() or info.isfifo():
        raise UnsafeFileError(f"archive member {info.name!r} is a device or fifo; only files and folders "
                              "are accepted")
    if info.issparse():
        raise UnsafeFileError(f"archive member {info.name!r} is a sparse file; only plain files are accepted")
    if not (info.isreg() or info.isdir()):
        raise UnsafeFileError(f"archive member {info.name!r} has an unsupported type {info.type!r}")
    return Member(info.name, rel, info.isdir(), info.size, None)


def _tar_infos(tf: tarfile.TarFile, limits: ArchiveLimits) -> Iterator[tuple[tarfile.TarInfo, Member]]:
    """Members as their headers are read (lazily: a compressed tar is decompressed as we go)."""
    count = 0
    while True:
        try:
            info = tf.next()
        except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
            raise UnsupportedFormatError(f"the tar archive is corrupt or truncated: {exc}") from exc
        if info is None:
            return
        count += 1
        if count > limits.max_entries:
            raise _too_many(f"more than {limits.max_entries:,}", limits)
        yield info, _tar_member(info)


def _open_tar(path: Path, raw: BinaryIO) -> tarfile.TarFile:
    try:
        return tarfile.open(fileobj=raw, mode="r:*")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise UnsupportedFormatError(f"{path.name} is not a readable tar archive: {exc}") from exc


# --- listing -------------------------------------------------------------------------------------

Opener = Callable[[], BinaryIO]
"""Opens one member for reading (valid only while its `walk_members` step is current)."""


def walk_members(path: str | os.PathLike[str], limits: ArchiveLimits = ArchiveLimits(), *,
                 scan_bytes: int | None = None) -> Iterator[tuple[Member, Opener]]:
    """Check each member's header without extracting anything (see the module doc) and yield it
    with a way to read its first bytes (to check a member's own header).

    A compressed tar has to be decompressed to reach its headers: ``scan_bytes`` stops the
    walk after that many decompressed bytes (what is past it is checked when extracting).
    """
    path = Path(path)
    kind = archive_kind(path)
    if kind is None:
        raise UnsupportedFormatError(f"{path.name} is neither a zip nor a tar archive")
    total = 0
    if kind == "zip":
        with _open_zip(path) as zf:
            for info, m in _zip_members(zf, limits):
                total += m.size
                if total > limits.max_total_bytes:
                    raise _too_big(limits)
                if (m.size > limits.ratio_grace_bytes and m.compressed is not None
                        and m.size > limits.max_ratio * max(1, m.compressed)):
                    raise _ratio_error(m.name, limits)
                yield m, lambda info=info: zf.open(info)
        return
    with open(path, "rb") as raw, _open_tar(path, raw) as tf:
        for info, m in _tar_infos(tf, limits):
            total += m.size
            if total > limits.max_total_bytes:
                raise _too_big(limits)
            position = info.offset_data + info.size  # decompressed bytes up to this member's end
            if position > limits.ratio_grace_bytes and position > limits.max_ratio * max(1, raw.tell()):
                raise _ratio_error(m.name, limits)
            yield m, lambda info=info: tf.extractfile(info) or BytesIO()
            if scan_bytes is not None and position > scan_bytes:
                return


def list_members(path: str | os.PathLike[str], limits: ArchiveLimits = ArchiveLimits(), *,
                 scan_bytes: int | None = None) -> list[Member]:
    """`walk_members` as a list."""
    return [m for m, _ in walk_members(path, limits, scan_bytes=scan_bytes)]


# --- extraction ----------------------------------------------------------------------------------

class ExtractionWriteError(Exception):
    """Writing the extracted bytes failed (disk full, ...): our problem, not the upload's."""


class _Budget:
    """Counts the bytes actually written, against the total cap and a ratio."""

    def __init__(self, limits: ArchiveLimits) -> None:
        self.limits = limits
        self.total = 0

    def copy(self, src: BinaryIO, dst: BinaryIO, name: str, ratio_of: RatioOf) -> None:
        written = 0
        while chunk := src.read(CHUNK):
            written += len(chunk)
            self.total += len(chunk)
            if self.total > self.limits.max_total_bytes:
                raise _too_big(self.limits)
            ratio_base, ratio_bytes = ratio_of(written)
            limits = self.limits
            if ratio_bytes > limits.ratio_grace_bytes and ratio_bytes > limits.max_ratio * max(1, ratio_base):
                raise _ratio_error(name, self.limits)
            try:
                dst.write(chunk)
            except OSError as exc:
                raise ExtractionWriteError(f"cannot write {name!r} while extracting: {exc}") from exc


def _target(out: Path, member: Member) -> Path:
    target = out.joinpath(*[p for p in member.path.parts if p != "."])
    if not target.resolve().is_relative_to(out.resolve()):  # defence in depth: no links exist to follow
        raise UnsafeFileError(f"archive member {member.name!r} resolves outside the extraction folder")
    return target


def _write(out: Path, member: Member, src: BinaryIO | None, budget: _Budget, ratio_of: RatioOf | None) -> None:
    target = _target(out, member)
    try:
        if member.is_dir:
            target.mkdir(parents=True, exist_ok=True)
            return
        assert src is not None and ratio_of is not None
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as dst:
            budget.copy(src, dst, member.name, ratio_of)
    except (NotADirectoryError, IsADirectoryError, FileExistsError) as exc:
        raise UnsupportedFormatError(f"archive member {member.name!r} clashes with another entry: {exc}") from exc


def safe_extract(path: str | os.PathLike[str], dest: str | os.PathLike[str] | None = None,
                 limits: ArchiveLimits = ArchiveLimits()) -> Path:
    """Extract a zip or tar into ``dest`` (default: a new private temp folder) and return it.

    ``dest`` is made mode 0700. On an error the partial extraction is left for the caller,
    who owns ``dest``, to remove.
    """
    path = Path(path)
    kind = archive_kind(path)
    if kind is None:
        raise UnsupportedFormatError(f"{path.name} is neither a zip nor a tar archive")
    out = Path(dest) if dest is not None else Path(tempfile.mkdtemp(prefix="kdq-archive-"))
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    budget = _Budget(limits)
    if kind == "zip":
        with _open_zip(path) as zf:
            for info, member in _zip_members(zf, limits):
                try:
                    with zf.open(info) as src:
                        _write(out, member, src, budget, lambda n, c=info.compress_size: (c, n))
                except (zipfile.BadZipFile, EOFError, NotImplementedError, RuntimeError, ValueError,
                        zlib.error, lzma.LZMAError) as exc:
                    raise UnsupportedFormatError(f"archive member {info.filename!r} is corrupt: {exc}") from exc
        return out
    with open(path, "rb") as raw, _open_tar(path, raw) as tf:
        for info, member in _tar_infos(tf, limits):
            if member.is_dir:
                _write(out, member, None, budget, None)
                continue
            base = budget.total
            try:
                src = tf.extractfile(info)
                if src is None:
                    raise UnsupportedFormatError(f"archive member {info.name!r} cannot be read")
                with src:
                    _write(out, member, src, budget, lambda n, b=base: (raw.tell(), b + n))
            except (tarfile.TarError, EOFError, OSError, ValueError, zlib.error, lzma.LZMAError) as exc:
                raise UnsupportedFormatError(f"archive member {info.name!r} is corrupt: {exc}") from exc
    return out


safe_extract_zip = safe_extract
"""The former name (it took zips only); every archive-shaped upload goes through `safe_extract`."""
