"""``quantization: auto`` in a single run: the int8 formats this graph can take, each measured, the
fastest that keeps the metric delivered (issue 18: choices by measurement, per model, not fixed).

Which formats pays depends on the model: on this CPU (onnxruntime 1 thread) static int8 with
per-tensor scales ran a 512-512 MLP at 0.52× fp32 at batch 1 against 0.71× per channel, while a
16-32 CNN ran 1.32× per channel and 2.34× per tensor at batch 64; dynamic int8 sat between for
MLPs. So, for graphs without attention or token inputs, every recipe `search.recipes.recipes_for`
names for ``auto`` (vectors: static and dynamic, each per channel and per tensor; images and
signals: static per channel and per tensor) is made, scored on the eval split and timed at the
evaluation batch in interleaved rounds; among those within the metric's tolerance of the best, the
fastest wins (within 5 %, the smaller file). Token and attention graphs take dynamic int8 (static
calibration handles attention badly), measured with and without onnxruntime's transformer fusion
(``quantize.fusion``: slower on this CPU, but that is the CPU's answer, not the engine's). The
labels-only baseline is quantized in the chosen format, so both compete on equal terms.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import onnx

from .fields import tolerance as field_tolerance
from .measure.metrics import higher_is_better
from .measure.verdict import RELATIVE, SAME_SPEED, drop, tolerance_for
from .pipeline import CandidatePipeline, evaluation_batch
from .quantize.handlers import has_attention
from .quantize.registry import QuantizationResult
from .search.recipes import recipes_for
from .spec import (
    AutoQuantizationConfig,
    DynamicInt8Config,
    QuantizationMethod,
    StaticInt8Config,
)

ROUNDS = 3
TIMING_S = 0.1


def formats_for(config: QuantizationMethod, fp32: Path, input_kind: str) -> dict[str, QuantizationMethod]:
    """The formats to measure, by name, for ``auto`` (none for other methods): on token or attention
    graphs dynamic int8 unfused and fused (``quantize.fusion``), on the rest the recipes below."""
    if not isinstance(config, AutoQuantizationConfig):
        return {}
    if input_kind == "tokens" or has_attention(onnx.load(str(fp32), load_external_data=False).graph):
        return recipes_for(config, "tokens")  # a ViT's too: dynamic int8, unfused and fused
    return {name: c for name, c in recipes_for(config, input_kind).items()
            if isinstance(c, (StaticInt8Config, DynamicInt8Config))}


def quantize_measured(pipe: CandidatePipeline, config: QuantizationMethod, fp32: Path, out: Path,
                      work: Path) -> QuantizationResult | None:
    """Each format of ``formats_for`` made into ``work``, measured, the chosen copied to ``out``; its
    result (``path`` = ``out``) carries every format's numbers in ``tried``. None when there is
    nothing to choose between (then the caller quantizes as the config says)."""
    formats = formats_for(config, fp32, pipe.train.input_kind)
    if len(formats) < 2:
        return None
    given = getattr(config, "max_metric_drop", None)
    tol = tolerance_for(pipe.metric, given if given is not None else field_tolerance(pipe.evald.meta, pipe.metric, {}))
    formats = {name: guarded(c, pipe.metric, tol) for name, c in formats.items()}
    work.mkdir(parents=True, exist_ok=True)
    made = {name: pipe.quantize(fp32, work / f"{name}.onnx", c, score=False) for name, c in formats.items()}
    paths = [Path(r.path) for r in made.values()]
    batch = evaluation_batch(pipe.spec)
    timed = pipe.meter.latencies(paths, [batch], rounds=ROUNDS, min_timed_s=TIMING_S)
    rows = []
    for (name, result), path, lat in zip(made.items(), paths, timed, strict=True):
        rows.append({"format": name, "method": result.method, "per_channel": formats[name].per_channel,
                     "metric": float(pipe.meter.metrics(path)[pipe.metric]), "size_bytes": path.stat().st_size,
                     "p50_ms": float(lat["batches"][0]["p50_ms"]), "batch": batch,
                     "float_layers": len(result.fp32_nodes), "fused_ops": result.options.get("fused_ops")})
    name = choose_format(rows, pipe.metric, tol)
    for row in rows:
        row["chosen"] = row["format"] == name
    chosen = made[name]
    shutil.copyfile(chosen.path, out)
    chosen.path = out
    chosen.tried = rows
    chosen.message = (f"{name}: the fastest at batch {batch} of {len(rows)} int8 formats measured within the "
                      f"{pipe.metric} tolerance of the best; {chosen.message}".rstrip("; "))
    pipe.quantized_as = formats[name]
    return chosen


def guarded(config: QuantizationMethod, metric: str, tolerance: float) -> QuantizationMethod:
    """``config`` with the verdict's tolerance as its ``max_metric_drop`` when it has none: a layer that
    int8 breaks stays in float (the accuracy-aware fallback) instead of the whole format scoring at
    chance. A breast-cancer student on raw features (0.001 to 4,000) folds 1/std into its first
    layer; its per-channel int8 weights rounded to 0 and it answered 'benign' for every row (0.62)."""
    if getattr(config, "max_metric_drop", 1.0) is not None:
        return config
    return config.model_copy(update={"max_metric_drop": tolerance,
                                     "drop_mode": "relative" if metric in RELATIVE else "absolute"})


def choose_format(rows: list[dict[str, Any]], metric: str, tolerance: float) -> str:
    """The fastest format whose metric is within ``tolerance`` of the best; latencies within the
    delivery's ``SAME_SPEED`` of it are a tie the smaller file wins."""
    sign = 1 if higher_is_better(metric) else -1
    best = max(rows, key=lambda r: sign * r["metric"])
    good = [r for r in rows if drop(metric, best["metric"], r["metric"]) <= tolerance]
    fastest = min(r["p50_ms"] for r in good)
    tied = [r for r in good if r["p50_ms"] <= fastest * (1 + SAME_SPEED)]
    return min(tied, key=lambda r: (r["size_bytes"], r["p50_ms"]))["format"]
