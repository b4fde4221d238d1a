"""Checks of a safetensors header, torch-free (the API runs them on uploads as they arrive).

The header is validated (size, JSON shape, dtypes, element counts, offsets) before any
tensor is allocated, so a lying header costs a few bytes of reading, never gigabytes of
memory. The checks mirror what the safetensors library itself enforces (offsets start
at 0 and tile the data section exactly), so a file that passes ``read_header`` loads.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelFileError, TruncatedFileError

MAX_HEADER_BYTES = 100_000_000
"""The safetensors library's own limit on the JSON header."""

DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}


@dataclass(frozen=True)
class TensorInfo:
    """One header entry; ``begin``/``end`` are byte offsets into the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise ModelFileError(f"safetensors header names {key!r} twice")
        out[key] = value
    return out


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _entry(name: str, raw: object) -> TensorInfo:
    if not isinstance(raw, dict):
        raise ModelFileError(f"safetensors header entry {name!r} is not an object")
    dtype, shape, offsets = raw.get("dtype"), raw.get("shape"), raw.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise ModelFileError(f"tensor {name!r} has unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise ModelFileError(f"tensor {name!r} has an invalid shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise ModelFileError(f"tensor {name!r} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
    if end - begin != nbytes:
        raise ModelFileError(
            f"tensor {name!r}: shape {shape} of {dtype} needs {nbytes} bytes "
            f"but its offsets span {end - begin}")
    return TensorInfo(name, dtype, tuple(shape), begin, end)


def parse_header(read: Callable[[int], bytes], size: int, name: str) -> dict[str, TensorInfo]:
    """Validate the header of a ``size``-byte safetensors file whose bytes ``read(n)`` returns
    from the start (a file, or a member of an archive); reads only the header."""
    prefix = read(8)
    if len(prefix) < 8:
        raise TruncatedFileError(f"{name} is {size} bytes, too short for a safetensors file")
    (n,) = struct.unpack("<Q", prefix)
    if n > size - 8:
        raise TruncatedFileError(f"{name}: header claims {n} bytes but only {size - 8} follow (truncated file?)")
    if n > MAX_HEADER_BYTES:
        raise ModelFileError(f"{name}: header of {n} bytes exceeds the {MAX_HEADER_BYTES} byte limit")
    raw = read(n)
    if len(raw) < n:
        raise TruncatedFileError(f"{name}: the header ends after {len(raw)} of its {n} bytes (truncated file?)")
    try:
        header = json.loads(raw, object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ModelFileError(f"{name}: safetensors header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise ModelFileError(f"{name}: safetensors header is not a JSON object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ModelFileError(f"{name}: __metadata__ must map strings to strings")
    infos = {key: _entry(key, raw_entry) for key, raw_entry in header.items()}
    data_size = size - 8 - n
    cursor = 0
    for info in sorted(infos.values(), key=lambda i: (i.begin, i.end)):
        if info.end > data_size:
            raise TruncatedFileError(
                f"{name}: tensor {info.name!r} ends at byte {info.end} of a {data_size}-byte data "
                "section (truncated file?)")
        if info.begin < cursor:
            raise ModelFileError(f"{name}: tensor {info.name!r} overlaps the tensor before it")
        if info.begin > cursor:
            raise ModelFileError(f"{name}: gap of {info.begin - cursor} bytes before tensor {info.name!r}")
        cursor = info.end
    if cursor != data_size:
        raise ModelFileError(f"{name}: {data_size - cursor} bytes after the last tensor belong to none")
    return infos


def read_header(path: str | os.PathLike[str]) -> dict[str, TensorInfo]:
    """Validate a safetensors file's header and return its tensor entries, reading no tensor data."""
    path = Path(path)
    with open(path, "rb") as fh:
        return parse_header(fh.read, os.fstat(fh.fileno()).st_size, path.name)


def looks_like_safetensors(head: bytes) -> bool:
    """The first bytes are a plausible safetensors start: a little-endian header length, then ``{``."""
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 2 <= n <= MAX_HEADER_BYTES and head[8:9] == b"{"
