"""What every dataset reader shares: the caps against hostile uploads, the read context (what the
teacher and spec say about the data), label parsing, and the shape and finiteness checks."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..errors import DatasetError, TooCostlyError, did_you_mean
from ..spec import DataSpec
from ..spec.sizes import describe_bytes
from ..types import InputKind
from .archives import ArchiveLimits

RANK_KIND: dict[int, InputKind] = {2: "vector", 3: "signal", 4: "image"}

RowOf = Callable[[int], int]
"""Maps a 0-based sample index to the row number shown in errors."""


@dataclass(frozen=True)
class DataLimits:
    """Caps against hostile uploads (decompression bombs, absurd sizes)."""

    max_image_pixels: int = 50_000_000
    """Per image, checked from the header before decoding (Pillow's own bomb check also applies)."""
    max_array_bytes: int = 8 << 30
    """Largest decompressed ``.npz`` content and largest image tensor."""
    max_classes: int = 100_000
    max_columns: int = 10_000
    """Distinct JSON Lines keys and table columns (each becomes a column in memory)."""
    memory_bytes: int | None = None
    """The reader's own memory limit (the validation or job cap): decoded data must fit in half of it."""
    archive: ArchiveLimits = field(default_factory=lambda: ArchiveLimits(max_entries=200_000))

    @property
    def array_bytes(self) -> int:
        """The largest decoded data allowed: ``max_array_bytes``, or half the memory limit if smaller."""
        return min(self.max_array_bytes, self.memory_bytes // 2) if self.memory_bytes else self.max_array_bytes


def too_large(what: str, need: int, limits: DataLimits) -> DatasetError | TooCostlyError:
    """The error for decoded data past ``limits.array_bytes``: a memory-limit refusal when that is
    what binds (code ``resource_limit``), else the dataset cap."""
    if limits.memory_bytes and limits.array_bytes < limits.max_array_bytes:
        return TooCostlyError(f"{what} take about {describe_bytes(need)} decoded, past half of this task's "
                              f"memory limit of {describe_bytes(limits.memory_bytes)}")
    return DatasetError(f"{what} take {need:,} bytes decoded, over the limit of {limits.max_array_bytes:,}")



@dataclass(frozen=True)
class ReadContext:
    """What the teacher and spec say about the data being read."""

    spec: DataSpec
    tokenizer: Any
    input_shape: tuple[int, ...] | None
    input_kind: InputKind | None
    task: str | None
    structure_only: bool
    limits: DataLimits
    vocabularies: list[dict[str, Any]] | None = None
    """Categorical vocabularies to read tables with (the teacher's, or the training file's for an
    evaluation file); None: built from the file (`data_vocab`)."""
    leading_columns: list[str] | None = None
    """Table columns that come first in ``x``, read as integer ids: a click ONNX teacher's id inputs
    (`onnx_inputs`)."""


def feature_array(x: torch.Tensor, ctx: ReadContext) -> torch.Tensor:
    """Float samples reshaped for the teacher, of a rank that names an input kind."""
    if x.ndim < 2:
        raise DatasetError(f"x must be (samples, features...), got shape {tuple(x.shape)}; "
                           "save a single feature as shape (N, 1)")
    x = x.float()
    check_finite(x, "x", lambda i: i)
    x = x.reshape(len(x), *target_shape(tuple(x.shape[1:]), ctx.input_shape, reshape=True))
    if x.ndim not in RANK_KIND:
        raise DatasetError(f"x has samples of shape {tuple(x.shape[1:])}; expected vectors (F,), "
                           "signals (C, L) or images (C, H, W)")
    return x


def check_finite(t: torch.Tensor, name: str, row_of: RowOf) -> None:
    bad = ~torch.isfinite(t.reshape(len(t), -1)).all(1)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise DatasetError(f"{name}[{i}] has a NaN or infinite value", row=row_of(i))


def target_shape(got: tuple[int, ...], want: tuple[int, ...] | None, *, reshape: bool) -> tuple[int, ...]:
    """The per-sample shape to use: ``got`` when it fits the teacher's ``want``, else ``want``
    when ``reshape`` is allowed and the element counts agree (e.g. 64-vectors for an 8×8 CNN)."""
    if want is None or (len(got) == len(want) and all(w <= 0 or g == w for g, w in zip(got, want))):
        return got
    if reshape and all(w > 0 for w in want) and math.prod(got) == math.prod(want):
        return want
    raise DatasetError(f"samples have shape {got} ({math.prod(got)} values) but the teacher expects "
                       f"{want} ({math.prod(want) if all(w > 0 for w in want) else 'dynamic'} values)")


# --- labels -------------------------------------------------------------------------------

def parse_labels(values: np.ndarray, task: str | None, row_of: RowOf, what: str,
                 limits: DataLimits, order: list[str] | None = None) -> tuple[torch.Tensor, list[str] | None]:
    """Per-sample labels to class indices (integers, strings) or float regression targets. String
    labels are numbered in ``order`` (the teacher's class names) when given, else sorted."""
    missing = pd.isna(values)
    if values.dtype == object:
        missing |= np.array([isinstance(v, str) and not v.strip() for v in values], dtype=bool)
    if missing.any():
        raise DatasetError(f"{what}: missing label", row=row_of(int(missing.argmax())))
    if values.dtype.kind in "biuf":
        numbers = values.astype(np.float64)
    else:
        for i, v in enumerate(values):
            if not isinstance(v, (str, int, float)):
                raise DatasetError(f"{what}: a label must be a number or a string, got {type(v).__name__}",
                                   row=row_of(i))
        numbers = pd.to_numeric(pd.Series(values, dtype=object), errors="coerce").to_numpy(np.float64)
        non_numeric = np.isnan(numbers)
        if non_numeric.any():
            if task == "regression":
                i = int(non_numeric.argmax())
                raise DatasetError(f"{what}: label {values[i]!r} is not a number (regression needs numbers)",
                                   row=row_of(i))
            return string_classes([str(v) for v in values], limits, order, row_of, what)
    if not np.isfinite(numbers).all():
        i = int((~np.isfinite(numbers)).argmax())
        raise DatasetError(f"{what}: label {numbers[i]} is not a finite number", row=row_of(i))
    fractional = numbers != np.round(numbers)
    if task == "regression" or (fractional.any() and task != "classification"):
        return torch.from_numpy(numbers.astype(np.float32)), None
    if fractional.any():
        i = int(fractional.argmax())
        raise DatasetError(f"{what}: label {numbers[i]} is not a class index", row=row_of(i))
    ints = numbers.astype(np.int64)
    if (ints < 0).any():
        i = int((ints < 0).argmax())
        raise DatasetError(f"{what}: class label {ints[i]} is negative", row=row_of(i))
    if ints.max() >= limits.max_classes:
        i = int(ints.argmax())
        raise DatasetError(f"{what}: class label {ints[i]} is past the limit of {limits.max_classes} classes",
                           row=row_of(i))
    if order is not None:
        return _integers_with_classes(ints, order, row_of, what)
    return torch.from_numpy(ints), [str(k) for k in range(int(ints.max()) + 1)]


def _integers_with_classes(ints: np.ndarray, order: list[str], row_of: RowOf,
                           what: str) -> tuple[torch.Tensor, list[str]]:
    """Integer labels read with class names ``order``: names when every label's decimal text is one of
    them (``1, 2, 3`` with classes ``1,2,3``), numbered as the names are; else indices into ``order``."""
    index = {c: i for i, c in enumerate(order)}
    values = np.unique(ints)
    if all(str(v) in index for v in values):
        lookup = np.array([index[str(v)] for v in values], dtype=np.int64)
        return torch.from_numpy(lookup[np.searchsorted(values, ints)]), list(order)
    outside = ints >= len(order)
    if outside.any():
        i = int(outside.argmax())
        shown = f"{', '.join(order[:20])}{' …' if len(order) > 20 else ''}"
        hint = (f"; the labels run 1..{len(order)}: if they count from 1, subtract 1 from each (or give "
                "classes named as the labels are)") if int(ints.min()) == 1 and int(ints.max()) == len(order) else ""
        raise DatasetError(f"{what}: label {int(ints[i])} is neither one of the classes ({shown}) nor an index "
                           f"into them (0..{len(order) - 1}){hint}", row=row_of(i))
    return torch.from_numpy(ints), list(order)  # indices into the teacher's outputs, named as it names them


def string_classes(labels: list[str], limits: DataLimits, order: list[str] | None = None,
                   row_of: RowOf = lambda i: i, what: str = "labels") -> tuple[torch.Tensor, list[str]]:
    """Class indices of string labels: positions in ``order`` when given (every label must be in it),
    else in the sorted set of labels."""
    if order is not None:
        index = {c: i for i, c in enumerate(order)}
        unknown = [i for i, s in enumerate(labels) if s not in index]
        if unknown:
            seen = sorted({labels[i] for i in unknown})
            raise DatasetError(f"{what}: label {labels[unknown[0]]!r} is not one of the classes "
                               f"{', '.join(order[:20])}{' …' if len(order) > 20 else ''} "
                               f"({len(seen)} unknown label(s): {', '.join(seen[:5])})", row=row_of(unknown[0]))
        return torch.tensor([index[s] for s in labels], dtype=torch.long), list(order)
    classes = sorted(set(labels))
    if len(classes) > limits.max_classes:
        raise DatasetError(f"{len(classes)} distinct labels, over the limit of {limits.max_classes} classes")
    index = {c: i for i, c in enumerate(classes)}
    return torch.tensor([index[s] for s in labels], dtype=torch.long), classes


def label_column(columns: list[str], spec: DataSpec, defaults: tuple[str, ...], source: str) -> str | None:
    if spec.label_column is not None:
        if spec.label_column not in columns:
            shown = ", ".join(columns[:50]) + (", …" if len(columns) > 50 else "")
            raise DatasetError(f"{source} has no label column {spec.label_column!r}"
                               f"{did_you_mean(spec.label_column, columns, n=2, cutoff=0.6)}; columns: {shown}")
        return spec.label_column
    return next((c for c in defaults if c in columns), None)


def _visible(p: Path) -> bool:
    return not p.name.startswith(".") and p.name != "__MACOSX"


def class_folders(root: Path, suffixes: tuple[str, ...], *, example: str, noun: str,
                  loose_suffixes: tuple[str, ...] | None = None) -> tuple[list[tuple[Path, int]], list[str]]:
    """Files in class folders (an image or audio zip, extracted at ``root``) with their class index, and
    the class names (sorted folder names); one wrapper folder around the class folders is allowed.
    A file beside the class folders is refused when its suffix is in ``loose_suffixes`` (None: any file);
    a file of another type inside them is refused. ``example``: ``class_name/image.png``."""
    top = root
    entries = sorted(p for p in top.iterdir() if _visible(p))
    wrapper = entries[0] if len(entries) == 1 and entries[0].is_dir() else None
    if wrapper is not None and any(c.is_dir() and _visible(c) for c in wrapper.iterdir()):
        top = wrapper
        entries = sorted(p for p in top.iterdir() if _visible(p))
    loose = [p for p in entries if p.is_file() and (loose_suffixes is None or p.suffix.lower() in loose_suffixes)]
    if loose:
        raise DatasetError(f"{loose[0].relative_to(root).as_posix()} is not inside a class folder; expected {example}")
    folders = [p for p in entries if p.is_dir()]
    if not folders:
        raise DatasetError(f"no class folders found; expected a zip of {example}")
    samples: list[tuple[Path, int]] = []
    for label, folder in enumerate(folders):
        files = sorted(f for f in folder.rglob("*")
                       if f.is_file() and all(_visible(Path(part)) for part in f.relative_to(folder).parts))
        for f in files:
            if f.suffix.lower() not in suffixes:
                raise DatasetError(f"{f.relative_to(root).as_posix()}: unsupported file type; "
                                   f"accepted: {', '.join(suffixes)}")
        if not files:
            raise DatasetError(f"class folder {folder.relative_to(root).as_posix()!r} has no {noun}")
        samples += [(f, label) for f in files]
    return samples, [p.name for p in folders]
