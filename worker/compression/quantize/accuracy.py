"""Accuracy-aware quantization: when the fully quantized model loses more than the tolerance, every
weight-bearing node is scored by the metric of the model in which *only that node* is quantized
(``cost`` = metric lost against fp32); the table is written next to the output as
``<name>.sensitivity.csv``, and nodes are kept in float, costliest first, until the drop is within
the tolerance. Quantizing one node alone, rather than keeping one node alone in float, is what finds
a broken tensor shared by two nodes: a QDQ graph quantizes it on both sides (the producer's output and
the consumer's input), so keeping either one in float recovers nothing and both would score zero."""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..spec import QuantizationConfig
from ..types import Progress, ProgressFn
from .graph import copy_model
from .ort_methods import OrtMethod


@dataclass
class AccuracyAware:
    """Accuracy-aware quantization around an already written, fully quantized ``out``."""

    src: Path
    out: Path
    evaluate: Callable[[Path], float]
    higher_is_better: bool
    progress: ProgressFn
    check_cancel: Callable[[], None]

    def drop(self, metric_fp32: float, metric: float) -> float:
        """Metric lost against fp32, positive = worse, whichever way the metric points."""
        return (metric_fp32 - metric) if self.higher_is_better else (metric - metric_fp32)

    def run(self, spec: QuantizationConfig, method: OrtMethod, build: Callable[..., Path],
            work: Path) -> dict[str, Any]:
        """The result fields: metrics, drop, tolerance, met, sensitivity, fp32 nodes and a message."""
        metric_fp32 = float(self.evaluate(self.src))
        metric_quant = float(self.evaluate(self.out))
        drop = self.drop(metric_fp32, metric_quant)
        fields: dict[str, Any] = {"metric_fp32": metric_fp32, "metric_quant": metric_quant, "drop": drop}
        if spec.max_metric_drop is None:
            return {**fields, "message": (f"quantized with {spec.method}; metric {metric_fp32:.4g} -> "
                                          f"{metric_quant:.4g}")}
        tolerance = spec.max_metric_drop * (abs(metric_fp32) if spec.drop_mode == "relative" else 1.0)
        fields["tolerance"] = tolerance
        if drop <= tolerance:
            return {**fields, "met": True,
                    "message": f"drop {drop:.4g} is within the tolerance {tolerance:.4g}"}

        table = self.sensitivity(method, build, work, metric_fp32)
        fields["sensitivity"] = table
        fields["sensitivity_path"] = self.out.with_name(self.out.stem + ".sensitivity.csv")
        write_sensitivity_table(table, fields["sensitivity_path"])
        for k in range(1, len(table) + 1):  # keep the costliest nodes in float, one more each time
            self.check_cancel()
            kept = [r["node"] for r in table[:k]]
            metric = float(self.evaluate(build(work / "fallback.onnx", kept)))
            self.progress(Progress("fallback", k, len(table), metric=metric, message=f"{k} node(s) in float"))
            if self.drop(metric_fp32, metric) <= tolerance:
                copy_model(work / "fallback.onnx", self.out)
                return {**fields, "metric_quant": metric, "drop": self.drop(metric_fp32, metric), "met": True,
                        "fp32_nodes": kept,
                        "message": (f"drop {self.drop(metric_fp32, metric):.4g} within {tolerance:.4g} with "
                                    f"{k} node(s) kept in float: {', '.join(kept)} (fully quantized drop was "
                                    f"{drop:.4g})")}
        costs = ", ".join(f"{r['node']} ({r['op_type']}): {r['cost']:+.4g}" for r in table)
        return {**fields, "met": False,
                "message": (f"cannot meet max_metric_drop {spec.max_metric_drop} ({spec.drop_mode}; "
                            f"{tolerance:.4g} in metric units): keeping 1 to all {len(table)} quantizable "
                            f"nodes in float, costliest first, never brought the drop within it. "
                            f"{self.out.name} is the fully quantized model (drop {drop:.4g}). Metric lost by "
                            f"quantizing each node alone: {costs or 'no quantizable nodes'}")}

    def sensitivity(self, method: OrtMethod, build: Callable[..., Path], work: Path,
                    metric_fp32: float) -> list[dict[str, Any]]:
        """For each weight-bearing node: the metric with only that node quantized; costliest first."""
        nodes = method.candidates()
        rows = []
        for i, (name, op_type) in enumerate(nodes):
            self.check_cancel()
            metric = float(self.evaluate(build(work / "sensitivity.onnx", [], [name])))
            rows.append({"node": name, "op_type": op_type, "metric_when_quantized": metric,
                         "cost": self.drop(metric_fp32, metric)})
            self.progress(Progress("sensitivity", i + 1, len(nodes), metric=metric, message=name))
        return sorted(rows, key=lambda r: -r["cost"])


def write_sensitivity_table(rows: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["node", "op_type", "metric_when_quantized", "cost"])
        writer.writeheader()
        writer.writerows(rows)
