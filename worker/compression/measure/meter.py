"""Measuring ONNX graphs, the one way every result is measured: the task metric on the eval split
(against the labels, and the teacher's outputs as the reference), and onnxruntime latency on CPU.

`Meter.latencies` times in one of two ways. A single run times each graph once at the spec's
``repeats``. The search times in ``rounds`` interleaved rounds: latency of sub-millisecond models is
mostly onnxruntime's per-call overhead and moves with the machine's load, so every model of a group
is timed once per round before the next round starts (twins compared under the same conditions),
with enough repeats to run at least ``min_timed_s`` per batch size; a batch size's p50 / p95 is the
median over the rounds.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..fields import extra_metrics
from ..spec import EvaluationSpec
from ..types import TensorData
from .evaluate import measure_onnx_latency, onnx_outputs
from .metrics import evaluate_outputs

MAX_REPEATS = 5000


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
    """The ``stat`` (p50 / p95) latency in ms at ``batch``, if it was measured."""
    for b in latency.get("batches", []):
        if int(b["batch"]) == batch:
            return float(b[f"{stat}_ms"])
    return None


class Meter:
    """Runs ONNX graphs over the eval split and times them (onnxruntime, CPU, fixed threads).

    ``extra_batches`` are timed besides ``evaluation.latency_batch_sizes`` (the search's goal batch).
    The teacher's outputs (`use_teacher`) are every metric's reference.
    """

    def __init__(self, task: str, evald: TensorData, evaluation: EvaluationSpec, *,
                 extra_batches: Sequence[int] = ()) -> None:
        self.task, self.evald, self.espec = task, evald, evaluation
        self.threads = evaluation.threads
        self.inputs = {k: v.numpy() for k, v in evald.inputs.items()}
        self.batches = sorted({*evaluation.latency_batch_sizes, *extra_batches})
        self.sample = {k: v[: max(self.batches)] for k, v in self.inputs.items()}
        self.teacher_out: torch.Tensor | None = None

    def outputs(self, path: Path) -> torch.Tensor:
        out = onnx_outputs(path, self.inputs, threads=self.threads)
        return torch.from_numpy(np.asarray(out, dtype=np.float32))

    def use_teacher(self, teacher_onnx: Path) -> torch.Tensor:
        """Run the teacher's graph once; its outputs are the reference from then on."""
        self.teacher_out = self.outputs(teacher_onnx)
        return self.teacher_out

    def score(self, outputs: torch.Tensor) -> dict[str, Any]:
        """The task metrics of ``outputs`` against the labels (none for embeddings) and the teacher."""
        y = self.evald.y if self.task != "embedding" else None
        scores = evaluate_outputs(self.task, outputs, y, self.teacher_out, self.evald.classes)
        scores.update(extra_metrics(self.evald.meta, outputs, y, self.teacher_out))
        return scores

    def metrics(self, path: Path) -> dict[str, Any]:
        return self.score(self.outputs(path))

    def latencies(self, paths: Sequence[Path], batches: Sequence[int] | None = None, *, rounds: int | None = None,
                  min_timed_s: float = 0.0) -> list[dict[str, Any]]:
        """Latency per graph at ``batches`` (default: all): one pass at the spec's repeats, or with
        ``rounds`` interleaved rounds (round r times every graph before round r + 1 starts)."""
        batches = list(batches or self.batches)
        if rounds is None:
            return [measure_onnx_latency(p, self.sample, batch_sizes=batches, threads=self.threads,
                                         warmup=self.espec.warmup, repeats=self.espec.repeats) for p in paths]
        n_rounds = max(1, rounds)
        repeats = {(i, b): self._repeats(p, b, n_rounds, min_timed_s) for i, p in enumerate(paths) for b in batches}
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

    def _repeats(self, path: Path, batch: int, rounds: int, min_timed_s: float) -> int:
        probe = measure_onnx_latency(path, self.sample, batch_sizes=[batch], threads=self.threads, warmup=1,
                                     repeats=3)
        per_run = max(probe["batches"][0]["p50_ms"] / 1000.0, 1e-6)
        wanted = math.ceil(min_timed_s / rounds / per_run)
        return int(min(MAX_REPEATS, max(math.ceil(self.espec.repeats / rounds), wanted)))
