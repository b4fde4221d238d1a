"""The ``vit`` case of `bench.fields`: a Hugging Face ViT image classifier (6 layers, hidden 64, 32×32 images
of 4 pattern classes, `bench.field_vit`) compressed by the engine (auto student, default recipe; and derived
students of 2 layers, full and quarter feed-forward width) against a hand-written KD script (a ViT of as many full-width teacher layers as fit the same 25 % budget, KL at T = 2),
and the engine's student graph quantized both ways (dynamic and static int8) to compare them.

Judged on the engine's own held-out split: accuracy (labels), agreement with the teacher, file size,
p50 latency at batch 1 and 64 (onnxruntime, 1 thread, interleaved), ratios to the teacher's fp32 ONNX.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from bench.field_vit import plain_vit_kd, vit_problem
from worker.compression.deliver import teacher_onnx
from worker.compression.io.datasets import load_for_teacher
from worker.compression.io.teachers import load_teacher
from worker.compression.quantize.api import quantize
from worker.compression.spec import DataSpec, DynamicInt8Config, StaticInt8Config

DERIVED = {"engine derived 2 layers": {"kind": "derived", "num_layers": 2},
           "engine derived 2 layers, FFN x0.25": {"kind": "derived", "num_layers": 2, "width_ratio": 0.25}}
"""The engine's other jobs: derived students (default recipe), besides its ``auto`` one."""


def vit_case(quick: bool, tmp: Path, *, engine_job: Any, p50s: Any, run_onnx: Any) -> list[dict[str, Any]]:
    """Rows for the table of `bench.fields` (its ``engine_job``, ``p50s`` and ``run_onnx`` passed in)."""
    epochs = 10 if quick else 30
    made = vit_problem(tmp / "vit", size=32, per_class=80 if quick else 150, steps=300 if quick else 500)
    teacher = load_teacher(made["teacher"])
    train, evald, _ = load_for_teacher(made["data"], None, DataSpec(), teacher, "classification")

    t0 = time.perf_counter()
    delivered, report = engine_job(made["teacher"], made["data"], {}, tmp / "vit" / "engine", epochs)
    engine_s = time.perf_counter() - t0
    extra: dict[str, tuple[Path, dict[str, Any], float]] = {}
    for name, student in DERIVED.items():
        t0 = time.perf_counter()
        path, job = engine_job(made["teacher"], made["data"], {}, tmp / "vit" / name.replace(" ", "_"), epochs, student)
        extra[name] = (path, job, time.perf_counter() - t0)
    teacher_graph = teacher_onnx(teacher, made["teacher"], {"x": evald.inputs["x"][:8]}, tmp / "vit" / "t")

    # the engine's student graph, quantized both ways (what `quantization: auto` chooses between)
    student_fp32 = tmp / "vit" / "engine" / "model_fp32.onnx"
    dyn = quantize(student_fp32, tmp / "vit" / "dynamic.onnx", DynamicInt8Config())
    static = quantize(student_fp32, tmp / "vit" / "static.onnx", StaticInt8Config(),
                      calibration_inputs={"x": train.inputs["x"]})

    t0 = time.perf_counter()
    budget = teacher.num_parameters // 4
    per_layer = sum(p.numel() for p in teacher.module.backbone.vit.layers[0].parameters())
    fixed = teacher.num_parameters - per_layer * teacher.module.config.num_hidden_layers
    layers = max(1, (budget - fixed) // per_layer)
    plain = plain_vit_kd(teacher.module.backbone, train.inputs["x"], teacher.predict(train.inputs),
                         num_layers=int(layers), epochs=epochs, out=tmp / "vit" / "plain.onnx")
    plain_s = time.perf_counter() - t0

    graphs = {"teacher": teacher_graph, "engine": delivered, **{k: v[0] for k, v in extra.items()},
              "engine student fp32": student_fp32,
              "engine student dynamic int8": Path(dyn.path), "engine student static int8": Path(static.path),
              f"plain KD ({layers} layer(s))": plain}
    jobs = {"engine": report, **{k: v[1] for k, v in extra.items()}}
    x_eval = evald.inputs["x"].numpy()
    outputs = {k: torch.from_numpy(run_onnx(p, x_eval)) for k, p in graphs.items()}
    lat = p50s(graphs, x_eval)
    rows = []
    for k, path in graphs.items():
        pred = outputs[k].argmax(-1)
        rows.append({"case": "vit", "model": k, "accuracy": (pred == evald.y).double().mean().item(),
                     "agreement": (pred == outputs["teacher"].argmax(-1)).double().mean().item(),
                     "size_bytes": path.stat().st_size, "p50_ms_b1": lat[k][1], "p50_ms_b64": lat[k][64],
                     "wall_s": {"engine": engine_s, "plain KD": plain_s,
                                **{k: v[2] for k, v in extra.items()}}.get(k.split(" (")[0]),
                     **job_columns(jobs.get(k))})
    t = rows[0]
    for r in rows:
        r["size_ratio"] = t["size_bytes"] / r["size_bytes"]
        r["speedup_b1"] = t["p50_ms_b1"] / r["p50_ms_b1"]
        r["speedup_b64"] = t["p50_ms_b64"] / r["p50_ms_b64"]
        r["accuracy_vs_teacher"] = r["accuracy"] / t["accuracy"] if t["accuracy"] else None
    return rows


def job_columns(report: dict[str, Any] | None) -> dict[str, Any]:
    """An engine job's verdict, what it delivered, its student and the quantization ``auto`` chose."""
    if report is None:
        return {}
    return {"verdict": report["summary"]["verdict"], "delivered": report["summary"].get("delivered", {}).get("name"),
            "student": report["student"]["description"], "quantization": (report.get("quantization") or {}).get("method")}
