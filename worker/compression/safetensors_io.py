"""Checked safetensors reading and writing.

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
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_model
from torch import nn

from .errors import (
    MissingTensorError,
    ModelFileError,
    NonFiniteWeightsError,
    ShapeMismatchError,
    TruncatedFileError,
    UnexpectedTensorError,
)

MAX_HEADER_BYTES = 100_000_000
"""The safetensors library's own limit on the JSON header."""

DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
_SHOW = 5


@dataclass(frozen=True)
class TensorInfo:
    """One header entry; ``begin``/``end`` are byte offsets into the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def _names(names: Collection[str]) -> str:
    ordered = sorted(names)
    more = f" and {len(ordered) - _SHOW} more" if len(ordered) > _SHOW else ""
    return ", ".join(repr(n) for n in ordered[:_SHOW]) + more


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


def read_header(path: str | os.PathLike[str]) -> dict[str, TensorInfo]:
    """Validate a safetensors file's header and return its tensor entries, reading no tensor data."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise TruncatedFileError(f"{path.name} is {size} bytes, too short for a safetensors file")
        (n,) = struct.unpack("<Q", prefix)
        if n > size - 8:
            raise TruncatedFileError(
                f"{path.name}: header claims {n} bytes but only {size - 8} follow (truncated file?)")
        if n > MAX_HEADER_BYTES:
            raise ModelFileError(f"{path.name}: header of {n} bytes exceeds the {MAX_HEADER_BYTES} byte limit")
        raw = fh.read(n)
    try:
        header = json.loads(raw, object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{path.name}: safetensors header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise ModelFileError(f"{path.name}: safetensors header is not a JSON object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ModelFileError(f"{path.name}: __metadata__ must map strings to strings")
    infos = {name: _entry(name, raw_entry) for name, raw_entry in header.items()}
    data_size = size - 8 - n
    cursor = 0
    for info in sorted(infos.values(), key=lambda i: (i.begin, i.end)):
        if info.end > data_size:
            raise TruncatedFileError(
                f"{path.name}: tensor {info.name!r} ends at byte {info.end} of a {data_size}-byte data "
                "section (truncated file?)")
        if info.begin < cursor:
            raise ModelFileError(f"{path.name}: tensor {info.name!r} overlaps the tensor before it")
        if info.begin > cursor:
            raise ModelFileError(f"{path.name}: gap of {info.begin - cursor} bytes before tensor {info.name!r}")
        cursor = info.end
    if cursor != data_size:
        raise ModelFileError(f"{path.name}: {data_size - cursor} bytes after the last tensor belong to none")
    return infos


def check_header(path: str | os.PathLike[str], expected: Mapping[str, tuple[int, ...]],
                 optional: Collection[str] = ()) -> dict[str, TensorInfo]:
    """``read_header`` plus names and shapes against ``expected``; ``optional`` names may be absent."""
    path = Path(path)
    infos = read_header(path)
    fname = path.name
    missing = set(expected) - set(infos) - set(optional)
    if missing:
        raise MissingTensorError(f"{fname} lacks {len(missing)} expected tensor(s): {_names(missing)}")
    unexpected = set(infos) - set(expected)
    if unexpected:
        raise UnexpectedTensorError(f"{fname} has {len(unexpected)} unexpected tensor(s): {_names(unexpected)}")
    for name, info in infos.items():
        want = tuple(expected[name])
        if info.shape != want:
            raise ShapeMismatchError(
                f"{fname}: tensor {name!r} has shape {list(info.shape)}, expected {list(want)}")
    return infos


def _check_finite(tensors: Mapping[str, torch.Tensor], fname: str) -> None:
    for name, t in tensors.items():
        if not t.is_floating_point():
            continue
        finite = torch.isfinite(t if t.element_size() > 1 else t.float())
        if not bool(finite.all()):
            nan = int(torch.isnan(t.float()).sum())
            inf = t.numel() - int(finite.sum()) - nan
            raise NonFiniteWeightsError(f"{fname}: tensor {name!r} has {nan} NaN and {inf} infinite value(s)")


def load_state_dict(path: str | os.PathLike[str], expected: Mapping[str, tuple[int, ...]] | None = None, *,
                    check_finite: bool = True, optional: Collection[str] = ()) -> dict[str, torch.Tensor]:
    """Load a safetensors file after checking its header (and names/shapes against ``expected``).

    ``optional`` names in ``expected`` may be absent (aliases of tied weights).
    """
    path = Path(path)
    if expected is None:
        read_header(path)
    else:
        check_header(path, expected, optional)
    try:
        tensors = load_file(path)
    except SafetensorError as exc:
        raise ModelFileError(f"{path.name}: {exc}") from exc
    if check_finite:
        _check_finite(tensors, path.name)
    return tensors


def _alias_groups(state: Mapping[str, torch.Tensor]) -> list[list[str]]:
    """Names of state-dict entries that are the same tensor (tied weights), in groups of 2+."""
    groups: dict[tuple[object, ...], list[str]] = {}
    for name, t in state.items():
        if t.numel():
            key = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
            groups.setdefault(key, []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def load_into(module: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Load ``path`` into ``module`` strictly: every tensor present, none extra, shapes equal.

    A tied weight may be stored under any one of its names (``save_module`` keeps one).
    """
    state = module.state_dict()
    expected = {k: tuple(v.shape) for k, v in state.items()}
    present = set(read_header(path))
    optional: set[str] = set()
    groups = _alias_groups(state)
    for names in groups:
        if present & set(names):
            optional |= set(names) - present
    tensors = load_state_dict(path, expected, optional=optional)
    for names in groups:
        source = next((n for n in names if n in tensors), None)
        for name in names:
            if source is not None and name not in tensors:
                tensors[name] = tensors[source]
    try:
        module.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:  # e.g. a dtype that cannot be copied into the parameter
        raise ModelFileError(f"{Path(path).name}: {exc}") from exc
    return module


def save_module(module: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Save a module's state dict as safetensors; tied weights are stored once."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(module, str(path), force_contiguous=True)
    return path
