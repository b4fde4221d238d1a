"""Synchronous checks of an upload before it is stored: cheap, torch-free, on the bytes received.

They run on the staged file between receiving and committing it, so a rejected upload
answers 422 (or 415 when the bytes are plainly not the declared format) and leaves no
row and no blob. What they catch:

* any upload that is a Python pickle or a ``torch.save`` archive (never loaded, whatever
  the declared format or file name);
* models: TorchScript / ExportedProgram archives unless the operator allows code
  checkpoints (and then only under ``auto`` or their own format name);
* archives (zoo / Hugging Face folders, image class folders, ``.npz``): unsafe member
  names (absolute, ``..``), links, devices and fifos, and bombs by their declared sizes,
  entry count and compression ratio (a compressed tar is scanned up to ``scan_bytes``);
* safetensors headers (size, offsets, dtypes, element counts against the file size), alone
  or inside an archive; ``.npz`` arrays holding Python objects; PNG images declaring more
  pixels than the cap.

Everything deeper (loading, NaN weights, shapes, ONNX ops and external data, CSV rows)
is the validate worker's, which ends the upload ``invalid`` with a problem.
"""

from __future__ import annotations

import ast
import math
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal, TypeVar

from worker.compression.errors import (
    InputError,
    TruncatedFileError,
    UnsafeFileError,
    UnsupportedFormatError,
)
from worker.compression.io.archives import (
    ArchiveLimits,
    Member,
    Opener,
    archive_kind,
    walk_members,
)
from worker.compression.io.safetensors_header import parse_header, read_header
from worker.compression.io.sniff import (
    CODE_KINDS,
    DESCRIPTIONS,
    PICKLE_KINDS,
    FileKind,
    Sniffed,
    code_message,
    has_audio,
    is_pickle,
    pickle_message,
    sniff,
)

from ..core.settings import Settings
from .problems import FieldError, ProblemError

