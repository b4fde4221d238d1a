"""The report's plots (matplotlib, rendered to base64 PNG): training curves, metric against size and
latency, and a search's Pareto front. matplotlib is imported inside each plot: it is heavy and only
the plots need it."""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from typing import Any

from .pareto import pareto_front

X_KEYS = {"step", "epoch"}
NOT_PLOTTED = {"lr", "learning_rate", "time", "elapsed_s", "samples"}


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _records(history: Any) -> list[dict[str, Any]]:
    """A run history as records, from records or from columns of equal length."""
    if isinstance(history, Mapping):
        n = max((len(v) for v in history.values() if isinstance(v, list)), default=0)
        return [{k: v[i] for k, v in history.items() if isinstance(v, list) and i < len(v)} for i in range(n)]
    return [r for r in history or [] if isinstance(r, Mapping)]


def curves_plot(curves: Mapping[str, Any], metric: str | None) -> str | None:
    from matplotlib.figure import Figure  # heavy: only plots need it

    fig = Figure(figsize=(10, 3.6), dpi=100)
    ax_loss, ax_metric = fig.subplots(1, 2)
    drawn = False
    for run, history in curves.items():
        records = _records(history)
        keys = {
            k
            for r in records
            for k, v in r.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        for key in sorted(keys - X_KEYS - NOT_PLOTTED):
            pts = [
                (r.get("step", i), r[key])
                for i, r in enumerate(records)
                if isinstance(r.get(key), (int, float))
            ]
            ax = ax_loss if "loss" in key else ax_metric
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                marker="." if len(pts) < 50 else None,
                label=f"{run}: {key}",
            )
            drawn = True
    if not drawn:
        return None
    for ax, title in ((ax_loss, "training loss"), (ax_metric, f"eval {metric or 'metric'}")):
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=8)
    return _png(fig)


def _smallest_batch_p50(row: Mapping[str, Any]) -> tuple[int, float] | None:
    batches = (row.get("latency") or {}).get("batches") or []
    if not batches:
        return None
    b = min(batches, key=lambda x: x["batch"])
    return int(b["batch"]), float(b["p50_ms"])


def scatter_plot(models: Sequence[Mapping[str, Any]], metric: str) -> str | None:
    from matplotlib.figure import Figure  # heavy: only plots need it
    from matplotlib.ticker import LogFormatter  # heavy: only plots need it

    fig = Figure(figsize=(10, 3.6), dpi=100)
    ax_size, ax_lat = fig.subplots(1, 2)
    batch_seen: set[int] = set()
    drawn = False
    for row in models:
        y = (row.get("metric") or {}).get(metric)
        if not isinstance(y, (int, float)):
            continue
        points = []
        if row.get("size_bytes"):
            points.append((ax_size, row["size_bytes"] / 2**20))
        lat = _smallest_batch_p50(row)
        if lat is not None:
            batch_seen.add(lat[0])
            points.append((ax_lat, lat[1]))
        for ax, x in points:
            ax.scatter([x], [y], s=40)
            ax.annotate(str(row.get("name")), (x, y), textcoords="offset points", xytext=(5, 5), fontsize=9)
            drawn = True
    if not drawn:
        return None
    ax_size.set_title(f"{metric} vs size")
    ax_size.set_xlabel("size on disk (MiB, log)")
    batch = ", ".join(str(b) for b in sorted(batch_seen))
    ax_lat.set_title(f"{metric} vs latency")
    ax_lat.set_xlabel(f"p50 latency at batch {batch} (ms, log)")
    for ax in (ax_size, ax_lat):
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
        ax.xaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
        ax.set_ylabel(metric)
        ax.margins(x=0.15, y=0.1)
        ax.grid(alpha=0.3)
    return _png(fig)


def _front_2d(points: Sequence[tuple[float, float]], higher: bool) -> list[tuple[float, float]]:
    """The (x, metric) points no other point beats on both (lower x, better metric), sorted by x."""
    rows = [{"x": x, "y": y} for x, y in points]
    idx = pareto_front(rows, [("x", False), ("y", higher)])
    return sorted((points[i] for i in idx), key=lambda p: p[0])


def search_plot(search: Mapping[str, Any]) -> str | None:
    from matplotlib.figure import Figure  # heavy: only plots need it
    from matplotlib.ticker import LogFormatter  # heavy: only plots need it

    goal = search.get("goal") or {}
    measured = [m for m in search.get("measured") or [] if isinstance(m.get("value"), (int, float))]
    if not measured:
        return None
    higher = bool(goal.get("higher_is_better", True))
    chosen = (search.get("chosen") or {}).get("name")
    on_front = set(search.get("front") or [])
    fig = Figure(figsize=(11, 4.2), dpi=100)
    axes = fig.subplots(1, 2)
    specs = [("latency_ms", f"{goal.get('latency_stat', 'p50')} latency at batch {goal.get('latency_batch')} "
                            "(ms, log)", goal.get("max_latency_ms"), 1.0),
             ("size_bytes", "ONNX size (KiB, log)", goal.get("max_size_bytes"), 1 / 1024)]
    for ax, (key, label, cap, scale) in zip(axes, specs, strict=True):
        pts = [(m[key] * scale, m["value"], m) for m in measured if isinstance(m.get(key), (int, float))]
        if not pts:
            continue
        labelled: set[str] = set()

        def legend(text: str) -> str | None:
            if text in labelled:
                return None
            labelled.add(text)
            return text

        for x, y, m in pts:
            if not m.get("eligible", True):
                ax.scatter([x], [y], marker="x", color="#999", s=30, label=legend("slower than its fp32 twin"))
            else:
                fp32 = m["recipe"] == "fp32"
                ax.scatter([x], [y], s=36, color="#1f77b4" if fp32 else "#ff7f0e",
                           edgecolors="black" if m["name"] in on_front else "none",
                           label=legend("fp32" if fp32 else "quantized"))
        line = _front_2d([(x, y) for x, y, m in pts if m.get("eligible", True)], higher)
        if line:
            ax.step([p[0] for p in line], [p[1] for p in line], where="post", color="#2ca02c", alpha=0.7,
                    label="Pareto front (this plot)")
            for x, y, m in pts:
                if (x, y) in line:
                    ax.annotate(m["name"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        for x, y, m in pts:
            if m["name"] == chosen:
                ax.scatter([x], [y], marker="*", s=220, color="#d62728", zorder=5, label=f"chosen: {chosen}")
        if isinstance(goal.get("bound"), (int, float)):
            ax.axhline(goal["bound"], linestyle="--", color="#d62728", alpha=0.6, label="metric bound")
        if isinstance(cap, (int, float)):
            ax.axvline(cap * scale, linestyle=":", color="#9467bd", alpha=0.8, label="cap")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
        ax.xaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
        ax.set_xlabel(label)
        ax.set_ylabel(str(goal.get("metric")))
        ax.set_title(f"{goal.get('metric')} vs {'latency' if key == 'latency_ms' else 'size'}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right" if higher else "upper right")
    return _png(fig)
