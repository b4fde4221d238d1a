"""Fields of use: the service's engine against a plain hand-written KD script, per field. Prints a table
and writes bench/out/fields.json.

Cases (generated data, teachers trained here in seconds; `bench.field_cases`)
  forecast-mlp    an hourly load series (two periods, trend, noise, a leading covariate), 3,000 steps;
                  window 48, horizon 12; an MLP teacher on the flat window.
  forecast-cnn1d  the same series; a temporal CNN teacher (cnn1d, flatten pooling).
  cartpole        4,000 logged CartPole observations; an MLP teacher imitating a balancing controller;
                  returns over 10 episodes in CartPole-v1 (gymnasium).
  audio           a zip of 180 WAV clips in 3 class folders (low tone, high tone, chirp; noise, 8 and
                  11.025 kHz, mono and stereo, 0.4–0.7 s); a cnn1d teacher with a log-mel front end (its
                  graph takes 0.5 s waveforms). The plain script trains a narrower cnn1d with the same
                  front end on KL to the teacher (an MLP on raw samples would be no fair baseline).
  vit             a Hugging Face ViT (6 layers, hidden 64) on 32×32 pattern images; the plain script distils
                  a ViT of as many full-width teacher layers as fit the budget, and the engine's student
                  graph is also quantized both ways (dynamic and static int8): `bench.fields_vit`.
  ner             a Hugging Face BERT token classifier (6 layers, hidden 128) on generated NER sentences (people,
                  organisations, places; BIO tags); judged by entity F1 (seqeval); the plain script distils
                  the teacher's first and last layers per token (KL at T = 2 + CE): `bench.fields_ner`.

For each: the engine's job (`compress`: auto student at ≤ 25 % of the teacher's parameters, its default
recipe, the model it delivers as model.onnx) and a plain script (an MLP of the same parameter budget
trained with Adam on MSE / KL to the teacher's outputs, exported fp32), both judged with onnxruntime on
the same held-out split the engine uses (for the series: the last 20 % of the windows in time order):
the field's metric (MAE, MAPE, sMAPE / agreement and return), file size, p50 latency at batch 1 and 64
(onnxruntime, 1 thread, interleaved), and ratios to the teacher.

Usage: python bench/fields.py [--cases forecast-mlp,cartpole,vit,ner] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.field_cases import (
    AUDIO_RATE,
    audio_problem,
    forecast_problem,
    policy_problem,
)
from worker.compression.compress import compress
from worker.compression.deliver import teacher_onnx
from worker.compression.fields.metrics import action_metrics, forecast_metrics
from worker.compression.fields.policy import gymnasium_available, rollout_returns
from worker.compression.io.datasets import load_dataset, train_eval_split
from worker.compression.io.teachers import load_teacher
from worker.compression.spec import CompressSpec, DataSpec

SERIES = {"task": "forecasting", "time_column": "ts", "target_columns": ["load"], "feature_columns": ["temp"],
          "window": 48, "horizon": 12}
POLICY = {"task": "policy", "action_space": "discrete", "action_columns": ["action"], "env": "CartPole-v1",
          "episodes": 10}


def plain_kd(x: torch.Tensor, targets: torch.Tensor, budget: int, *, discrete: bool, epochs: int,
             out: Path) -> Path:
    """The hand-written baseline: an MLP of two equal hidden layers within ``budget`` parameters,
    inputs standardised inside the graph, Adam on MSE (values) or KL at T = 2 (logits) to the teacher."""
    d_in, d_out = x.shape[1], targets.shape[1]
    width = 8
    while (d_in * (width + 8) + (width + 8) ** 2 + (width + 8) * d_out) <= budget:
        width += 8
    mu, sd = x.mean(0), x.std(0) + 1e-6
    t_mu, t_sd = (targets.mean(0), targets.std(0) + 1e-6) if not discrete else (torch.zeros(d_out), torch.ones(d_out))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(d_in, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                                      nn.Linear(width, d_out))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body((x - mu) / sd) * t_sd + t_mu

    torch.manual_seed(0)
    net = Net()
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    n = len(x)
    for _ in range(epochs):
        perm = torch.randperm(n)
        for i in range(0, n, 64):
            idx = perm[i:i + 64]
            pred = net(x[idx])
            if discrete:
                loss = F.kl_div(F.log_softmax(pred / 2, -1), F.softmax(targets[idx] / 2, -1), reduction="batchmean") * 4
            else:
                loss = F.mse_loss((pred - t_mu) / t_sd, (targets[idx] - t_mu) / t_sd)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return export(net, x[:1], out)


def plain_audio_kd(teacher_cfg: dict[str, Any], x: torch.Tensor, targets: torch.Tensor, epochs: int,
                   out: Path) -> Path:
    """The hand-written audio baseline: the teacher's architecture at half its channels and hidden width
    (the same log-mel front end), Adam on KL at T = 2 to the teacher's logits, batch 32."""
    from worker.compression.students import zoo

    cfg = {**teacher_cfg, "channels": [max(4, c // 2) for c in teacher_cfg["channels"]],
           "hidden": max(4, int(teacher_cfg.get("hidden", 0)) // 2)}
    cfg.pop("format", None)
    torch.manual_seed(0)
    net = zoo.build(cfg)
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    for _ in range(epochs):
        net.train()
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 32):
            idx = perm[i:i + 32]
            loss = F.kl_div(F.log_softmax(net(x[idx]) / 2, -1), F.softmax(targets[idx] / 2, -1),
                            reduction="batchmean") * 4
            opt.zero_grad()
            loss.backward()
            opt.step()
    return export(net, x[:1], out)


def export(net: torch.nn.Module, sample: torch.Tensor, out: Path) -> Path:
    """A peer's model as one ONNX file with a dynamic batch, judged like the service's."""
    torch.onnx.export(net.eval(), (sample,), str(out), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=17, dynamo=False)
    return out


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(path: Path, x: np.ndarray) -> np.ndarray:
    s = session(path)
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def p50s(paths: dict[str, Path], x: np.ndarray, batches: tuple[int, ...] = (1, 64), rounds: int = 5,
         repeats: int = 40) -> dict[str, dict[int, float]]:
    """Median latency (ms) per graph and batch, graphs interleaved round by round."""
    sessions = {k: session(p) for k, p in paths.items()}
    times: dict[str, dict[int, list[float]]] = {k: {b: [] for b in batches} for k in paths}
    for _ in range(rounds):
        for k, s in sessions.items():
            name = s.get_inputs()[0].name
            for b in batches:
                feed = {name: x[:b]}
                s.run(None, feed)
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    s.run(None, feed)
                    times[k][b].append((time.perf_counter() - t0) * 1000)
    return {k: {b: statistics.median(v) for b, v in per.items()} for k, per in times.items()}


def engine_job(teacher: Path, data: Path, data_spec: dict[str, Any], out: Path, epochs: int,
               student: dict[str, Any] | None = None) -> tuple[Path, dict]:
    spec = CompressSpec.model_validate({
        "data": data_spec, "student": student or {"kind": "auto"},
        "distillation": {"epochs": epochs, "batch_size": 64, "lr": 3e-3},
        "evaluation": {"latency_batch_sizes": [1, 64], "repeats": 20, "warmup": 2}})
    t0 = time.perf_counter()
    result = compress(spec, teacher_path=teacher, dataset_path=data, output_dir=out)
    result.metrics["wall_s"] = time.perf_counter() - t0
    return out / "model.onnx", result.metrics


def case(name: str, quick: bool, tmp: Path) -> list[dict[str, Any]]:
    if name == "vit":  # imported here: bench.fields_vit takes this module's helpers as arguments
        from bench.fields_vit import vit_case

        return vit_case(quick, tmp, engine_job=engine_job, p50s=p50s, run_onnx=run_onnx)
    if name == "ner":
        from bench.fields_ner import ner_case

        return ner_case(quick, tmp, engine_job=engine_job)
    epochs = 10 if quick else 30
    if name.startswith("forecast"):
        arch = name.split("-")[1]
        made = forecast_problem(tmp / name, arch=arch, epochs=60 if quick else 200)
        data_spec = SERIES
    elif name == "audio":
        made = audio_problem(tmp / name, per_class=60, epochs=15 if quick else 30)
        data_spec = {"sample_rate": AUDIO_RATE}
    else:
        made = policy_problem(tmp / name, epochs=100 if quick else 300)
        data_spec = POLICY
    teacher = load_teacher(made["teacher"])
    spec = DataSpec(**data_spec)
    task = teacher.task
    data = load_dataset(made["data"], spec, input_shape=teacher.input_shape, input_kind=teacher.input_kind, task=task)
    train, evald = train_eval_split(data, None, spec)
    discrete = name in ("cartpole", "audio")

    t0 = time.perf_counter()
    delivered, report = engine_job(made["teacher"], made["data"], data_spec, tmp / name / "engine", epochs)
    sample = {k: v[:8] for k, v in evald.inputs.items()}
    teacher_graph = teacher_onnx(teacher, made["teacher"], sample, tmp / name / "teacher_work")
    engine_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    flat = train.inputs["x"].reshape(len(train), -1)
    budget = teacher.num_parameters // 4
    teacher_out = teacher.predict(train.inputs)
    if name == "audio":
        plain = plain_audio_kd(teacher.config, train.inputs["x"], teacher_out, epochs, tmp / name / "plain.onnx")
    else:
        plain = plain_kd(flat, teacher_out, budget, discrete=discrete, epochs=epochs, out=tmp / name / "plain.onnx")
    plain_s = time.perf_counter() - t0

    x_eval = evald.inputs["x"].numpy()
    graphs = {"teacher": teacher_graph, "engine": delivered, "plain KD": plain}
    feeds = {"teacher": x_eval, "engine": x_eval,
             "plain KD": x_eval if name == "audio" else x_eval.reshape(len(x_eval), -1)}
    outputs = {k: torch.from_numpy(run_onnx(p, feeds[k])) for k, p in graphs.items()}
    lat = p50s({k: graphs[k] for k in ("teacher", "engine")}, x_eval)
    lat["plain KD"] = p50s({"plain KD": plain}, feeds["plain KD"])["plain KD"]
    returns = None
    if name == "cartpole" and gymnasium_available():
        returns = rollout_returns("CartPole-v1", graphs, episodes=10, discrete=True)["returns"]
    rows = []
    for k, path in graphs.items():
        if discrete:
            metrics = action_metrics(outputs[k], outputs["teacher"], discrete=True)
            if name == "audio":
                metrics["accuracy"] = (outputs[k].argmax(-1) == evald.y).double().mean().item()
            if returns is not None:
                metrics["return"] = returns[k]["mean"]
        else:
            metrics = forecast_metrics(outputs[k], evald.y)
        rows.append({"case": name, "model": k, **metrics, "size_bytes": path.stat().st_size,
                     "p50_ms_b1": lat[k][1], "p50_ms_b64": lat[k][64],
                     "wall_s": {"engine": engine_s, "plain KD": plain_s}.get(k),
                     "verdict": report["summary"]["verdict"] if k == "engine" else None,
                     "delivered": report["summary"].get("delivered", {}).get("name") if k == "engine" else None})
    t = rows[0]
    for r in rows:
        r["size_ratio"] = t["size_bytes"] / r["size_bytes"]
        r["speedup_b64"] = t["p50_ms_b64"] / r["p50_ms_b64"]
        key = "agreement" if discrete else "mae"
        r[f"{key}_vs_teacher"] = r[key] / t[key] if t[key] else None
    return rows


def fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def print_table(rows: list[dict[str, Any]]) -> None:
    cols = ["case", "model", "mae", "mape", "smape", "entity_f1", "entity_precision", "entity_recall", "token_accuracy",
            "accuracy", "agreement", "return", "size_bytes", "p50_ms_b1", "p50_ms_b64", "size_ratio", "speedup_b1",
            "speedup_b64", "mae_vs_teacher", "accuracy_vs_teacher", "f1_vs_teacher", "wall_s", "delivered", "verdict"]
    cols = [c for c in cols if any(r.get(c) is not None for r in rows)]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="forecast-mlp,forecast-cnn1d,cartpole,audio")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.cases.split(","):
            rows += case(name, args.quick, Path(tmp))
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    (out / "fields.json").write_text(json.dumps(rows, indent=2, default=str))
    print_table(rows)


if __name__ == "__main__":
    main()
