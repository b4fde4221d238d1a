"""The run's report (report.json + a self-contained report.html) and its manifest.

The report dict (every key optional, so partial runs such as quantize-only jobs render)::

    {
      "title": str,
      "task": "classification" | "regression" | "embedding",
      "method": str,                  # default: derived from spec (distillation + quantization method)
      "primary_metric": str,          # for the plots; default: the first metric of the first model
      "teacher": {...}, "student": {...},   # summaries (Teacher.summary(), student config / parameters)
      "spec": {...},                  # the full CompressSpec
      "models": [...],                # rows from evaluate.compare_models (name, format, runtime, metric,
                                      # size_bytes, parameters, latency, vs_replaced, vs_teacher, flags)
      "curves": {run: history},       # run = "student", "baseline", ...; history is a list of records
                                      # {"step": 10, "loss": 0.4, "accuracy": 0.9, ...} or columns
                                      # {"step": [...], "loss": [...]}; keys with "loss" plot as losses,
                                      # other numeric keys (not step/epoch/lr) as eval metrics
      "per_class": [{...}], "sensitivity": [{...}], "disagreements": [{...}],
      "quantization": {...}, "distillation": {...}, "teacher_cache": {...},
      "data": {...}, "export_check": {...},   # shown as key / value tables
      "warnings": [str], "timings": {stage: seconds},
      "search": {...}                 # a search job: goal, chosen (+ why, checks), front, measured models,
                                      # candidates (the ladder, with statuses), rungs, budget, files
    }

Other keys (e.g. ``summary``) are kept in report.json only. Flags of ``models`` rows are
highlighted in the table and listed under Warnings unless a warning already quotes them.

report.json holds the dict as given, made JSON-safe (numpy / torch scalars and arrays become
numbers and lists, non-finite floats become null). report.html shows numbers formatted as:
metrics and ratios ``0.1235`` (4 decimals; ``1.235e-04`` below 0.001; ``12,345.6`` from 1000),
integers ``12,345``, sizes ``1.18 MiB (1,234,567 B)``, latency ``1.234`` ms, speed-up ``×1.85``.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import html
import importlib.metadata
import io
import json
import math
import platform
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .pareto import pareto_front

VERSIONED_PACKAGES = ("torch", "onnx", "onnxruntime", "transformers", "numpy", "kdq")
_X_KEYS = {"step", "epoch"}
_NOT_PLOTTED = {"lr", "learning_rate", "time", "elapsed_s", "samples"}


# --- JSON ------------------------------------------------------------------------------


def to_jsonable(obj: Any, where: str = "report") -> Any:
    """``obj`` as plain JSON values; raises TypeError naming where an unstorable value sits."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if hasattr(obj, "model_dump"):  # pydantic specs
        return to_jsonable(obj.model_dump(mode="json"), where)
    if hasattr(obj, "to_dict"):
        return to_jsonable(obj.to_dict(), where)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj), where)
    if hasattr(obj, "tolist"):  # numpy / torch scalars and arrays
        return to_jsonable(obj.tolist(), where)
    raise TypeError(f"{where}: cannot store a {type(obj).__name__} in JSON")


# --- formatting ------------------------------------------------------------------------


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def fmt_number(v: Any) -> str:
    """A number as the report shows it (not escaped)."""
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if v != 0 and abs(v) < 1e-3:
            return f"{v:.3e}"
        return f"{v:,.1f}" if abs(v) >= 1000 else f"{v:.4f}"
    return str(v)


def fmt_size(n: int | None) -> str:
    if not n:
        return "–"
    size, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            break
        size /= 1024
    return f"{n:,} B" if unit == "B" else f"{size:.2f} {unit} ({n:,} B)"


def _cell(v: Any) -> str:
    """An escaped table cell for any JSON value."""
    if isinstance(v, (list, tuple)) and all(not isinstance(x, (dict, list)) for x in v):
        return _e(", ".join(fmt_number(x) for x in v))
    if isinstance(v, (dict, list)):
        return _e(json.dumps(v, ensure_ascii=False))
    return _e(fmt_number(v))


