"""Measure artifacts in the runtime they are for, and put them side by side.

Latency is wall-clock time of one ``session.run`` / forward call measured with
``time.perf_counter`` after warm-up runs, on inputs tiled from a sample to each batch size.
ONNX models run in onnxruntime on CPU in ``export.session`` (intra-op ``threads``, inter-op 1,
onnxruntime's default sequential execution, all graph optimisations), so numbers from one job are
comparable; the dict records the thread settings read back from the session. It looks like::

    {"runtime": "onnxruntime", "provider": "CPUExecutionProvider", "ort_version": "1.x",
     "threads": 1, "inter_op_threads": 1, "sequential": true, "warmup": 5, "repeats": 30,
     "batches": [{"batch": 1, "p50_ms": .., "p95_ms": .., "mean_ms": .., "throughput_per_s": ..}, ...]}

(``"runtime": "pytorch"`` with ``torch_version`` and ``device`` for torch modules).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from ..errors import DatasetError, InputError, SpecError
from ..types import Task
from .entities import IGNORE, sentence_disagreement
from .export import feed_arrays, run_onnx_model, run_rows
from .export import session as ort_session
from .metrics import per_class

ArrayLike = np.ndarray | torch.Tensor


def _numpy(a: ArrayLike) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def _check_timing_args(batch_sizes: Sequence[int], threads: int, repeats: int) -> None:
    if not batch_sizes or any(int(b) < 1 for b in batch_sizes):
        raise SpecError(
            f"latency batch sizes must be positive integers (at least one), got {list(batch_sizes)}"
        )
    if threads < 1:
        raise SpecError(f"threads must be >= 1, got {threads}")
    if repeats < 1:
        raise SpecError(f"repeats must be >= 1, got {repeats}")


def _tile(a: Any, batch: int) -> Any:
    """``batch`` rows made by repeating the sample's rows (works for numpy and torch)."""
    n = a.shape[0]
    if n == 0:
        raise InputError("latency sample has no rows")
    idx = np.arange(batch) % n
    return a[torch.as_tensor(idx)] if isinstance(a, torch.Tensor) else a[idx]


def _summarise(times_s: list[float], batch: int) -> dict[str, float | int]:
    ms = np.asarray(times_s) * 1000.0
    mean = float(ms.mean())
    return {
        "batch": batch,
        "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)),
        "mean_ms": mean,
        "throughput_per_s": batch * 1000.0 / mean,
    }


def _time_runs(run: Callable[[], object], warmup: int, repeats: int, sync: Callable[[], None]) -> list[float]:
    for _ in range(warmup):
        run()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - start)
    return times


# --- onnxruntime -----------------------------------------------------------------------


def measure_onnx_latency(
    onnx_path: str | Path,
    sample_inputs: Mapping[str, ArrayLike],
    *,
    batch_sizes: Sequence[int],
    threads: int,
    warmup: int,
    repeats: int,
) -> dict[str, Any]:
    """Latency p50/p95 and throughput of an ONNX model in onnxruntime on CPU, per batch size."""
    _check_timing_args(batch_sizes, threads, repeats)
    session = ort_session(Path(onnx_path), threads)
    options = session.get_session_options()
    base = feed_arrays(session, sample_inputs)
    batches = []
    for b in batch_sizes:
        feed = {k: _tile(v, int(b)) for k, v in base.items()}
        times = _time_runs(partial(run_rows, session, feed), warmup, repeats, lambda: None)
        batches.append(_summarise(times, int(b)))
    return {
        "runtime": "onnxruntime",
        "provider": "CPUExecutionProvider",
        "ort_version": ort.__version__,
        "threads": options.intra_op_num_threads,
        "inter_op_threads": options.inter_op_num_threads,
        "sequential": options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL,
        "warmup": warmup,
        "repeats": repeats,
        "batches": batches,
    }


def onnx_outputs(
    onnx_path: str | Path, inputs: Mapping[str, ArrayLike], threads: int = 1, batch_size: int = 256
) -> np.ndarray:
    """The model's first output over a whole eval set, run in batches of ``batch_size``."""
    return run_onnx_model(Path(onnx_path), inputs, threads=threads, batch_size=batch_size)


# --- pytorch ---------------------------------------------------------------------------


