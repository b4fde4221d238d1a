"""Measuring ONNX models for the search: metric on the eval split, size, latency in interleaved rounds.

Latency of sub-millisecond models is mostly onnxruntime's per-call overhead and moves with the
machine's load, so each model is timed in ``rounds`` rounds, every model of a group once per
round before the next round starts (twins compared under the same conditions), with enough
repeats to run at least ``min_timed_s`` per batch size; a batch size's p50 / p95 is the median
over the rounds.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..measure.evaluate import measure_onnx_latency, onnx_outputs
from ..measure.metrics import evaluate_outputs
from ..spec import CompressSpec
from ..types import TensorData

MAX_REPEATS = 5000


@dataclass
class Measured:
    """One measured ONNX model: a candidate in one recipe (fp32 or a quantized twin)."""

    name: str
    candidate: str
    recipe: str
    format: str
    path: Path
    metrics: dict[str, Any]
    value: float | None
    size_bytes: int
    parameters: int
    latency: dict[str, Any] = field(default_factory=dict)
    latency_ms: float | None = None
    train_s: float = 0.0
    epochs: float = 0.0
    twin: str | None = None
    eligible: bool = True
    checks: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def artifact_kind(self) -> str:
        return {"onnx fp32": "onnx_fp32", "onnx int4": "onnx_int4"}.get(self.format, "onnx_int8")

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "path"}
        out["file"] = self.path.name
        return out


def merge_rounds(rounds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One latency dict from interleaved rounds: per batch, the median of the rounds' p50 and p95."""
    first = dict(rounds[0])
    batches = []
    for b in sorted({int(x["batch"]) for r in rounds for x in r["batches"]}):
        rows = [x for r in rounds for x in r["batches"] if int(x["batch"]) == b]
        mean = statistics.fmean(x["mean_ms"] for x in rows)
        batches.append({"batch": b, "p50_ms": statistics.median(x["p50_ms"] for x in rows),
                        "p95_ms": statistics.median(x["p95_ms"] for x in rows), "mean_ms": mean,
                        "throughput_per_s": b * 1000.0 / mean if mean > 0 else None,
                        "repeats": sum(int(x.get("repeats", 0)) for x in rows)})
    first.update(batches=batches, rounds=len(rounds), repeats=sum(b["repeats"] for b in batches))
    return first


def latency_at(latency: dict[str, Any], batch: int, stat: str) -> float | None:
    for b in latency.get("batches", []):
        if int(b["batch"]) == batch:
            return float(b[f"{stat}_ms"])
    return None


# --- the search -----------------------------------------------------------------------------


class Meter:
    """Runs ONNX models over the eval split and times them (onnxruntime, CPU, fixed threads)."""

    def __init__(self, task: str, evald: TensorData, spec: CompressSpec, goal_batch: int, *, rounds: int,
                 min_timed_s: float) -> None:
        self.task, self.evald, self.espec = task, evald, spec.evaluation
        self.rounds, self.min_timed_s = rounds, min_timed_s
        self.threads = spec.evaluation.threads
        self.inputs = {k: v.numpy() for k, v in evald.inputs.items()}
        self.batches = sorted({*spec.evaluation.latency_batch_sizes, goal_batch})
        self.sample = {k: v[: max(self.batches)] for k, v in self.inputs.items()}
        self.teacher_out: torch.Tensor | None = None

    def outputs(self, path: Path) -> torch.Tensor:
        out = onnx_outputs(path, self.inputs, threads=self.threads)
        return torch.from_numpy(np.asarray(out, dtype=np.float32))

    def metrics(self, path: Path) -> dict[str, Any]:
        y = self.evald.y if self.task != "embedding" else None
        return evaluate_outputs(self.task, self.outputs(path), y, self.teacher_out)

    def _repeats(self, path: Path, batch: int, rounds: int) -> int:
        probe = measure_onnx_latency(path, self.sample, batch_sizes=[batch], threads=self.threads, warmup=1,
                                     repeats=3)
        per_run = max(probe["batches"][0]["p50_ms"] / 1000.0, 1e-6)
        wanted = math.ceil(self.min_timed_s / rounds / per_run)
        return int(min(MAX_REPEATS, max(math.ceil(self.espec.repeats / rounds), wanted)))

    def latencies(self, paths: Sequence[Path], batches: Sequence[int] | None = None,
                  rounds: int | None = None) -> list[dict[str, Any]]:
        """Interleaved rounds over ``paths``: round r times every model before round r + 1 starts."""
        batches = list(batches or self.batches)
        n_rounds = max(1, rounds or self.rounds)
        repeats = {(i, b): self._repeats(p, b, n_rounds) for i, p in enumerate(paths) for b in batches}
        per_model: list[list[dict[str, Any]]] = [[] for _ in paths]
        for _ in range(n_rounds):
            for i, p in enumerate(paths):
                parts = [measure_onnx_latency(p, self.sample, batch_sizes=[b], threads=self.threads,
                                              warmup=self.espec.warmup, repeats=repeats[(i, b)]) for b in batches]
                for part, b in zip(parts, batches, strict=True):
                    part["batches"][0]["repeats"] = repeats[(i, b)]
                merged = dict(parts[0])
                merged["batches"] = [x for part in parts for x in part["batches"]]
                per_model[i].append(merged)
        return [merge_rounds(r) for r in per_model]