def _table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A table of records; columns are the union of keys in first-seen order."""
    rows = [r for r in rows if isinstance(r, Mapping)]
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{_cell(row.get(c))}</td>" for c in columns) + "</tr>" for row in rows
    )
    return f'<div class="scroll"><table><tr>{head}</tr>{body}</table></div>'


def _kv(d: Mapping[str, Any], skip: Sequence[str] = ()) -> str:
    """A two-column table of a dict; nested dicts flatten to dotted keys, long lists are summarised."""
    items: list[tuple[str, Any]] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, list) and (len(value) > 20 or any(isinstance(x, (dict, list)) for x in value)):
            items.append((prefix, f"({len(value)} entries, in report.json)"))
        else:
            items.append((prefix, value))

    walk("", {k: v for k, v in d.items() if k not in skip})
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_cell(v)}</td></tr>" for k, v in items)
    return f'<table class="kv">{rows}</table>'


# --- plots -----------------------------------------------------------------------------


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _img(b64: str, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{b64}">'


def _records(history: Any) -> list[dict[str, Any]]:
    """A run history as records, from records or from columns of equal length."""
    if isinstance(history, Mapping):
        n = max((len(v) for v in history.values() if isinstance(v, list)), default=0)
        return [{k: v[i] for k, v in history.items() if isinstance(v, list) and i < len(v)} for i in range(n)]
    return [r for r in history or [] if isinstance(r, Mapping)]


def _curves_plot(curves: Mapping[str, Any], metric: str | None) -> str | None:
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
        for key in sorted(keys - _X_KEYS - _NOT_PLOTTED):
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


def _primary_metric(report: Mapping[str, Any]) -> str | None:
    if report.get("primary_metric"):
        return str(report["primary_metric"])
    for row in report.get("models") or []:
        for k, v in (row.get("metric") or {}).items():
            if isinstance(v, (int, float)):
                return str(k)
    return None


def _smallest_batch_p50(row: Mapping[str, Any]) -> tuple[int, float] | None:
    batches = (row.get("latency") or {}).get("batches") or []
    if not batches:
        return None
    b = min(batches, key=lambda x: x["batch"])
    return int(b["batch"]), float(b["p50_ms"])


def _scatter_plot(models: Sequence[Mapping[str, Any]], metric: str) -> str | None:
    from matplotlib.figure import Figure  # heavy: only plots need it
    from matplotlib.ticker import LogFormatter

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


# --- search ----------------------------------------------------------------------------


def _front_2d(points: Sequence[tuple[float, float]], higher: bool) -> list[tuple[float, float]]:
    """The (x, metric) points no other point beats on both (lower x, better metric), sorted by x."""
    rows = [{"x": x, "y": y} for x, y in points]
    idx = pareto_front(rows, [("x", False), ("y", higher)])
    return sorted((points[i] for i in idx), key=lambda p: p[0])


def _search_plot(search: Mapping[str, Any]) -> str | None:
    from matplotlib.figure import Figure  # heavy: only plots need it
    from matplotlib.ticker import LogFormatter

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


def _search_rows(search: Mapping[str, Any], names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Measured models as table rows (all of them, or ``names`` in that order)."""
    goal = search.get("goal") or {}
    batch, stat = goal.get("latency_batch"), goal.get("latency_stat", "p50")
    by_name = {m["name"]: m for m in search.get("measured") or []}
    shares = {c["name"]: c.get("embedding_share") for c in search.get("candidates") or []}
    files = search.get("files") or {}
    front = set(search.get("front") or [])
    rows = []
    for name in names if names is not None else list(by_name):
        m = by_name.get(name)
        if m is None:
            continue
        checks = m.get("checks") or {}
        row: dict[str, Any] = {"model": name, "recipe": m.get("recipe"), str(goal.get("metric")): m.get("value"),
                               f"{stat} ms @{batch}": m.get("latency_ms"), "size": fmt_size(m.get("size_bytes")),
                               "parameters": m.get("parameters")}
        if shares.get(m.get("candidate")) is not None:
            row["embedding share"] = shares[m.get("candidate")]
        for b in (m.get("latency") or {}).get("batches") or []:
            if b["batch"] != batch:
                row[f"p50 ms @{b['batch']}"] = b["p50_ms"]
        row.update({"train s": m.get("train_s"), "epochs": m.get("epochs"),
                    "meets": ", ".join(k for k, c in checks.items() if c.get("met")) or "none",
                    "misses": ", ".join(k for k, c in checks.items() if not c.get("met")) or "–",
                    "front": name in front, "eligible": m.get("eligible", True),
                    "file": files.get(name, "–"), "notes": "; ".join(m.get("notes") or [])})
        rows.append(row)
    return rows