def measure_torch_latency(
    module: nn.Module,
    sample_inputs: Mapping[str, torch.Tensor],
    *,
    batch_sizes: Sequence[int],
    threads: int,
    warmup: int,
    repeats: int,
) -> dict[str, Any]:
    """Latency p50/p95 and throughput of a torch module in eager PyTorch (inference mode), per batch size."""
    _check_timing_args(batch_sizes, threads, repeats)
    param = next(module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    was_training, old_threads = module.training, torch.get_num_threads()
    module.eval()
    torch.set_num_threads(threads)
    used_threads = torch.get_num_threads()
    try:
        batches = []
        with torch.inference_mode():
            for b in batch_sizes:
                feed = {k: _tile(v, int(b)).to(device) for k, v in sample_inputs.items()}
                times = _time_runs(partial(module, **feed), warmup, repeats, sync)
                batches.append(_summarise(times, int(b)))
    finally:
        torch.set_num_threads(old_threads)
        module.train(was_training)
    return {
        "runtime": "pytorch",
        "torch_version": torch.__version__,
        "device": str(device),
        "threads": used_threads,
        "warmup": warmup,
        "repeats": repeats,
        "batches": batches,
    }


# --- side-by-side table ----------------------------------------------------------------


@dataclass
class ModelRow:
    """One measured model. ``replaces`` names the row this one is meant to beat (int8 replaces student)."""

    name: str
    metric: dict[str, Any]
    """Task metrics (``metrics.evaluate_outputs``); non-numeric entries such as ``reference`` are kept."""
    size_bytes: int | None
    parameters: int | None
    latency: dict[str, Any]
    replaces: str | None = None
    format: str = ""
    """What was measured, e.g. ``onnx fp32``, ``onnx int8``, ``pytorch``."""


def _p50_by_batch(latency: Mapping[str, Any]) -> dict[int, float]:
    return {int(b["batch"]): float(b["p50_ms"]) for b in latency.get("batches", [])}


def _versus(row: ModelRow, ref: ModelRow) -> dict[str, Any]:
    """Ratios of ``row`` against ``ref``: size ratio (<1 is smaller), speed-up per batch (>1 is faster)."""
    mine, theirs = _p50_by_batch(row.latency), _p50_by_batch(ref.latency)
    deltas = {
        k: float(v) - float(ref.metric[k])
        for k, v in row.metric.items()
        if isinstance(ref.metric.get(k), (int, float)) and isinstance(v, (int, float))
    }
    return {
        "name": ref.name,
        "size_ratio": row.size_bytes / ref.size_bytes if row.size_bytes and ref.size_bytes else None,
        "parameter_ratio": row.parameters / ref.parameters if row.parameters and ref.parameters else None,
        "speedup": {str(b): theirs[b] / mine[b] for b in sorted(mine) if b in theirs and mine[b] > 0},
        "metric_delta": deltas,
    }


def _flags(row: ModelRow, ref: ModelRow, versus: dict[str, Any]) -> list[dict[str, Any]]:
    flags = []
    if versus["size_ratio"] is not None and versus["size_ratio"] >= 1.0:
        sizes = f"{row.size_bytes:,} B vs {ref.size_bytes:,} B"
        message = f"{row.name} is not smaller than {ref.name}: {sizes}"
        flags.append({"flag": "not_smaller", "batch": None, "message": message})
    mine, theirs = _p50_by_batch(row.latency), _p50_by_batch(ref.latency)
    for b, speedup in versus["speedup"].items():
        if speedup <= 1.0:
            p50 = f"p50 {mine[int(b)]:.3f} ms vs {theirs[int(b)]:.3f} ms"
            message = f"{row.name} is not faster than {ref.name} at batch {b}: {p50}"
            flags.append({"flag": "not_faster", "batch": int(b), "message": message})
    return flags


def compare_models(rows: Sequence[ModelRow]) -> list[dict[str, Any]]:
    """The side-by-side table: each row with ratios against the row it replaces and the teacher,
    and flags (``not_smaller``, ``not_faster`` per batch size) wherever it does not beat what it replaces."""
    by_name = {r.name: r for r in rows}
    if len(by_name) != len(rows):
        raise ValueError("model rows must have distinct names")
    teacher = by_name.get("teacher")
    table = []
    for row in rows:
        if row.replaces is not None and row.replaces not in by_name:
            raise ValueError(f"row {row.name!r} replaces unknown row {row.replaces!r}")
        ref = by_name[row.replaces] if row.replaces else None
        vs_ref = _versus(row, ref) if ref is not None else None
        table.append(
            {
                "name": row.name,
                "format": row.format,
                "runtime": row.latency.get("runtime"),
                "metric": dict(row.metric),
                "size_bytes": row.size_bytes,
                "parameters": row.parameters,
                "latency": row.latency,
                "replaces": row.replaces,
                "vs_replaced": vs_ref,
                "vs_teacher": _versus(row, teacher) if teacher is not None and row is not teacher else None,
                "flags": _flags(row, ref, vs_ref) if ref is not None and vs_ref is not None else [],
            }
        )
    return table


# --- disagreements and per-class metrics -------------------------------------------------


def disagreements(
    task: Task,
    student_out: ArrayLike,
    teacher_out: ArrayLike,
    k: int,
    texts: Sequence[str] | None = None,
    *,
    y: ArrayLike | None = None,
    classes: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """The ``k`` eval examples where student and teacher disagree most, most different first.

    classification: KL(teacher ‖ student) of the softmax outputs, with both predicted classes and
    confidences; embedding: lowest cosine similarity; regression: largest absolute difference.
    """
    s = _numpy(student_out).astype(np.float64)
    t = _numpy(teacher_out).astype(np.float64)
    if s.shape != t.shape:
        raise ValueError(f"student output shape {s.shape} differs from teacher output shape {t.shape}")
    s2, t2 = s.reshape(len(s), -1), t.reshape(len(t), -1)
    if task == "token_classification":  # sentences with the most words tagged differently
        return token_disagreements(s, t, k, texts, y=y, classes=classes)
    if task == "classification":
        log_ps = s2 - np.logaddexp.reduce(s2, axis=1, keepdims=True)
        log_pt = t2 - np.logaddexp.reduce(t2, axis=1, keepdims=True)
        score = (np.exp(log_pt) * (log_pt - log_ps)).sum(axis=1)
    elif task == "embedding":
        norms = np.linalg.norm(s2, axis=1) * np.linalg.norm(t2, axis=1)
        cosine = (s2 * t2).sum(axis=1) / np.maximum(norms, 1e-12)
        score = 1.0 - cosine
    elif task == "regression":
        score = np.abs(s2 - t2).max(axis=1)
    else:
        raise SpecError(f"unknown task {task!r}")
    order = np.argsort(-score, kind="stable")[: max(0, k)]
    labels = None if y is None else _numpy(y)

    def name(c: int) -> str | int:
        return classes[c] if classes is not None and 0 <= c < len(classes) else c

    rows = []
    for i in order.tolist():
        row: dict[str, Any] = {"index": i}
        if task == "classification":
            ps, pt = np.exp(log_ps[i]), np.exp(log_pt[i])
            cs, ct = int(ps.argmax()), int(pt.argmax())
            row.update(
                {
                    "kl": float(score[i]),
                    "student_pred": name(cs),
                    "student_conf": float(ps[cs]),
                    "teacher_pred": name(ct),
                    "teacher_conf": float(pt[ct]),
                }
            )
        elif task == "embedding":
            row["cosine"] = float(cosine[i])
        else:
            row.update({"abs_diff": float(score[i]), "student": s2[i].tolist(), "teacher": t2[i].tolist()})
        if labels is not None:
            row["label"] = name(int(labels[i])) if task == "classification" else labels[i].tolist()
        if texts is not None:
            row["text"] = texts[i]
        rows.append(row)
    return rows


def token_disagreements(s: np.ndarray, t: np.ndarray, k: int, texts: Sequence[str] | None, *,
                        y: ArrayLike | None, classes: Sequence[str] | None) -> list[dict[str, Any]]:
    """Token classification: the sentences whose words the student tags most differently from the teacher
    (counted on the labelled words), with both tag sequences."""
    labels = None if y is None else torch.as_tensor(_numpy(y)).long()
    differ = sentence_disagreement(torch.from_numpy(s), torch.from_numpy(t), labels).numpy()
    order = [int(i) for i in np.argsort(-differ, kind="stable")[: max(0, k)] if differ[i] > 0]
    names = list(classes) if classes is not None else [str(i) for i in range(s.shape[-1])]
    rows = []
    for i in order:
        keep = np.ones(s.shape[1], dtype=bool) if labels is None else (labels[i] != IGNORE).numpy()
        row: dict[str, Any] = {"index": i, "words_differing": int(differ[i]),
                               "student_tags": [names[c] for c in s[i].argmax(-1)[keep]],
                               "teacher_tags": [names[c] for c in t[i].argmax(-1)[keep]]}
        if labels is not None:
            row["tags"] = [names[c] for c in labels[i][labels[i] != IGNORE].tolist()]
        if texts is not None:
            row["text"] = texts[i]
        rows.append(row)
    return rows


def _class_indices(values: ArrayLike, what: str, n: int, count: int | None = None) -> torch.Tensor:
    t = torch.as_tensor(_numpy(values)).long().ravel()
    if count is not None and t.numel() != count:
        raise ValueError(f"{what} have {t.numel()} entries for {count} labels")
    if t.numel() and (t.min() < 0 or t.max() >= n):
        raise DatasetError(f"{what} must be class indices in [0, {n}); found {int(t.min())}..{int(t.max())}")
    return t


def per_class_table(
    y_true: ArrayLike, y_pred: ArrayLike | Mapping[str, ArrayLike], classes: Sequence[str]
) -> list[dict[str, Any]]:
    """Per-class support, precision, recall and F1 (``metrics.per_class``); ``y_pred`` may map model
    names to predictions, giving one row per class with ``<name>_precision`` / ``_recall`` / ``_f1``
    columns side by side."""
    n = len(classes)
    truth = _class_indices(y_true, "labels", n)
    preds = dict(y_pred) if isinstance(y_pred, Mapping) else {"": y_pred}
    rows: list[dict[str, Any]] = [{"class": str(c), "index": i} for i, c in enumerate(classes)]
    for name, values in preds.items():
        pred = _class_indices(values, f"predictions {name!r}", n, truth.numel())
        prefix = f"{name}_" if name else ""
        for row, entry in zip(rows, per_class(pred, truth, n, list(classes)), strict=True):
            row["support"] = entry["support"]
            row.update({f"{prefix}{k}": entry[k] for k in ("precision", "recall", "f1")})
    return rows
