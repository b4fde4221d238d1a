"""Safe extraction of uploaded zip archives into a private folder.

Rejects absolute paths, ``..`` components, symlinks and special files, and caps the
entry count, the total uncompressed size and the compression ratio *while* extracting
(the sizes in the central directory can lie).
"""

from __future__ import annotations

import os
import stat
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .errors import UnsafeFileError, UnsupportedFormatError

CHUNK = 1 << 20


@dataclass(frozen=True)
class ArchiveLimits:
    max_entries: int = 10_000
    max_total_bytes: int = 8 << 30
    max_ratio: float = 200.0
    """Largest allowed uncompressed/compressed ratio of the whole archive."""


def _member_path(name: str) -> PurePosixPath:
    p = PurePosixPath(name.replace("\\", "/"))
    if name.startswith(("/", "\\")) or p.is_absolute() or (p.parts and ":" in p.parts[0]):
        raise UnsafeFileError(f"archive member {name!r} has an absolute path")
    if any(part == ".." for part in p.parts):
        raise UnsafeFileError(f"archive member {name!r} escapes its folder ('..')")
    return p


def safe_extract_zip(path: str | os.PathLike[str], dest: str | os.PathLike[str] | None = None,
                     limits: ArchiveLimits = ArchiveLimits()) -> Path:
    """Extract ``path`` into ``dest`` (default: a new private temp folder) and return it."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise UnsupportedFormatError(f"{path.name} is not a zip archive")
    out = Path(dest) if dest is not None else Path(tempfile.mkdtemp(prefix="kdq-zip-"))
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    compressed_size = max(1, path.stat().st_size)
    total = 0
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise UnsupportedFormatError(f"{path.name} is not a readable zip archive: {exc}") from exc
    with zf:
        infos = zf.infolist()
        if len(infos) > limits.max_entries:
            raise UnsafeFileError(f"archive has {len(infos)} entries (limit {limits.max_entries})")
        for info in infos:
            rel = _member_path(info.filename)
            mode = info.external_attr >> 16
            # no file-type bits (zipfile.writestr, Windows tools) means a plain file; any other type is refused
            if stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise UnsafeFileError(f"archive member {info.filename!r} is a link or special file")
            target = out.joinpath(*rel.parts)
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with zf.open(info) as src, open(target, "wb") as dst:
                    while chunk := src.read(CHUNK):
                        total += len(chunk)
                        if total > limits.max_total_bytes:
                            raise UnsafeFileError(
                                f"archive expands past {limits.max_total_bytes} bytes (limit)")
                        if total / compressed_size > limits.max_ratio and total > (1 << 20):
                            raise UnsafeFileError(
                                f"archive compression ratio exceeds {limits.max_ratio:.0f}:1 (zip bomb?)")
                        dst.write(chunk)
            except (zipfile.BadZipFile, EOFError, NotImplementedError) as exc:
                raise UnsupportedFormatError(f"archive member {info.filename!r} is corrupt: {exc}") from exc
    return out
