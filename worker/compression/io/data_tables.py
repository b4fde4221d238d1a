"""Tabular and text datasets: ``.csv`` / ``.parquet`` tables (numeric features and a label column),
``.jsonl`` and text ``.csv`` (a text column, an optional pair column and label, tokenized with the
teacher's tokenizer). Row numbers in errors are where a person finds the row (CSV / JSONL lines,
1-based Parquet rows)."""

from __future__ import annotations

import codecs
import csv
import io
import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..errors import DatasetError
from ..types import TensorData
from .data_common import (
    RANK_KIND,
    ReadContext,
    RowOf,
    feature_array,
    label_column,
    parse_labels,
    too_large,
)
from .data_series import load_series
from .data_tokens import is_token_file, load_token_records
from .data_vocab import encode_table, mostly_text
from .hf_folder import tokenize

TABULAR_LABELS = ("label", "target", "y")
TEXT_LABELS = ("label",)
LABEL_LIKE = ("label", "labels", "target", "class", "classes", "y", "species", "diagnosis", "category", "outcome")
"""Names of a text column that likely holds labels: read without ``label_column`` it is a categorical
input instead, and the summary warns."""


# --- tables (.csv, .parquet) ---------------------------------------------------------------

def load_csv(path: Path, fmt: str, ctx: ReadContext) -> TensorData:
    text = _read_utf8(path)
    header = next(csv.reader(io.StringIO(text)), [])
    if len(header) > ctx.limits.max_columns:
        raise DatasetError(f"{path.name} has {len(header):,} columns, over the limit of {ctx.limits.max_columns:,}")
    is_text = fmt == "text_csv" or (ctx.spec.format == "auto" and ctx.spec.task is None and (
        ctx.spec.text_column in header or ctx.input_kind == "tokens"))
    try:
        if is_text:  # every cell as the string written (empty stays "")
            df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
        else:  # categorical columns named up front keep their text as written ("007" stays "007")
            named = [v["column"] for v in ctx.vocabularies or []] or list(ctx.spec.categorical_columns or [])
            df = pd.read_csv(io.StringIO(text), dtype=dict.fromkeys(named, str) or None)
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


def load_parquet(path: Path, ctx: ReadContext) -> TensorData:
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path).metadata  # the footer only: rows and columns before any decoding
        if meta.num_columns > ctx.limits.max_columns:
            raise DatasetError(f"{path.name} has {meta.num_columns:,} columns, over the limit of "
                               f"{ctx.limits.max_columns:,}")
        need = meta.num_rows * meta.num_columns * 8 * 3  # decoded, as a DataFrame, then as tensors
        if need > ctx.limits.array_bytes:
            raise too_large(f"{meta.num_rows:,} rows of {meta.num_columns} columns", need, ctx.limits)
        df = pd.read_parquet(path)
    except (ValueError, OSError) as exc:
        raise DatasetError(f"{path.name} is not a readable Parquet file: {exc}") from exc
    return _load_table(df, lambda i: i + 1, ctx, path.name)


def _load_table(df: pd.DataFrame, row_of: RowOf, ctx: ReadContext, source: str) -> TensorData:
    df.columns = [str(c) for c in df.columns]
    columns = list(df.columns)
    if len(df) == 0:
        raise DatasetError(f"{source} holds no data rows")
    if ctx.spec.task == "forecasting":
        return load_series(df, row_of, ctx, source)
    if ctx.spec.task == "policy" and ctx.spec.action_columns:
        return _load_logged_actions(df, row_of, ctx, source)
    label = label_column(columns, ctx.spec, TABULAR_LABELS, source)
    features = df.drop(columns=[label]) if label else df
    if features.shape[1] == 0:
        raise DatasetError(f"{source} has no feature columns besides the label {label!r}")
    if ctx.leading_columns:
        features = _lead(features, ctx.leading_columns, ctx, source)
    features, vocabs = encode_table(features, ctx.spec, ctx.vocabularies, source)
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
    x = feature_array(torch.from_numpy(values.astype(np.float32)), ctx)
    y, classes = (None, None)
    if label:
        y, classes = parse_labels(df[label].to_numpy(), ctx.task, row_of, f"column {label!r}", ctx.limits,
                                    ctx.spec.classes)
    meta: dict[str, Any] = {"columns": list(features.columns), "label_column": label or ""}
    if vocabs:
        meta["categorical"] = vocabs
        meta["categorical_columns"] = ",".join(v["column"] for v in vocabs)
        named = [v["column"] for v in vocabs if v["column"].strip().lower() in LABEL_LIKE]
        if not label and named:
            meta["warning"] = (f"column {named[0]!r} holds text and is read as a categorical input, so the data "
                               f"is unlabelled; if it holds the labels, upload again with label_column={named[0]}")
    if ctx.spec.task == "ctr" or (vocabs and classes is not None and len(classes) == 2):
        if classes is None or len(classes) != 2:
            raise DatasetError(f"task 'ctr' needs click labels of two classes (0 / 1) in {source} to measure AUC; "
                               f"got {'no label column' if y is None else f'{len(classes or [])} classes'}")
        meta["field"] = "ctr"
    return TensorData({"x": x}, y, RANK_KIND[x.ndim], classes, meta=meta)


