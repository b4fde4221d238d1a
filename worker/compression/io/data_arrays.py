"""Array datasets (``.npz``, ``.safetensors``): ``x`` (or token ``input_ids`` with optional
``attention_mask`` / ``token_type_ids``) and an optional ``y``. Object arrays are never unpickled."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from ..errors import DatasetError
from ..types import InputKind, TensorData
from .data_common import (
    RANK_KIND,
    DataLimits,
    ReadContext,
    check_finite,
    feature_array,
    parse_labels,
    too_large,
)

ARRAY_KEYS = ("x", "input_ids", "y", "attention_mask", "token_type_ids")


def load_arrays(path: Path, fmt: str, ctx: ReadContext) -> TensorData:
    arrays, names = _read_npz(path, ctx.limits) if fmt == "npz" else _read_safetensors(path)
    tokens = ctx.input_kind == "tokens" or (ctx.input_kind is None and "input_ids" in arrays)
    key = "input_ids" if tokens and "input_ids" in arrays else "x"
    if key not in arrays:
        present = ", ".join(sorted(names)) or "none"
        raise DatasetError(f"{path.name} has no array {key!r} (arrays present: {present})")
    x = arrays[key]
    if x.ndim == 0 or len(x) == 0:
        raise DatasetError(f"{path.name}: array {key!r} holds no samples (shape {tuple(x.shape)})")
    inputs = _token_arrays(arrays, x, ctx) if tokens else {"x": feature_array(x, ctx)}
    y, classes = None, None
    if "y" in arrays:
        y = arrays["y"]
        if y.ndim == 0 or len(y) != len(x):
            raise DatasetError(f"{path.name}: {key} has {len(x)} rows but y has "
                               f"{len(y) if y.ndim else 'no'} rows")
        y, classes = _array_targets(y, ctx)
    kind: InputKind = "tokens" if tokens else RANK_KIND[inputs["x"].ndim]
    meta = {} if tokens else {"value_range": value_range(inputs["x"])}
    return TensorData(inputs, y, kind, classes, meta={k: v for k, v in meta.items() if v})


def value_range(x: torch.Tensor) -> str:
    """``"0-255"`` for inputs of raw 8-bit values (all in [0, 255], some past 1: pixels not divided by
    255), else ``""``; the teacher check tries them divided by 255 (`measure.teacher_check`)."""
    if x.numel() == 0:
        return ""
    low, high = float(x.min()), float(x.max())
    return "0-255" if low >= 0 and 1 < high <= 255 else ""


def _read_npz(path: Path, limits: DataLimits) -> tuple[dict[str, torch.Tensor], list[str]]:
    try:
        with zipfile.ZipFile(path) as zf:
            declared = sum(info.file_size for info in zf.infolist())
    except (zipfile.BadZipFile, OSError) as exc:
        raise DatasetError(f"{path.name} is not an .npz archive: {exc}") from exc
    if declared > limits.array_bytes:
        raise too_large(f"the arrays in {path.name}", declared, limits)
    try:
        with np.load(path, allow_pickle=False) as npz:  # object arrays raise instead of unpickling
            return {k: _numpy_tensor(npz[k], k) for k in npz.files if k in ARRAY_KEYS}, list(npz.files)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        if "allow_pickle" in str(exc):
            raise DatasetError(f"{path.name} holds an object array, i.e. pickled Python objects, which can run "
                               f"code and are never loaded (allow_pickle=False); save numeric arrays") from exc
        raise DatasetError(f"cannot read {path.name}: {exc}") from exc


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    try:
        with safe_open(str(path), framework="pt") as f:  # validates the header and buffer size
            names = list(f.keys())
            tensors = {k: f.get_tensor(k) for k in names if k in ARRAY_KEYS}
    except (SafetensorError, OSError, ValueError) as exc:
        raise DatasetError(f"{path.name} is not a valid safetensors file (truncated?): {exc}") from exc
    return {k: t.float() if t.is_floating_point() else t.long() for k, t in tensors.items()}, names


def _numpy_tensor(arr: np.ndarray, key: str) -> torch.Tensor:
    if arr.dtype.kind == "f":
        return torch.from_numpy(arr.astype(np.float32))
    if arr.dtype.kind in "biu":
        return torch.from_numpy(arr.astype(np.int64))
    raise DatasetError(f"array {key!r} has dtype {arr.dtype}; expected numbers")


def _token_arrays(arrays: dict[str, torch.Tensor], ids: torch.Tensor, ctx: ReadContext) -> dict[str, torch.Tensor]:
    if ids.is_floating_point() or ids.ndim != 2:
        raise DatasetError(f"token data needs integer token ids of shape (samples, length); got "
                           f"{ids.dtype} of shape {tuple(ids.shape)}")
    negative = (ids < 0).any(1)
    if negative.any():
        i = int(negative.nonzero()[0])
        raise DatasetError(f"input_ids[{i}] has a negative token id", row=i)
    max_len = ctx.input_shape[0] if ctx.input_shape and ctx.input_shape[0] > 0 else None
    if max_len is not None and ids.shape[1] > max_len:
        raise DatasetError(f"sequences have length {ids.shape[1]} but the teacher takes at most "
                           f"{max_len} tokens")
    inputs = {"input_ids": ids}
    for key in ("attention_mask", "token_type_ids"):
        if key in arrays:
            if arrays[key].shape != ids.shape or arrays[key].is_floating_point():
                raise DatasetError(f"{key} must be integers of the token ids' shape {tuple(ids.shape)}; got "
                                   f"{arrays[key].dtype} of shape {tuple(arrays[key].shape)}")
            inputs[key] = arrays[key]
    inputs.setdefault("attention_mask", torch.ones_like(ids))
    return inputs


def _array_targets(y: torch.Tensor, ctx: ReadContext) -> tuple[torch.Tensor, list[str] | None]:
    if y.ndim == 1:
        return parse_labels(y.numpy(), ctx.task, lambda i: i, "y", ctx.limits, ctx.spec.classes)
    if y.ndim == 2 and ctx.task != "classification":
        y = y.float()
        check_finite(y, "y", lambda i: i)
        return y, None
    raise DatasetError(f"y has shape {tuple(y.shape)}; expected class indices or values (N,)"
                       + ("" if ctx.task == "classification" else " or target vectors (N, D)"))
