"""Time series for forecasting (``DataSpec.task == "forecasting"``): a table of rows in time order cut
into windows.

Sample ``i`` holds steps ``[s, s + window)`` of every input column (``target_columns`` then
``feature_columns``) as a signal ``(channels, window)``, ``s = i × stride``; its target is steps
``[s + window, s + window + horizon)`` of ``target_columns``, flattened step-major
(``y[h × n_targets + t]`` is target ``t`` at step ``h``). A teacher that takes ``(window, channels)``
(time-major) gets the transpose; one that takes a flat vector gets the channel-major flattening.

Order: rows sorted by ``time_column`` when given (stable: a file already in order is untouched);
a repeated time stamp is refused, since two values for one step have no order. The split is
chronological (`chronological_split`): evaluation windows are the last ones, and no training target
reaches past where the evaluation targets begin.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ..errors import DatasetError
from ..types import TensorData
from .data_common import ReadContext, RowOf, too_large

FIELD = "forecasting"


def load_series(df: pd.DataFrame, row_of: RowOf, ctx: ReadContext, source: str) -> TensorData:
    spec = ctx.spec
    assert spec.target_columns is not None and spec.window is not None and spec.horizon is not None
    df.columns = [str(c) for c in df.columns]
    targets, covariates = list(spec.target_columns), list(spec.feature_columns or [])
    wanted = [*targets, *covariates, *([spec.time_column] if spec.time_column else [])]
    missing = [c for c in wanted if c not in df.columns]
    if missing:
        raise DatasetError(f"{source} has no column {', '.join(repr(c) for c in missing)}; "
                           f"columns: {', '.join(df.columns[:50])}")
    n_rows = len(df)
    order = np.arange(n_rows)
    sorted_note = False
    if spec.time_column:
        order, sorted_note = _time_order(df[spec.time_column], row_of, spec.time_column)
    window, horizon, stride = spec.window, spec.horizon, spec.stride
    span = window + horizon
    if n_rows < span:
        raise DatasetError(f"{source} has {n_rows} rows but window + horizon is {span}: the series is too short "
                           "for one sample")
    count = (n_rows - span) // stride + 1
    channels = targets + covariates
    need = count * (len(channels) * window + len(targets) * horizon) * 4 * 2
    if need > ctx.limits.array_bytes:
        raise too_large(f"{count:,} windows of {window} × {len(channels)} values", need, ctx.limits)
    values = _numeric(df, channels, row_of)[order]  # (rows, channels), time order
    series = torch.from_numpy(values.astype(np.float32))
    starts = torch.arange(count) * stride
    steps = starts[:, None] + torch.arange(window)[None, :]  # (count, window)
    x = series[steps].permute(0, 2, 1).contiguous()  # (count, channels, window)
    future = starts[:, None] + window + torch.arange(horizon)[None, :]
    y = series[future][:, :, : len(targets)].reshape(count, -1)
    x = _teacher_layout(x, ctx)
    meta = {"field": FIELD, "window": window, "horizon": horizon, "stride": stride, "channels": len(channels),
            "target_columns": ",".join(targets), "feature_columns": ",".join(covariates),
            "time_column": spec.time_column or "", "series_rows": n_rows, "sorted_by_time": sorted_note,
            "columns": channels}
    kind = {2: "vector", 3: "signal"}[x.ndim]
    return TensorData({"x": x}, y, kind, None, meta=meta)  # type: ignore[arg-type]


def _time_order(column: pd.Series, row_of: RowOf, name: str) -> tuple[np.ndarray, bool]:
    """The rows' time order, and whether the file was out of order."""
    raw = column
    if raw.isna().any():
        raise DatasetError(f"column {name!r}: missing time stamp", row=row_of(int(np.argmax(raw.isna().to_numpy()))))
    if pd.api.types.is_numeric_dtype(raw):
        keys = pd.to_numeric(raw).to_numpy(np.float64)
    else:
        try:
            stamps = pd.to_datetime(raw, utc=True, format="mixed").dt.tz_localize(None)
            keys = stamps.to_numpy().astype("datetime64[ns]").astype(np.int64)
        except (ValueError, TypeError) as exc:
            raise DatasetError(f"column {name!r} holds neither numbers nor dates ({exc})") from exc
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    repeated = np.nonzero(ordered[1:] == ordered[:-1])[0]
    if len(repeated):
        first = int(order[repeated[0] + 1])
        raise DatasetError(f"column {name!r}: time stamp {column.iloc[first]!r} appears more than once "
                           "(one value per step: aggregate the rows first)", row=row_of(first))
    return order, bool((order != np.arange(len(order))).any())


def _numeric(df: pd.DataFrame, columns: list[str], row_of: RowOf) -> np.ndarray:
    part = df[columns]
    values = part.apply(pd.to_numeric, errors="coerce").to_numpy(np.float64, na_value=np.nan)
    bad = ~np.isfinite(values)
    if bad.any():
        r, c = (int(v) for v in np.argwhere(bad)[0])
        raw = part.iat[r, c]
        reason = "missing value" if pd.isna(raw) else f"{raw!r} is not a finite number"
        raise DatasetError(f"column {columns[c]!r}: {reason} (series must be numeric)", row=row_of(r))
    return values


def _teacher_layout(x: torch.Tensor, ctx: ReadContext) -> torch.Tensor:
    """Windows as the teacher takes them: ``(channels, window)``, its transpose, or flat."""
    want = ctx.input_shape
    if want is None or tuple(want) == tuple(x.shape[1:]):
        return x
    channels, window = x.shape[1:]
    if tuple(want) == (window, channels):
        return x.transpose(1, 2).contiguous()
    if len(want) == 1 and want[0] in (channels * window, -1, 0):
        return x.reshape(len(x), -1)
    raise DatasetError(f"windows of {window} steps × {channels} columns do not fit the teacher's input "
                       f"{tuple(want)}: it takes ({channels}, {window}), ({window}, {channels}) or "
                       f"({channels * window},)")


def chronological_split(data: TensorData, eval_fraction: float) -> tuple[TensorData, TensorData]:
    """(train, eval) in time order: the last ``eval_fraction`` of the windows are evaluated, and
    training windows end before the first evaluation target (no target is seen in training)."""
    n = len(data)
    window, horizon, stride = (int(data.meta[k]) for k in ("window", "horizon", "stride"))
    n_eval = max(1, round(n * eval_fraction))
    first_eval = n - n_eval
    boundary = first_eval * stride + window  # the first step any evaluation window forecasts
    n_train = sum(1 for i in range(first_eval) if i * stride + window + horizon <= boundary)
    if n_train < 2 or n_eval < 1:
        raise DatasetError(f"{n} windows are too few to hold out {eval_fraction:.0%} in time order; use a longer "
                           "series, a shorter window or horizon, or upload a separate evaluation series")
    train, evald = data.subset(list(range(n_train))), data.subset(list(range(first_eval, n)))
    train.meta["split"] = evald.meta["split"] = "chronological"
    evald.meta["gap_windows"] = first_eval - n_train
    return train, evald