def _lead(features: pd.DataFrame, lead: list[str], ctx: ReadContext, source: str) -> pd.DataFrame:
    """``features`` with the teacher's id columns first (`onnx_inputs`): they hold the ids it was trained on."""
    missing = [c for c in lead if c not in features.columns]
    if missing:
        raise DatasetError(f"the ONNX teacher takes ids in input(s) {', '.join(repr(c) for c in lead)}; {source} has "
                           f"no column {', '.join(repr(c) for c in missing)}")
    named = set(ctx.spec.categorical_columns or []) & set(lead)
    text = [c for c in lead if mostly_text(features[c])]
    if named or text:
        column = min(named or text)
        raise DatasetError(f"column {column!r} feeds the ONNX teacher's id input {column!r}: it must hold the integer "
                           "ids the teacher was trained on, read as they are (not text, not a categorical column)")
    return features[[*lead, *(c for c in features.columns if c not in lead)]]


def _load_logged_actions(df: pd.DataFrame, row_of: RowOf, ctx: ReadContext, source: str) -> TensorData:
    """A policy's log: every column but ``action_columns`` is an observation; the logged actions are
    the labels (one class-index column for a discrete policy, one float column per action dimension
    for a continuous one)."""
    actions = list(ctx.spec.action_columns or [])
    missing = [c for c in actions if c not in df.columns]
    if missing:
        raise DatasetError(f"{source} has no action column {', '.join(repr(c) for c in missing)}; "
                           f"columns: {', '.join(list(df.columns)[:50])}")
    discrete = ctx.spec.action_space == "discrete"
    if discrete and len(actions) != 1:
        raise DatasetError("a discrete policy logs one action column (the action's index)")
    spec = ctx.spec.model_copy(update={"label_column": None, "task": None, "action_columns": None,
                                       "action_space": None, "env": None, "episodes": 10})
    observations = _load_table(df.drop(columns=actions), row_of, replace(ctx, spec=spec), source)
    if discrete:
        y, classes = parse_labels(df[actions[0]].to_numpy(), "classification", row_of, f"column {actions[0]!r}",
                                  ctx.limits, ctx.spec.classes)
    else:
        values = df[actions].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64, na_value=np.nan)
        if not np.isfinite(values).all():
            r, c = (int(v) for v in np.argwhere(~np.isfinite(values))[0])
            raise DatasetError(f"column {actions[c]!r}: a continuous action must be a finite number", row=row_of(r))
        y, classes = torch.from_numpy(values.astype(np.float32)), None
    observations.meta["action_columns"] = ",".join(actions)
    return TensorData(observations.inputs, y, observations.input_kind, classes, meta=observations.meta)


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

def load_jsonl(path: Path, ctx: ReadContext) -> TensorData:
    records, lines = [], []
    keys: dict[str, None] = {}  # (ordered, as first seen)
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
        keys.update(dict.fromkeys(record))
        if len(keys) > ctx.limits.max_columns:
            raise DatasetError(f"the records hold more than {ctx.limits.max_columns:,} distinct keys; each key "
                               f"becomes a column (a text, an optional pair and a label are read)", row=number)
    names = list(keys)
    if is_token_file(names, ctx.spec.text_column):  # {"tokens": [...], "tags": [...]}: token classification
        return load_token_records(records, lines.__getitem__, ctx, path.name)
    columns = {k: pd.Series([r.get(k) for r in records], dtype=object).to_numpy() for k in names}
    return _load_text(columns, names, len(records), lines.__getitem__, ctx, path.name)


def _load_text(columns: dict[str, np.ndarray], names: list[str], n: int, row_of: RowOf, ctx: ReadContext,
               source: str) -> TensorData:
    spec = ctx.spec
    if ctx.tokenizer is None and not ctx.structure_only:
        raise DatasetError("text data needs a teacher with a tokenizer")
    if ctx.task == "token_classification":
        raise DatasetError(f"{source} holds texts, but a token classifier (NER) learns from tagged words: JSON Lines "
                           '{"tokens": [words], "tags": [one tag per word]}')
    if n == 0:
        raise DatasetError(f"{source} holds no rows")
    if spec.text_column not in names:
        raise DatasetError(f"{source} has no text column {spec.text_column!r}; columns: {', '.join(names)}")
    texts = _texts(columns[spec.text_column], spec.text_column, row_of)
    pairs = None
    if spec.text_pair_column in names:
        pairs = _texts(columns[spec.text_pair_column], spec.text_pair_column, row_of)
    label = label_column(names, spec, TEXT_LABELS, source)
    y, classes = (None, None)
    if label:
        y, classes = parse_labels(columns[label], ctx.task, row_of, f"column {label!r}", ctx.limits,
                                    ctx.spec.classes)
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


def _tokenize(texts: list[str], pairs: list[str] | None, ctx: ReadContext) -> dict[str, torch.Tensor]:
    if ctx.structure_only:
        empty = torch.zeros((len(texts), 0), dtype=torch.long)
        return {"input_ids": empty, "attention_mask": empty.clone()}
    max_length = ctx.spec.max_length
    if ctx.input_shape and ctx.input_shape[0] > 0:
        max_length = min(max_length, ctx.input_shape[0])
    return tokenize(ctx.tokenizer, texts, pairs, max_length=max_length)
