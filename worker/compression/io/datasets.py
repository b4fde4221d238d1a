"""Read an uploaded dataset file into a `TensorData`.

Formats (``DataSpec.format``; ``auto`` picks by file extension):

* ``npz`` / ``safetensors``: array ``x`` (required) and ``y`` (optional). Float ``x`` of rank
  2 is vectors, 3 signals ``(N, C, L)``, 4 images ``(N, C, H, W)``. For a text teacher ``x``
  (or ``input_ids``) holds integer token ids, with optional ``attention_mask`` / ``token_type_ids``.
* ``csv`` / ``parquet`` (tabular): numeric feature columns and an optional label column.
* ``jsonl`` / ``text_csv`` (text): a text column, an optional text-pair column and an optional
  label, tokenized with the teacher's tokenizer. An auto-detected ``.csv`` is text when it has
  ``DataSpec.text_column`` (or the teacher takes text), else tabular.
* ``image_zip``: a zip (or tar, tar.gz) of class folders of PNG / JPEG images, resized and normalised.

Labels are optional everywhere: unlabelled data still serves for pure distillation. Integer
or string labels become class indices with ``classes`` names (integers ``k`` keep index ``k``;
strings are numbered in sorted order); fractional numbers are regression targets.

Row numbers in errors are where a person finds the row: the line number in CSV and JSONL
files (a CSV header is line 1), the 1-based row in Parquet, and the 0-based index ``i`` of
``x[i]`` in array files.

Hostile uploads: arrays never unpickle, image archives are extracted with the
`archives.safe_extract` rules, images are capped in pixels before decoding and only the
PNG and JPEG decoders run, and decompressed ``.npz`` content and image tensors are capped in bytes.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import math
import os
import tempfile
import warnings
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError, safe_open

from ..errors import DatasetError, SpecError, UnsafeFileError, UnsupportedFormatError
from ..spec import DataSpec
from ..types import InputKind, TensorData
from .archives import ArchiveLimits, safe_extract
from .hf_folder import tokenize

FORMATS = ("npz", "safetensors", "csv", "parquet", "jsonl", "text_csv", "image_zip")
_BY_SUFFIX = {".npz": "npz", ".safetensors": "safetensors", ".csv": "csv", ".parquet": "parquet",
              ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".zip": "image_zip",
              ".tar": "image_zip", ".tgz": "image_zip"}
ACCEPTED = (".npz, .safetensors, .csv, .parquet/.pq, .jsonl/.ndjson/.json (JSON Lines), "
            ".zip (image class folders)")
ARRAY_KEYS = ("x", "input_ids", "y", "attention_mask", "token_type_ids")
TABULAR_LABELS = ("label", "target", "y")
TEXT_LABELS = ("label",)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DEFAULT_IMAGE_MEAN = 0.5
DEFAULT_IMAGE_STD = 0.5
"""Without ``image_mean`` / ``image_std`` pixels in [0, 1] map to [-1, 1] on every channel."""
_RANK_KIND: dict[int, InputKind] = {2: "vector", 3: "signal", 4: "image"}

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
    archive: ArchiveLimits = field(default_factory=lambda: ArchiveLimits(max_entries=200_000))


@dataclass(frozen=True)
class _Ctx:
    """What the teacher and spec say about the data being read."""

    spec: DataSpec
    tokenizer: Any
    input_shape: tuple[int, ...] | None
    input_kind: InputKind | None
    task: str | None
    structure_only: bool
    limits: DataLimits


def load_dataset(
    path: str | os.PathLike[str],
    spec: DataSpec | None = None,
    *,
    tokenizer: Any = None,
    input_shape: tuple[int, ...] | None = None,
    input_kind: InputKind | None = None,
    task: str | None = None,
    structure_only: bool = False,
    limits: DataLimits = DataLimits(),
) -> TensorData:
    """Read ``path`` into tensors shaped for the teacher.

    ``input_shape`` (per sample; dims ≤ 0 are dynamic), ``input_kind``, ``task`` and
    ``tokenizer`` come from the teacher when known: array and tabular samples are reshaped
    to ``input_shape`` when the element counts agree, images are sized from it, text is
    tokenized with ``tokenizer``. ``structure_only`` parses text rows and labels without
    tokenizing (upload validation, before a teacher is chosen): token inputs are then empty
    ``(N, 0)`` tensors and ``meta["tokenized"]`` is False. ``limits`` caps hostile uploads.
    """
    path = Path(path)
    spec = spec or DataSpec()
    if not path.is_file():
        raise DatasetError(f"{path.name}: no such file")
    fmt = spec.format if spec.format != "auto" else _BY_SUFFIX.get(path.suffix.lower())
    if fmt is None:
        raise DatasetError(f"cannot tell the format of {path.name!r} from its extension; "
                           f"accepted: {ACCEPTED}")
    if input_shape is not None:
        input_shape = tuple(int(d) for d in input_shape)
    ctx = _Ctx(spec, tokenizer, input_shape, input_kind, task, structure_only, limits)
    if fmt in ("npz", "safetensors"):
        data = _load_arrays(path, fmt, ctx)
    elif fmt in ("csv", "text_csv"):
        data = _load_csv(path, fmt, ctx)
    elif fmt == "parquet":
        data = _load_parquet(path, ctx)
    elif fmt == "jsonl":
        data = _load_jsonl(path, ctx)
    else:
        data = _load_images(path, ctx)
    if input_kind is not None and data.input_kind != input_kind:
        raise DatasetError(f"the teacher takes {input_kind} inputs but {path.name} holds "
                           f"{data.input_kind} data")
    data.meta.setdefault("format", fmt)
    data.meta["file"] = path.name
    if data.classes is not None:
        data.meta["num_classes"] = len(data.classes)
    return data


def train_eval_split(train: TensorData, eval_data: TensorData | None,
                     spec: DataSpec) -> tuple[TensorData, TensorData]:
    """The training and evaluation data: ``eval_data`` made compatible with ``train``, or a
    seeded hold-out of ``spec.eval_fraction`` of ``train``.

    Token data of different padded lengths is right-padded (id 0, mask 0) to the longer one.
    Eval class labels are renumbered to the training ``classes`` when they are a subset.
    """
    if eval_data is None:
        try:
            return train.split(spec.eval_fraction, spec.split_seed)
        except ValueError as exc:
            raise DatasetError(f"cannot hold out {spec.eval_fraction:.0%} of {len(train)} samples "
                               f"for evaluation ({exc}); upload a separate evaluation dataset") from exc
    if eval_data.input_kind != train.input_kind:
        raise DatasetError(f"the evaluation data holds {eval_data.input_kind} inputs but the training data "
                           f"holds {train.input_kind} inputs")
    if set(eval_data.inputs) != set(train.inputs):
        raise DatasetError(f"the evaluation data has inputs {sorted(eval_data.inputs)} but the training data "
                           f"has {sorted(train.inputs)}")
    if train.input_kind == "tokens":
        length = max(train.inputs["input_ids"].shape[1], eval_data.inputs["input_ids"].shape[1])
        train, eval_data = _pad_tokens(train, length), _pad_tokens(eval_data, length)
    for key, value in train.inputs.items():
        got, want = tuple(eval_data.inputs[key].shape[1:]), tuple(value.shape[1:])
        if got != want:
            raise DatasetError(f"evaluation samples of {key!r} have shape {got} but training samples "
                               f"have {want}")
    return train, _align_labels(train, eval_data)


# --- arrays (.npz, .safetensors) ------------------------------------------------------------

def _load_arrays(path: Path, fmt: str, ctx: _Ctx) -> TensorData:
    arrays, names = _read_npz(path, ctx.limits) if fmt == "npz" else _read_safetensors(path)
    tokens = ctx.input_kind == "tokens" or (ctx.input_kind is None and "input_ids" in arrays)
    key = "input_ids" if tokens and "input_ids" in arrays else "x"
    if key not in arrays:
        present = ", ".join(sorted(names)) or "none"
        raise DatasetError(f"{path.name} has no array {key!r} (arrays present: {present})")
    x = arrays[key]
    if x.ndim == 0 or len(x) == 0:
        raise DatasetError(f"{path.name}: array {key!r} holds no samples (shape {tuple(x.shape)})")
    inputs = _token_arrays(arrays, x, ctx) if tokens else {"x": _feature_array(x, ctx)}
    y, classes = None, None
    if "y" in arrays:
        y = arrays["y"]
        if y.ndim == 0 or len(y) != len(x):
            raise DatasetError(f"{path.name}: {key} has {len(x)} rows but y has "
                               f"{len(y) if y.ndim else 'no'} rows")
        y, classes = _array_targets(y, ctx)
    kind: InputKind = "tokens" if tokens else _RANK_KIND[inputs["x"].ndim]
    return TensorData(inputs, y, kind, classes)


def _read_npz(path: Path, limits: DataLimits) -> tuple[dict[str, torch.Tensor], list[str]]:
    try:
        with zipfile.ZipFile(path) as zf:
            declared = sum(info.file_size for info in zf.infolist())
    except (zipfile.BadZipFile, OSError) as exc:
        raise DatasetError(f"{path.name} is not an .npz archive: {exc}") from exc
    if declared > limits.max_array_bytes:
        raise DatasetError(f"{path.name} expands to {declared:,} bytes (limit {limits.max_array_bytes:,})")
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


def _feature_array(x: torch.Tensor, ctx: _Ctx) -> torch.Tensor:
    """Float samples reshaped for the teacher, of a rank that names an input kind."""
    if x.ndim < 2:
        raise DatasetError(f"x must be (samples, features...), got shape {tuple(x.shape)}; "
                           "save a single feature as shape (N, 1)")
    x = x.float()
    _check_finite(x, "x", lambda i: i)
    x = x.reshape(len(x), *_target_shape(tuple(x.shape[1:]), ctx.input_shape, reshape=True))
    if x.ndim not in _RANK_KIND:
        raise DatasetError(f"x has samples of shape {tuple(x.shape[1:])}; expected vectors (F,), "
                           "signals (C, L) or images (C, H, W)")
    return x


def _token_arrays(arrays: dict[str, torch.Tensor], ids: torch.Tensor, ctx: _Ctx) -> dict[str, torch.Tensor]:
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


def _array_targets(y: torch.Tensor, ctx: _Ctx) -> tuple[torch.Tensor, list[str] | None]:
    if y.ndim == 1:
        return _labels(y.numpy(), ctx.task, lambda i: i, "y", ctx.limits)
    if y.ndim == 2 and ctx.task != "classification":
        y = y.float()
        _check_finite(y, "y", lambda i: i)
        return y, None
    raise DatasetError(f"y has shape {tuple(y.shape)}; expected class indices or values (N,)"
                       + ("" if ctx.task == "classification" else " or target vectors (N, D)"))


def _check_finite(t: torch.Tensor, name: str, row_of: RowOf) -> None:
    bad = ~torch.isfinite(t.reshape(len(t), -1)).all(1)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise DatasetError(f"{name}[{i}] has a NaN or infinite value", row=row_of(i))


def _target_shape(got: tuple[int, ...], want: tuple[int, ...] | None, *, reshape: bool) -> tuple[int, ...]:
    """The per-sample shape to use: ``got`` when it fits the teacher's ``want``, else ``want``
    when ``reshape`` is allowed and the element counts agree (e.g. 64-vectors for an 8×8 CNN)."""
    if want is None or (len(got) == len(want) and all(w <= 0 or g == w for g, w in zip(got, want))):
        return got
    if reshape and all(w > 0 for w in want) and math.prod(got) == math.prod(want):
        return want
    raise DatasetError(f"samples have shape {got} ({math.prod(got)} values) but the teacher expects "
                       f"{want} ({math.prod(want) if all(w > 0 for w in want) else 'dynamic'} values)")


# --- labels -------------------------------------------------------------------------------

def _labels(values: np.ndarray, task: str | None, row_of: RowOf, what: str,
            limits: DataLimits) -> tuple[torch.Tensor, list[str] | None]:
    """Per-sample labels to class indices (integers, strings) or float regression targets."""
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
            return _string_classes([str(v) for v in values], limits)
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
    return torch.from_numpy(ints), [str(k) for k in range(int(ints.max()) + 1)]


def _string_classes(labels: list[str], limits: DataLimits) -> tuple[torch.Tensor, list[str]]:
    classes = sorted(set(labels))
    if len(classes) > limits.max_classes:
        raise DatasetError(f"{len(classes)} distinct labels, over the limit of {limits.max_classes} classes")
    index = {c: i for i, c in enumerate(classes)}
    return torch.tensor([index[s] for s in labels], dtype=torch.long), classes


def _label_column(columns: list[str], spec: DataSpec, defaults: tuple[str, ...], source: str) -> str | None:
    if spec.label_column is not None:
        if spec.label_column not in columns:
            raise DatasetError(f"{source} has no label column {spec.label_column!r}; "
                               f"columns: {', '.join(columns)}")
        return spec.label_column
    return next((c for c in defaults if c in columns), None)


def _is_index_classes(classes: list[str]) -> bool:
    return classes == [str(i) for i in range(len(classes))]


def _align_labels(train: TensorData, eval_data: TensorData) -> TensorData:
    if train.y is None or eval_data.y is None:
        return eval_data
    if (train.classes is None) != (eval_data.classes is None):
        kinds = ("class labels", "numeric targets")
        raise DatasetError(f"the training data has {kinds[train.classes is None]} but the evaluation data has "
                           f"{kinds[eval_data.classes is None]}")
    if train.classes is None or eval_data.classes is None:
        if train.y.shape[1:] != eval_data.y.shape[1:]:
            raise DatasetError(f"evaluation targets have shape {tuple(eval_data.y.shape[1:])} but training "
                               f"targets have {tuple(train.y.shape[1:])}")
        return eval_data
    if _is_index_classes(train.classes) and _is_index_classes(eval_data.classes):
        return eval_data  # same numbering; either side may simply lack the highest classes
    unknown = [c for c in eval_data.classes if c not in train.classes]
    if unknown:
        raise DatasetError("the evaluation data has classes the training data lacks: "
                           + ", ".join(unknown[:10]))
    index = {c: i for i, c in enumerate(train.classes)}
    remap = torch.tensor([index[c] for c in eval_data.classes], dtype=torch.long)
    return replace(eval_data, y=remap[eval_data.y], classes=train.classes)


def _pad_tokens(data: TensorData, length: int) -> TensorData:
    pad = length - data.inputs["input_ids"].shape[1]
    if pad == 0:
        return data
    return replace(data, inputs={k: F.pad(v, (0, pad), value=0) for k, v in data.inputs.items()})


# --- tables (.csv, .parquet) ---------------------------------------------------------------

def _load_csv(path: Path, fmt: str, ctx: _Ctx) -> TensorData:
    text = _read_utf8(path)
    header = next(csv.reader(io.StringIO(text)), [])
    is_text = fmt == "text_csv" or (ctx.spec.format == "auto" and (
        ctx.spec.text_column in header or ctx.input_kind == "tokens"))
    try:
        if is_text:  # every cell as the string written (empty stays "")
            df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
        else:
            df = pd.read_csv(io.StringIO(text))
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise DatasetError(f"{path.name} is not a readable CSV file: {exc}") from exc

    def row_of(i: int) -> int:
        return _csv_line(text, i)

    if is_text:
        columns = [str(c) for c in df.columns]
        data = _load_text({c: df[c].to_numpy(dtype=object) for c in columns}, columns, len(df), row_of, ctx,
                          path.name)
        data.meta["format"] = "text_csv"
        return data
    return _load_table(df, row_of, ctx, path.name)


def _load_parquet(path: Path, ctx: _Ctx) -> TensorData:
    try:
        df = pd.read_parquet(path)
    except (ValueError, OSError) as exc:
        raise DatasetError(f"{path.name} is not a readable Parquet file: {exc}") from exc
    return _load_table(df, lambda i: i + 1, ctx, path.name)


def _load_table(df: pd.DataFrame, row_of: RowOf, ctx: _Ctx, source: str) -> TensorData:
    df.columns = [str(c) for c in df.columns]
    columns = list(df.columns)
    if len(df) == 0:
        raise DatasetError(f"{source} holds no data rows")
    label = _label_column(columns, ctx.spec, TABULAR_LABELS, source)
    features = df.drop(columns=[label]) if label else df
    if features.shape[1] == 0:
        raise DatasetError(f"{source} has no feature columns besides the label {label!r}")
    try:
        values = features.apply(pd.to_numeric, errors="coerce").to_numpy(np.float64, na_value=np.nan)
    except (TypeError, ValueError) as exc:
        raise DatasetError(f"{source}: feature columns must hold plain numbers ({exc})") from exc
    bad = ~np.isfinite(values)
    if bad.any():
        r, c = (int(v) for v in np.argwhere(bad)[0])  # the first bad row, then its leftmost bad column
        raw = features.iat[r, c]
        shown = repr(raw) if isinstance(raw, str) else str(raw)
        reason = "missing value" if pd.isna(raw) else f"{shown} is not a finite number"
        raise DatasetError(f"column {features.columns[c]!r}: {reason}", row=row_of(r))
    x = _feature_array(torch.from_numpy(values.astype(np.float32)), ctx)
    y, classes = (None, None)
    if label:
        y, classes = _labels(df[label].to_numpy(), ctx.task, row_of, f"column {label!r}", ctx.limits)
    meta = {"columns": list(features.columns), "label_column": label or ""}
    return TensorData({"x": x}, y, _RANK_KIND[x.ndim], classes, meta=meta)


def _read_utf8(path: Path) -> str:
    raw = path.read_bytes()
    body = raw.removeprefix(codecs.BOM_UTF8)
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = exc.start + len(raw) - len(body)
        line = raw.count(b"\n", 0, offset) + 1
        raise DatasetError(f"{path.name} is not UTF-8 text: byte 0x{raw[offset]:02x} at offset {offset} "
                           f"(line {line}); save the file as UTF-8") from exc


def _csv_line(text: str, index: int) -> int:
    """The line (header = line 1) where data row ``index`` (0-based, blank lines skipped as
    pandas does) starts; exact even with quoted line breaks. Only called to report an error."""
    reader = csv.reader(io.StringIO(text))
    start, seen = 1, -1  # -1: the header row
    for row in reader:
        if row:
            if seen == index:
                return start
            seen += 1
        start = reader.line_num + 1
    return start


# --- text (.jsonl, text .csv) -------------------------------------------------------------

def _load_jsonl(path: Path, ctx: _Ctx) -> TensorData:
    records, lines = [], []
    for number, line in enumerate(_read_utf8(path).split("\n"), 1):  # not splitlines: JSON may hold U+2028
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"not valid JSON: {exc.msg} (column {exc.colno})", row=number) from exc
        if not isinstance(record, dict):
            raise DatasetError(f"expected one JSON object per line (JSON Lines), got {type(record).__name__}",
                               row=number)
        records.append(record)
        lines.append(number)
    names = list(dict.fromkeys(k for r in records for k in r))
    columns = {k: pd.Series([r.get(k) for r in records], dtype=object).to_numpy() for k in names}
    return _load_text(columns, names, len(records), lines.__getitem__, ctx, path.name)


def _load_text(columns: dict[str, np.ndarray], names: list[str], n: int, row_of: RowOf, ctx: _Ctx,
               source: str) -> TensorData:
    spec = ctx.spec
    if ctx.tokenizer is None and not ctx.structure_only:
        raise DatasetError("text data needs a teacher with a tokenizer")
    if n == 0:
        raise DatasetError(f"{source} holds no rows")
    if spec.text_column not in names:
        raise DatasetError(f"{source} has no text column {spec.text_column!r}; columns: {', '.join(names)}")
    texts = _texts(columns[spec.text_column], spec.text_column, row_of)
    pairs = None
    if spec.text_pair_column in names:
        pairs = _texts(columns[spec.text_pair_column], spec.text_pair_column, row_of)
    label = _label_column(names, spec, TEXT_LABELS, source)
    y, classes = (None, None)
    if label:
        y, classes = _labels(columns[label], ctx.task, row_of, f"column {label!r}", ctx.limits)
    meta = {"label_column": label or "", "text_pairs": pairs is not None, "tokenized": not ctx.structure_only}
    return TensorData(_tokenize(texts, pairs, ctx), y, "tokens", classes, texts=texts, meta=meta)


def _texts(values: np.ndarray, column: str, row_of: RowOf) -> list[str]:
    for i, v in enumerate(values):
        if not isinstance(v, str):
            missing = v is None or (isinstance(v, float) and math.isnan(v))
            problem = "missing text" if missing else f"text must be a string, got {type(v).__name__}"
            raise DatasetError(f"column {column!r}: {problem}", row=row_of(i))
        if not v.strip():
            raise DatasetError(f"column {column!r}: empty text", row=row_of(i))
    return list(values)


def _tokenize(texts: list[str], pairs: list[str] | None, ctx: _Ctx) -> dict[str, torch.Tensor]:
    if ctx.structure_only:
        empty = torch.zeros((len(texts), 0), dtype=torch.long)
        return {"input_ids": empty, "attention_mask": empty.clone()}
    max_length = ctx.spec.max_length
    if ctx.input_shape and ctx.input_shape[0] > 0:
        max_length = min(max_length, ctx.input_shape[0])
    return tokenize(ctx.tokenizer, texts, pairs, max_length=max_length)


# --- images (.zip of class folders) -------------------------------------------------------

def _load_images(path: Path, ctx: _Ctx) -> TensorData:
    spec, limits = ctx.spec, ctx.limits
    with tempfile.TemporaryDirectory(prefix="kdq-images-") as tmp:
        try:
            root = safe_extract(path, tmp, limits.archive)
        except (UnsafeFileError, UnsupportedFormatError) as exc:
            raise DatasetError(f"{path.name}: {exc}") from exc
        samples, classes = _class_folders(root)
        want = ctx.input_shape if ctx.input_shape is not None and len(ctx.input_shape) == 3 else None
        gray = spec.grayscale if spec.grayscale is not None else (want is not None and want[0] == 1)
        mode, channels = ("L", 1) if gray else ("RGB", 3)
        if spec.image_size is not None:
            size = tuple(spec.image_size)
        elif want is not None and want[1] > 0 and want[2] > 0:
            size = (want[1], want[2])
        else:
            size = _decode(samples[0][0], root, mode, None, limits).shape[:2]
        _target_shape((channels, *size), ctx.input_shape, reshape=False)
        if len(samples) * channels * size[0] * size[1] * 4 > limits.max_array_bytes:
            raise DatasetError(f"{len(samples)} images of {channels}x{size[0]}x{size[1]} exceed the limit of "
                               f"{limits.max_array_bytes:,} bytes")
        mean, std = _normaliser(spec, channels)
        x = np.empty((len(samples), channels, *size), dtype=np.float32)
        for i, (file, _) in enumerate(samples):
            pixels = _decode(file, root, mode, size, limits)
            x[i] = ((pixels[None] if gray else pixels.transpose(2, 0, 1)) - mean) / std
    y = torch.tensor([label for _, label in samples], dtype=torch.long)
    meta = {"image_size": list(size), "channels": channels, "image_mean": mean.ravel().tolist(),
            "image_std": std.ravel().tolist()}
    return TensorData({"x": torch.from_numpy(x)}, y, "image", classes, meta=meta)


def _visible(p: Path) -> bool:
    return not p.name.startswith(".") and p.name != "__MACOSX"


def _class_folders(root: Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """Image files with their class index, and the class names (sorted folder names).
    One wrapper folder around the class folders is allowed."""
    top = root
    entries = sorted(p for p in top.iterdir() if _visible(p))
    wrapper = entries[0] if len(entries) == 1 and entries[0].is_dir() else None
    if wrapper is not None and any(c.is_dir() and _visible(c) for c in wrapper.iterdir()):
        top = wrapper
        entries = sorted(p for p in top.iterdir() if _visible(p))
    loose = [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if loose:
        raise DatasetError(f"image {loose[0].relative_to(root).as_posix()} is not inside a class folder; "
                           "expected class_name/image.png")
    folders = [p for p in entries if p.is_dir()]
    if not folders:
        raise DatasetError("no class folders found; expected a zip of class_name/image.png (or .jpg)")
    samples: list[tuple[Path, int]] = []
    for label, folder in enumerate(folders):
        files = sorted(f for f in folder.rglob("*")
                       if f.is_file() and all(_visible(Path(part)) for part in f.relative_to(folder).parts))
        for f in files:
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                raise DatasetError(f"{f.relative_to(root).as_posix()}: unsupported file type; "
                                   f"accepted: {', '.join(IMAGE_SUFFIXES)}")
        if not files:
            raise DatasetError(f"class folder {folder.relative_to(root).as_posix()!r} has no images")
        samples += [(f, label) for f in files]
    return samples, [p.name for p in folders]


def _decode(file: Path, root: Path, mode: str, size: tuple[int, ...] | None,
            limits: DataLimits) -> np.ndarray:
    """One image as float32 in [0, 1], (H, W) or (H, W, 3), resized to ``size`` (H, W) if given."""
    name = file.relative_to(root).as_posix()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(file, formats=("PNG", "JPEG")) as img:  # reads the header only
                w, h = img.size
                if w * h > limits.max_image_pixels:
                    raise DatasetError(f"image {name} is {w}x{h} pixels, over the limit of "
                                       f"{limits.max_image_pixels:,} (decompression bomb?)")
                out = img.convert(mode)
                if size is not None and out.size != (size[1], size[0]):
                    out = out.resize((size[1], size[0]), Image.Resampling.BILINEAR)
                return np.asarray(out, dtype=np.float32) / 255.0
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DatasetError(f"image {name}: {exc}") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(f"image {name} is corrupt or not a PNG/JPEG: {exc}") from exc


def _normaliser(spec: DataSpec, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std shaped (C or 1, 1, 1) to broadcast over a (C, H, W) image."""
    mean = np.asarray(spec.image_mean or [DEFAULT_IMAGE_MEAN], dtype=np.float32)
    std = np.asarray(spec.image_std or [DEFAULT_IMAGE_STD], dtype=np.float32)
    for name, values in (("image_mean", mean), ("image_std", std)):
        if len(values) not in (1, channels):
            raise SpecError(f"data.{name} has {len(values)} values; give 1 or {channels} (one per channel)")
    if (std <= 0).any():
        raise SpecError("data.image_std values must be positive")
    return mean.reshape(-1, 1, 1), std.reshape(-1, 1, 1)
