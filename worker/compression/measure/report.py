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

import dataclasses
import hashlib
import importlib.metadata
import json
import math
import platform
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .report_html import render_html

VERSIONED_PACKAGES = ("torch", "onnx", "onnxruntime", "transformers", "numpy", "kdq")


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
