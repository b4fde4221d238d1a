"""Checked safetensors reading and writing.

The header is validated first (`safetensors_header`, torch-free, shared with the API's
upload checks) before any tensor is allocated, then names and shapes are checked against
the model, then the tensors are loaded and checked to be finite.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_model
from torch import nn

from ..errors import (
    MissingTensorError,
    ModelFileError,
    NonFiniteWeightsError,
    ShapeMismatchError,
    UnexpectedTensorError,
)
from .safetensors_header import DTYPE_SIZES, MAX_HEADER_BYTES, TensorInfo, read_header

__all__ = ["DTYPE_SIZES", "MAX_HEADER_BYTES", "TensorInfo", "check_header", "load_into", "load_state_dict",
           "read_header", "save_module"]

_SHOW = 5


def _names(names: Collection[str]) -> str:
    ordered = sorted(names)
    more = f" and {len(ordered) - _SHOW} more" if len(ordered) > _SHOW else ""
    return ", ".join(repr(n) for n in ordered[:_SHOW]) + more


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
