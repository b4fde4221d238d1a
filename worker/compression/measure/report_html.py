"""report.html: one self-contained page (inline CSS, plots as data URIs) for a JSON-safe report dict;
numbers formatted as the `report` module describes."""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from typing import Any

from .report_plots import curves_plot, scatter_plot, search_plot

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


def _img(b64: str, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{b64}">'


def _primary_metric(report: Mapping[str, Any]) -> str | None:
    if report.get("primary_metric"):
        return str(report["primary_metric"])
    for row in report.get("models") or []:
        for k, v in (row.get("metric") or {}).items():
            if isinstance(v, (int, float)):
                return str(k)
    return None


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
    plot = search_plot(search)
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
body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1240px}
.verdict{border:2px solid #888;border-radius:8px;padding:.5em 1em;margin:1em 0}
.verdict.ship{border-color:#2a7a2a;background:#f1faf1}.verdict.ship_with_caution{border-color:#b88a00;background:#fff9e6}
.verdict.do_not_ship{border-color:#b22;background:#fdf0f0}
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


_VERDICT_WORDS = {"ship": "Ship it", "ship_with_caution": "Ship with caution", "do_not_ship": "Do not ship"}


def _verdict_card(report: Mapping[str, Any]) -> str:
    """What to deploy, how much smaller and faster, what it costs: the first thing on the page."""
    summary = report.get("summary") or {}
    verdict = summary.get("verdict")
    if not verdict:
        return ""
    reasons = "".join(f"<li><code>{_e(r.get('code'))}</code> {_e(r.get('message'))}</li>"
                      for r in summary.get("reasons") or [])  # fmt: skip
    delivered = summary.get("delivered") or {}
    why = (report.get("delivery") or {}).get("why")
    return (f'<div class="verdict {_e(verdict)}"><h2>{_e(_VERDICT_WORDS.get(verdict, verdict))}</h2>'
            f"<p>{_e(summary.get('headline', ''))}</p>"
            + (f"<p>Deploy <code>{_e(delivered.get('file', 'model.onnx'))}</code> (in <code>bundle.zip</code> with "
               f"<code>predict.py</code>), chosen because {_e(why)}.</p>" if why else "")
            + (f"<ul>{reasons}</ul>" if reasons else "") + "</div>")  # fmt: skip


def render_html(report: Mapping[str, Any]) -> str:
    """The self-contained HTML page for a JSON-safe report dict (inline CSS, plots as data URIs)."""
    title = str(report.get("title") or "Compression report")
    parts = [
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{_e(title)}</title>',
        f"<style>{_CSS}</style></head><body><h1>{_e(title)}</h1>",
    ]
    parts.append(_verdict_card(report))
    summary = {k: v for k, v in (("task", report.get("task")), ("method", _method(report))) if v}
    if summary:
        parts.append(_kv(summary))

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
        scatter = scatter_plot(models, metric) if metric else None
        if scatter:
            parts.append(
                f"<h2>{_e(metric)} vs size and latency</h2>" + _img(scatter, f"{metric} vs size and latency")
            )
    policy = report.get("policy") or {}
    if policy.get("returns"):
        rows = [{"model": name, **r} for name, r in policy["returns"].items()]
        parts.append(f"<h2>Return in {_e(policy.get('env'))} over {_e(policy.get('episodes'))} episodes "
                     f"(seeds 0…{_e(int(policy.get('episodes', 1)) - 1)}; delivered: {_e(policy.get('delivered'))})</h2>"
                     + _table(rows))
    elif policy:
        parts.append(f"<h2>Return in {_e(policy.get('env'))}</h2><p>not measured: {_e(policy.get('why'))}</p>")
    if report.get("search"):
        parts.append(_search_html(report["search"]))
    curves = curves_plot(report["curves"], metric) if report.get("curves") else None
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
    if report.get("delivery", {}).get("candidates"):
        parts.append("<h2>Every candidate (delivered: the best within tolerance, then the fastest)</h2>"
                     + _table(report["delivery"]["candidates"]))
    timing = (report.get("student") or {}).get("chosen_by_speed")
    if timing:  # students.speed_fit: the auto student timed against the teacher before training
        parts.append(f"<h2>The student's size, chosen by speed at batch {_e(timing['batch'])}</h2>"
                     f"<p>teacher {_e(timing['teacher_p50_ms'])} ms; chosen: {_e(timing['why'])}</p>"
                     + _table(timing["tried"]))
    for key, heading in (("preprocessing", "Preprocessing (shipped as preprocessing.json)"),
                         ("teacher_check", "The teacher against the labels"), ("class_order", "Class order")):
        if report.get(key):
            parts.append(f"<h2>{heading}</h2>" + _kv(report[key]))
    for key in ("teacher", "student"):
        if report.get(key):
            parts.append(f"<h2>{key.capitalize()}</h2><details><summary>{_e(key)} details</summary>"
                         f"{_kv(report[key])}</details>")
    distill = report.get("distillation") or {}
    cache = report.get("teacher_cache") or distill.get("teacher_cache")
    if cache:
        parts.append("<h2>Teacher cache</h2>" + _kv(cache))
    if distill:
        parts.append("<h2>Distillation</h2>" + _kv(distill, skip=("history", "teacher_cache")))
    if quant.get("tried"):  # quantize_choice: auto measured every int8 format and kept the fastest that scores
        parts.append("<h2>Int8 formats measured (chosen: the fastest within tolerance)</h2>" + _table(quant["tried"]))
    if quant:
        parts.append("<h2>Quantization</h2>" + _kv(quant, skip=("sensitivity", "tried")))
    for key, heading in (("data", "Data"), ("export_check", "ONNX export check"), ("timings", "Timings (s)")):
        if report.get(key):
            parts.append(f"<h2>{heading}</h2>" + _kv(report[key]))
    if report.get("spec"):
        spec = json.dumps(report["spec"], indent=2, ensure_ascii=False)
        parts.append(f"<h2>Spec</h2><details><summary>full spec</summary><pre>{_e(spec)}</pre></details>")
    parts.append("</body></html>")
    return "\n".join(parts)