CODE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle", ".pt2", ".jit", ".ptl")
ARCHIVE_HEADS = (b"PK\x03\x04", b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")
"""Zip, gzip, bzip2, xz: an archive-shaped format starts with one of these (or is a plain tar)."""
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NPY_MAX_HEADER = 10_000
"""numpy's own limit on a .npy header it reads without being told otherwise."""
Reader = Callable[[int], bytes]
T = TypeVar("T")


@dataclass(frozen=True)
class InspectionLimits:
    archive: ArchiveLimits
    scan_bytes: int
    """How many decompressed bytes of a compressed tar the API reads to check member headers."""
    max_image_pixels: int
    allow_code: bool

    @classmethod
    def of(cls, s: Settings) -> InspectionLimits:
        return cls(
            archive=ArchiveLimits(
                max_entries=s.archive_max_entries,
                max_total_bytes=s.archive_max_unpacked_bytes,
                max_ratio=s.archive_max_ratio,
            ),
            scan_bytes=s.archive_scan_bytes,
            max_image_pixels=s.max_image_pixels,
            allow_code=s.allow_code_checkpoints,
        )


def _rejected(detail: str, code: str) -> ProblemError:
    return ProblemError(422, detail, code=code, errors=[FieldError(pointer="#/file", detail=detail)])


def _not_format(fmt: str, what: str) -> ProblemError:
    return ProblemError(415, f"the file does not look like {fmt!r}: {what}", code="unsupported_media_type")


def inspect_upload(kind: Literal["model", "dataset"], fmt: str, path: Path, limits: InspectionLimits) -> None:
    """Raise a `ProblemError` when the staged upload at ``path`` must not be stored."""
    try:
        sniffed = sniff(path)
        if sniffed.kind in PICKLE_KINDS:
            raise UnsafeFileError(pickle_message(sniffed.kind))
        if kind == "model":
            _inspect_model(fmt, path, sniffed, limits)
        else:
            _inspect_dataset(fmt, path, sniffed, limits)
    except InputError as exc:  # unsafe_file, truncated_file, invalid_model, ...
        raise _rejected(str(exc), exc.code) from None


def _head(path: Path, n: int = 16) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(n)


def _archive_shaped(path: Path, sniffed: Sniffed) -> bool:
    """A zip or tar, or bytes that start like one (a damaged archive is the worker's to explain)."""
    return sniffed.kind in ("zip", "tar", "gzip") or _head(path).startswith(ARCHIVE_HEADS)


# --- models ------------------------------------------------------------------------------------

def _inspect_model(fmt: str, path: Path, sniffed: Sniffed, limits: InspectionLimits) -> None:
    found: FileKind = sniffed.kind
    if found in CODE_KINDS or fmt in CODE_KINDS:
        if not limits.allow_code:
            raise UnsafeFileError(code_message(found if found in CODE_KINDS else fmt))
        if found not in CODE_KINDS:
            raise _not_format(fmt, f"it is not a {DESCRIPTIONS[fmt]} archive")
        if fmt not in ("auto", found):
            raise _not_format(fmt, f"it is a {DESCRIPTIONS[found]} archive; declare format {found!r} or 'auto'")
        return
    if fmt in ("zoo_zip", "hf_zip", "onnx_zip") and not _archive_shaped(path, sniffed):
        raise _not_format(fmt, "it is neither a zip nor a tar archive")
    if fmt == "onnx" and found in ("zip", "tar", "gzip", "safetensors", "npy"):
        hint = "; for a graph with external data, upload a zip of the .onnx and its data files as onnx_zip" \
            if found in ("zip", "tar", "gzip") else ""
        raise _not_format(fmt, f"it is a {found} file, not an ONNX graph{hint}")
    if found in ("zip", "tar"):
        _check_model_archive(path, limits)
    elif found == "safetensors":
        read_header(path)


def _check_model_archive(path: Path, limits: InspectionLimits) -> None:
    weights, pickles = False, []
    for member, open_member in _members(path, limits):
        suffix = PurePosixPath(member.name).suffix.lower()
        if suffix in (".safetensors", ".onnx"):
            weights = True
        if suffix == ".safetensors":
            _member_header(member, open_member, parse_header)
        elif suffix in CODE_SUFFIXES and not member.is_dir:
            if _member_header(member, open_member, lambda read, size, name: is_pickle(read(2))):
                pickles.append(member.name)
    if pickles and not weights:
        raise UnsafeFileError(f"archive member {pickles[0]!r}: {pickle_message('pickle')}")


# --- datasets ----------------------------------------------------------------------------------

def _inspect_dataset(fmt: str, path: Path, sniffed: Sniffed, limits: InspectionLimits) -> None:
    if fmt == "auto":  # judged by content: the worker judges by the file name, which can lie
        fmt = {"safetensors": "safetensors", "tar": "image_zip"}.get(sniffed.kind, "auto")
        if sniffed.kind == "zip":
            fmt = "npz" if any(n.endswith(".npy") for n in sniffed.members) else "image_zip"
            if fmt == "image_zip" and has_audio(list(sniffed.members)):
                fmt = "audio_zip"
    if fmt == "npz":
        if sniffed.kind != "zip" and not _head(path).startswith(b"PK\x03\x04"):
            raise _not_format(fmt, "it is not a zip archive")
        if sniffed.kind == "zip":
            for member, open_member in _members(path, limits):
                if member.name.endswith(".npy"):
                    _member_header(member, open_member, _check_npy)
    elif fmt == "safetensors":
        read_header(path)
    elif fmt == "image_zip":
        if not _archive_shaped(path, sniffed):
            raise _not_format(fmt, "it is neither a zip nor a tar archive")
        if sniffed.kind in ("zip", "tar"):
            for member, open_member in _members(path, limits):
                if member.name.lower().endswith(".png"):
                    _member_header(member, open_member, lambda read, size, name: _check_png(
                        read, name, limits.max_image_pixels))
    elif fmt == "audio_zip" and not _archive_shaped(path, sniffed):
        raise _not_format(fmt, "it is neither a zip nor a tar archive")
    elif fmt == "parquet" and not _head(path).startswith(b"PAR1"):
        raise _not_format(fmt, "it lacks the b'PAR1' signature")


def _check_npy(read: Reader, size: int, name: str) -> None:
    """A .npy header: object arrays are pickles; the declared shape must fit the member."""
    magic = read(8)
    if len(magic) < 8 or not magic.startswith(b"\x93NUMPY"):
        return  # not an array numpy reads either: the worker says what is wrong
    major = magic[6]
    length_bytes = read(2 if major == 1 else 4)
    (length,) = struct.unpack("<H" if major == 1 else "<I", length_bytes.ljust(2 if major == 1 else 4, b"\0"))
    if length > NPY_MAX_HEADER:
        raise UnsafeFileError(f"array {name!r} has a {length}-byte header (limit {NPY_MAX_HEADER})")
    try:
        header = ast.literal_eval(read(length).decode("utf-8" if major >= 3 else "latin1"))
        descr, shape = header["descr"], tuple(header["shape"])
    except (ValueError, SyntaxError, TypeError, KeyError, UnicodeDecodeError, RecursionError, MemoryError):
        return
    array = PurePosixPath(name).stem
    if _has_objects(descr):
        raise UnsafeFileError(
            f"array {array!r} holds Python objects (dtype {descr!r}): they are stored as a "
            "pickle, which can run code and is never loaded; save numeric arrays")
    itemsize = re.fullmatch(r"[<>|=]?[fiubc](\d+)", descr) if isinstance(descr, str) else None
    if itemsize and all(isinstance(d, int) and d >= 0 for d in shape):
        needed = math.prod(shape) * int(itemsize[1])
        available = size - 8 - len(length_bytes) - length
        if needed > available:
            raise TruncatedFileError(
                f"array {array!r} declares shape {list(shape)} of {descr!r}, {needed:,} bytes, "
                f"but only {max(available, 0):,} follow its header (truncated file?)")


def _has_objects(descr: object) -> bool:
    if isinstance(descr, str):
        return descr.lstrip("|<>=").startswith("O")
    if isinstance(descr, list):
        return any(isinstance(f, tuple) and len(f) >= 2 and _has_objects(f[1]) for f in descr)
    return False


def _check_png(read: Reader, name: str, max_pixels: int) -> None:
    head = read(24)
    if len(head) < 24 or not head.startswith(PNG_SIGNATURE) or head[12:16] != b"IHDR":
        return
    width, height = struct.unpack(">II", head[16:24])
    if width * height > max_pixels:
        raise UnsafeFileError(f"image {name} is {width}x{height} pixels, over the limit of {max_pixels:,} "
                              "(decompression bomb?)")


# --- archives ----------------------------------------------------------------------------------

def _members(path: Path, limits: InspectionLimits) -> Iterator[tuple[Member, Opener]]:
    """The archive's members, checked; a damaged archive ends the walk quietly (the worker
    explains it), an unsafe one raises."""
    if archive_kind(path) is None:
        return
    walker = walk_members(path, limits.archive, scan_bytes=limits.scan_bytes)
    while True:
        try:
            item = next(walker)
        except StopIteration:
            return
        except UnsupportedFormatError:
            return
        yield item


def _member_header(member: Member, open_member: Opener, check: Callable[[Reader, int, str], T]) -> T | None:
    """Run ``check(read, size, name)`` on the start of a member; a member that cannot be read
    is left to the worker."""
    try:
        with open_member() as fh:
            return check(fh.read, member.size, member.name)
    except InputError:
        raise
    except Exception:  # zlib / zipfile / tarfile errors on a damaged member: the worker's to explain
        return None