def _search_html(search: Mapping[str, Any]) -> str:
    chosen = search.get("chosen") or {}
    parts = ["<h2>Search: the chosen model</h2>"]
    verdict = "meets every target" if chosen.get("met_all") else f"misses: {', '.join(chosen.get('unmet') or [])}"
    parts.append(_kv({"chosen": chosen.get("name"), "candidate": chosen.get("candidate"),
                      "recipe": chosen.get("recipe"), "format": chosen.get("format"),
                      "file": (search.get("files") or {}).get(chosen.get("name")), "verdict": verdict,
                      "why": chosen.get("why")}))
    checks = search.get("chosen_checks") or []
    if checks:
        parts.append("<h3>Targets</h3><ul>" + "".join(f"<li>{_e(c)}</li>" for c in checks) + "</ul>")
    if search.get("budget"):
        parts.append("<h3>Time budget</h3>" + _kv(search["budget"]))
    plot = _search_plot(search)
    front = search.get("front") or []
    parts.append(f"<h2>Pareto front ({len(front)} models: metric, latency, size)</h2>")
    if plot:
        parts.append(_img(plot, "metric vs latency and metric vs size"))
    if front:
        parts.append(_table(_search_rows(search, front)))
    parts.append("<h2>Every measured model</h2>" + _table(_search_rows(search)))
    candidates = search.get("candidates") or []
    if candidates:
        keys = ("name", "description", "num_parameters", "embedding_share", "fp32_size_bytes", "fp32_latency_ms",
                "status", "rung", "epochs", "train_s", "metric", "predicted", "reason")
        parts.append("<h2>Candidates (the ladder)</h2>"
                     + _table([{k: c.get(k) for k in keys if k in c or k == "embedding_share"} for c in candidates]))
    rungs = search.get("rungs") or []
    if rungs:
        parts.append("<h2>Successive halving</h2>" + _table(
            [{"rung": r.get("rung"), "epochs (cumulative)": r.get("epochs"), "entered": len(r.get("entered") or []),
              "went on": ", ".join(r.get("kept") or []) or "–", "dropped": ", ".join(r.get("dropped") or []) or "–"}
             for r in rungs]))
    notes = search.get("notes") or []
    if notes:
        parts.append("<h3>Notes</h3><ul>" + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>")
    return "\n".join(parts)


# --- HTML ------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1400px}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .5em;text-align:right;vertical-align:top}
th{background:#f3f3f3}
table.kv th{text-align:left}
td:first-child{text-align:left}
.flag{background:#fdd;color:#900;font-weight:bold}
.warnings{background:#fff4e5;border:1px solid #f0b400;padding:.5em 1em}
.scroll{overflow-x:auto}
img{max-width:100%}
pre{background:#f7f7f7;padding:1em;overflow-x:auto}
"""


def _method(report: Mapping[str, Any]) -> str | None:
    if report.get("method"):
        return str(report["method"])
    spec = report.get("spec") or {}
    parts = []
    if spec.get("student"):
        parts.append(f"distillation ({spec['student'].get('kind', 'auto')} student)")
    q = (spec.get("quantization") or {}).get("method")
    if q and q != "none":
        parts.append(f"quantization ({q})")
    return " + ".join(parts) or None


def _td(text: str, flagged: bool = False) -> str:
    """A cell of already-escaped ``text``, highlighted when flagged."""
    return f'<td class="flag">{text}</td>' if flagged else f"<td>{text}</td>"


def _speedup(v: Any) -> str:
    return _e(f"×{v:.2f}") if isinstance(v, (int, float)) else "–"


def _models_table(models: Sequence[Mapping[str, Any]]) -> str:
    metric_keys: list[str] = []
    batch_sizes: set[int] = set()
    for row in models:
        metric_keys += [k for k in row.get("metric") or {} if k not in metric_keys]
        batch_sizes |= {int(b["batch"]) for b in (row.get("latency") or {}).get("batches") or []}
    batches = sorted(batch_sizes)
    head = ["model", "measured as", *metric_keys, "size", "parameters", "size vs replaced", "size vs teacher"]
    for b in batches:
        head += [
            f"p50 ms @{b}",
            f"p95 ms @{b}",
            f"items/s @{b}",
            f"speed-up vs replaced @{b}",
            f"speed-up vs teacher @{b}",
        ]
    head.append("flags")
    out = ["<tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"]
    for row in models:
        flags = row.get("flags") or []
        not_smaller = any(f.get("flag") == "not_smaller" for f in flags)
        slow = {f.get("batch") for f in flags if f.get("flag") == "not_faster"}
        vs_r, vs_t = row.get("vs_replaced") or {}, row.get("vs_teacher") or {}
        lat = {int(b["batch"]): b for b in (row.get("latency") or {}).get("batches") or []}
        measured = " / ".join(str(x) for x in (row.get("format"), row.get("runtime")) if x)

        cells = [_td(_e(row.get("name"))), _td(_e(measured or "–"))]
        cells += [_td(_cell((row.get("metric") or {}).get(k))) for k in metric_keys]
        cells += [
            _td(_e(fmt_size(row.get("size_bytes"))), not_smaller),
            _td(_cell(row.get("parameters"))),
            _td(_cell(vs_r.get("size_ratio")) if vs_r else "–", not_smaller),
            _td(_cell(vs_t.get("size_ratio")) if vs_t else "–"),
        ]
        for b in batches:
            m = lat.get(b, {})
            cells += [
                _td(_e(f"{m['p50_ms']:.3f}") if m else "–", b in slow),
                _td(_e(f"{m['p95_ms']:.3f}") if m else "–"),
                _td(_e(f"{m['throughput_per_s']:,.1f}") if m else "–"),
                _td(_speedup((vs_r.get("speedup") or {}).get(str(b))), b in slow),
                _td(_speedup((vs_t.get("speedup") or {}).get(str(b)))),
            ]
        cells.append(_td("<br>".join(_e(f.get("message", f.get("flag"))) for f in flags), bool(flags)))
        out.append("<tr>" + "".join(cells) + "</tr>")
    return f'<div class="scroll"><table>{"".join(out)}</table></div>'


def render_html(report: Mapping[str, Any]) -> str:
    """The self-contained HTML page for a JSON-safe report dict (inline CSS, plots as data URIs)."""
    title = str(report.get("title") or "Compression report")
    parts = [
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{_e(title)}</title>',
        f"<style>{_CSS}</style></head><body><h1>{_e(title)}</h1>",
    ]
    summary = {k: v for k, v in (("task", report.get("task")), ("method", _method(report))) if v}
    if summary:
        parts.append(_kv(summary))
    for key in ("teacher", "student"):
        if report.get(key):
            parts.append(f"<h3>{key.capitalize()}</h3>{_kv(report[key])}")

    models = report.get("models") or []
    warnings = [str(w) for w in report.get("warnings") or []]
    flags = [str(f.get("message", f.get("flag"))) for row in models for f in row.get("flags") or []]
    warnings += [f for f in flags if not any(f in w for w in warnings)]  # flags are never left out
    if warnings:
        items = "".join(f"<li>{_e(w)}</li>" for w in warnings)
        parts.append(f'<h2>Warnings</h2><div class="warnings"><ul>{items}</ul></div>')

    metric = _primary_metric(report)
    if models:
        parts.append("<h2>Teacher / student / quantized</h2>" + _models_table(models))
        scatter = _scatter_plot(models, metric) if metric else None
        if scatter:
            parts.append(
                f"<h2>{_e(metric)} vs size and latency</h2>" + _img(scatter, f"{metric} vs size and latency")
            )
    if report.get("search"):
        parts.append(_search_html(report["search"]))
    curves = _curves_plot(report["curves"], metric) if report.get("curves") else None
    if curves:
        parts.append("<h2>Training curves</h2>" + _img(curves, "training curves"))

    quant = report.get("quantization") or {}
    sensitivity = report.get("sensitivity") or quant.get("sensitivity")
    if sensitivity:
        parts.append("<h2>Layer sensitivity</h2>" + _table(sensitivity))
    for key, heading in (
        ("per_class", "Per-class metrics"),
        ("disagreements", "Where student and teacher disagree most"),
    ):
        if report.get(key):
            parts.append(f"<h2>{heading}</h2>" + _table(report[key]))
    distill = report.get("distillation") or {}
    cache = report.get("teacher_cache") or distill.get("teacher_cache")
    if cache:
        parts.append("<h2>Teacher cache</h2>" + _kv(cache))
    if distill:
        parts.append("<h2>Distillation</h2>" + _kv(distill, skip=("history", "teacher_cache")))
    if quant:
        parts.append("<h2>Quantization</h2>" + _kv(quant, skip=("sensitivity",)))
    for key, heading in (("data", "Data"), ("export_check", "ONNX export check"), ("timings", "Timings (s)")):
        if report.get(key):
            parts.append(f"<h2>{heading}</h2>" + _kv(report[key]))
    if report.get("spec"):
        spec = json.dumps(report["spec"], indent=2, ensure_ascii=False)
        parts.append(f"<h2>Spec</h2><details><summary>full spec</summary><pre>{_e(spec)}</pre></details>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(out_dir: Path, report: Mapping[str, Any]) -> tuple[Path, Path]:
    """Write ``report.json`` (every number) and the self-contained ``report.html``; returns both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = to_jsonable(report)
    json_path, html_path = out_dir / "report.json", out_dir / "report.html"
    json_path.write_text(json.dumps(data, indent=2, allow_nan=False, ensure_ascii=False), encoding="utf-8")
    html_path.write_text(render_html(data), encoding="utf-8")
    return json_path, html_path


# --- manifest --------------------------------------------------------------------------


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _file_entry(path: Path) -> dict[str, Any]:
    """sha256 and size of a file, or of every file under a directory."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return {
            "file": path.name,
            "files": [{"path": p.relative_to(path).as_posix(), **_file_entry(p)} for p in files],
        }
    return {"file": path.name, "sha256": sha256_file(path), "size_bytes": path.stat().st_size}


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def write_manifest(
    out_dir: Path,
    *,
    inputs: Mapping[str, Path],
    outputs: Mapping[str, Path],
    spec: Any,
    seeds: Mapping[str, int],
    calibration_ids: Sequence[int] | None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``manifest.json``: what went in and came out (sha256, size), seeds, versions, spec."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = {
        "created_at": datetime.now(UTC).isoformat(),
        "inputs": {name: _file_entry(Path(p)) for name, p in inputs.items()},
        "outputs": {name: _file_entry(Path(p)) for name, p in outputs.items()},
        "spec": spec,
        "seeds": dict(seeds),
        "calibration_ids": None if calibration_ids is None else [int(i) for i in calibration_ids],
        "versions": library_versions(),
        "platform": platform.platform(),
        "extra": extra or {},
    }
    path = out_dir / "manifest.json"
    path.write_text(json.dumps(to_jsonable(manifest), indent=2, allow_nan=False), encoding="utf-8")
    return path
