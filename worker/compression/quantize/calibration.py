"""Calibration data for static quantization: a seeded sample of the training inputs, fed to
onnxruntime's calibrators in equal batches."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from ..errors import Cancelled, InputError
from ..types import CancelFn

CALIBRATION_BATCH = 32


def calibration_sample(
    inputs: Mapping[str, torch.Tensor | np.ndarray], n: int, seed: int
) -> tuple[dict[str, np.ndarray], list[int]]:
    """A seeded random subset of ``n`` rows (all rows when there are fewer), with their indices."""
    if not inputs:
        raise InputError("calibration needs at least one input array")
    arrays = {k: v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
              for k, v in inputs.items()}
    sizes = {k: a.shape[0] for k, a in arrays.items()}
    if len(set(sizes.values())) != 1:
        raise InputError(f"calibration inputs have different row counts: {sizes}")
    total = next(iter(sizes.values()))
    if total == 0:
        raise InputError("calibration inputs are empty")
    ids = sorted(np.random.default_rng(seed).permutation(total)[: min(n, total)].tolist())
    return {k: a[ids] for k, a in arrays.items()}, ids


class CalibrationReader:
    """onnxruntime CalibrationDataReader over in-memory arrays, in equal batches (the histogram
    calibrators stack batch outputs and fail on a short last batch): the largest size ≤ 32 that
    divides the sample count."""

    def __init__(self, feeds: dict[str, np.ndarray], cancel: CancelFn, fixed_batch: int | None = None) -> None:
        n = next(iter(feeds.values())).shape[0]
        if fixed_batch:  # a graph exported with a fixed batch axis takes only that many rows at a time
            if n < fixed_batch:
                feeds = {k: np.concatenate([v] * -(-fixed_batch // n))[:fixed_batch] for k, v in feeds.items()}
            n = max(fixed_batch, n - n % fixed_batch)
            feeds = {k: v[:n] for k, v in feeds.items()}
        size = fixed_batch or max(b for b in range(1, min(CALIBRATION_BATCH, n) + 1) if n % b == 0)
        self._batches = iter([{k: v[i : i + size] for k, v in feeds.items()} for i in range(0, n, size)])
        self._cancel = cancel

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._cancel():
            raise Cancelled("quantization cancelled during calibration")
        return next(self._batches, None)
