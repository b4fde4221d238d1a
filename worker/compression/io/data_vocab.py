"""Categorical table columns as integer ids: one vocabulary per column, built once from the training
file and recorded (the teacher's zoo config, ``preprocessing.json``) so every later reader maps raw
strings the same way.

A column is categorical when ``DataSpec.categorical_columns`` names it, or (that option unset) when
fewer than half of its non-empty cells are numbers; a numeric column with a typo keeps its "not a
finite number" error. Cells are read as the text written (an empty cell is ``""``).

Two kinds of vocabulary (a JSON object each, with ``column`` and ``index``, its feature position):

* ``vocab``: the ``max_categories`` most frequent values (ties in string order); value ``tokens[i]`` is
  id ``i + 1`` and anything else — unseen, rare past the cap — is id 0, the out-of-vocabulary bucket.
* ``hash``: columns with more than ``hash_above`` distinct values: id ``crc32(utf-8 bytes) % buckets``
  (zlib's CRC-32, the same in any language), no token list to keep.

``size`` is the id count (``len(tokens) + 1``, or ``buckets``): the embedding table's rows. The ids
travel in the float feature matrix ``x`` at the column's position (exact below 2^24), so every graph
still takes one float input.
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from ..errors import DatasetError
from ..spec import DataSpec

OOV = 0
"""The id of a value outside a ``vocab`` vocabulary."""
MAX_ID = 1 << 24
"""Ids stay exact in float32 below this."""


def hash_id(value: str, buckets: int) -> int:
    return zlib.crc32(value.encode("utf-8")) % buckets


def cell_strings(series: pd.Series) -> list[str]:
    """A column's cells as text: missing cells are ``""``; other values as written (``str``)."""
    return ["" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v) for v in series.tolist()]


def build_vocab(column: str, index: int, values: Sequence[str], spec: DataSpec) -> dict[str, Any]:
    """The vocabulary of one column (module doc)."""
    counts = Counter(values)
    if len(counts) > spec.hash_above:
        return {"column": column, "index": index, "kind": "hash", "buckets": spec.hash_buckets,
                "size": spec.hash_buckets, "distinct": len(counts)}
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: spec.max_categories]
    tokens = [v for v, _ in ranked]
    return {"column": column, "index": index, "kind": "vocab", "tokens": tokens, "size": len(tokens) + 1,
            "distinct": len(counts)}


def check_vocab(vocab: Any) -> dict[str, Any]:
    """A recorded vocabulary, checked (a teacher's config is an upload): raise DatasetError naming the problem."""
    if not isinstance(vocab, dict) or not isinstance(vocab.get("column"), str) or \
            not isinstance(vocab.get("index"), int) or vocab.get("kind") not in ("vocab", "hash"):
        raise DatasetError("a categorical vocabulary needs 'column' (a name), 'index' (an integer) and 'kind' "
                           "('vocab' or 'hash')")
    if vocab["kind"] == "hash":
        buckets = vocab.get("buckets")
        if not isinstance(buckets, int) or not 1 <= buckets <= MAX_ID:
            raise DatasetError(f"column {vocab['column']!r}: hash buckets must be an integer in 1..{MAX_ID}")
    else:
        tokens = vocab.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens) or len(tokens) >= MAX_ID:
            raise DatasetError(f"column {vocab['column']!r}: tokens must be a list of strings")
    return vocab


def encode(values: Sequence[str], vocab: dict[str, Any]) -> np.ndarray:
    """Ids (int64) of ``values`` under ``vocab``."""
    if vocab["kind"] == "hash":
        buckets = int(vocab["buckets"])
        return np.fromiter((hash_id(v, buckets) for v in values), np.int64, len(values))
    index = {t: i + 1 for i, t in enumerate(vocab["tokens"])}
    return np.fromiter((index.get(v, OOV) for v in values), np.int64, len(values))


def mostly_text(series: pd.Series) -> bool:
    """Fewer than half of the non-empty cells are numbers (an object column with a typo is still numeric)."""
    if series.dtype.kind in "biufc":
        return False
    present = series.dropna()
    present = present[present.astype(str).str.strip() != ""]
    if present.empty:
        return False
    numbers = pd.to_numeric(present, errors="coerce").notna().sum()
    return numbers * 2 < len(present)


def categorical_names(features: pd.DataFrame, spec: DataSpec, recorded: list[dict[str, Any]] | None) -> list[str]:
    """Which feature columns are categorical: the recorded vocabularies' (the teacher's, or the training
    file's for an evaluation file), else those the spec names, else those that hold text."""
    if recorded:
        return [v["column"] for v in recorded]
    if spec.categorical_columns is not None:
        return list(spec.categorical_columns)
    return [c for c in features.columns if mostly_text(features[c])]


def encode_table(features: pd.DataFrame, spec: DataSpec, recorded: list[dict[str, Any]] | None,
                 source: str) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """``features`` with its categorical columns replaced by float ids, and their vocabularies (the
    recorded ones when given, checked against the columns; else built from these rows)."""
    names = categorical_names(features, spec, recorded)
    columns = list(features.columns)
    missing = [c for c in names if c not in columns]
    if missing:
        raise DatasetError(f"{source} has no categorical column {', '.join(repr(c) for c in missing)}; "
                           f"columns: {', '.join(columns[:50])}")
    if not names:
        return features, []
    out = features.copy()
    vocabs: list[dict[str, Any]] = []
    for name in names:
        index = columns.index(name)
        values = cell_strings(features[name])
        if recorded:
            vocab = check_vocab(next(v for v in recorded if v["column"] == name))
            if vocab["index"] != index:
                raise DatasetError(f"column {name!r} is feature {index} of {source} but the recorded vocabulary "
                                   f"(the teacher's, or the training file's) has it at feature {vocab['index']}; "
                                   f"give the columns in the order the teacher was trained on")
        else:
            vocab = build_vocab(name, index, values, spec)
        out[name] = encode(values, vocab).astype(np.float64)
        vocabs.append(vocab)
    return out, vocabs


def recorded_vocabularies(teacher: Any) -> list[dict[str, Any]] | None:
    """The vocabularies a teacher was trained with (a zoo ``ctr`` config's ``categorical``), or None."""
    config = getattr(teacher, "config", None) or {}
    vocabs = config.get("categorical") if getattr(teacher, "kind", None) == "zoo" else None
    if not isinstance(vocabs, list):
        return None
    vocabs = [v for v in vocabs if not (isinstance(v, dict) and v.get("kind") == "ids")]  # ids: `onnx_inputs`
    return [check_vocab(v) for v in vocabs] or None
