"""The search on teachers it was never tuned on, against a plain hand-written KD script (issue 18).

Each run draws new cases (``--seed`` repeats one): a data set (scikit-learn's bundled digits,
breast_cancer, wine, iris, diabetes; ``make_classification`` of varied size, classes and difficulty;
``make_regression`` / Friedman #1; generated 1×12×12 images of noisy shapes), a teacher of random
width, depth and activation (an MLP; a CNN for images) trained here in seconds and saved in the zoo
format, and a split: a test quarter no job ever sees, the rest the job's data.

* **peer**: the 25-line script a person would write: a fresh 64-64 MLP (a 8-16 CNN for images),
  KD at T=4 with α=0.5 (regression: MSE to the teacher and to the labels, half each), AdamW 3e-3,
  batch 32, 150 epochs, exported as fp32 ONNX. Fixed, never tuned.
* **twin**: the peer's script again with another seed, judged against the peer as the service is:
  how often an equally good model "wins" by these checks on this test split (the noise ceiling).
* **service**: the engine's search, in process (``worker.compression.search.run.search``), given the
  job data split into train and eval (80 / 20) and ``targets: {min: the peer's score on that eval
  split (max for mse), latency_batch_size: 64, time_budget_s: min(8 × the peer's wall, 90)}`` (a team
  holding a plain KD model asks for something smaller and faster that scores as well on its
  validation data; ``--target teacher``: ``max_drop: 0`` from the teacher instead), default
  distillation settings and ``quantization: auto``. The teacher trains on the train part only, and
  so does the peer (``--peer-data job``: train + eval, with the teacher target), so the eval split is
  unseen by all three until the search scores on it.

Everything is judged in this run by onnxruntime (1 thread) on the test split: metric, ONNX size,
p50 latency at batch 64 (interleaved rounds, median) and wall time (the peer's training; the
search's whole run). A case is *won* when the service's model is at least as good on the metric
and no more than 5 % larger and 5 % slower than the peer's. Summary: win rate, geometric means of
the peer/service size and latency ratios and of the service/peer wall-time ratio.

Usage: python bench/unseen.py [--seed N] [--cases 20] [--quick]   (writes bench/out/unseen.json)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.distill import as_teacher, warm_up
from bench.search import time_models
from worker.compression.measure.evaluate import onnx_outputs
from worker.compression.measure.export import export_onnx, onnx_size_bytes
from worker.compression.search.run import SearchOptions, search
from worker.compression.spec import CompressSpec
from worker.compression.students import zoo
from worker.compression.types import TensorData

OUT = Path(__file__).resolve().parent / "out"
BATCH = 64
TIE = 0.05
DATASETS = ("digits", "breast_cancer", "wine", "iris", "diabetes", "make_classification", "make_classification",
            "make_regression", "friedman", "shapes")


# --- data ---------------------------------------------------------------------------------------


def make_data(name: str, rng: random.Random) -> tuple[np.ndarray, np.ndarray, str, str]:
    """(x, y, task, description); x standardised, regression y standardised."""
    from sklearn import datasets

    seed = rng.randrange(10**6)
    if name in ("digits", "breast_cancer", "wine", "iris", "diabetes"):
        x, y = getattr(datasets, f"load_{name}")(return_X_y=True)
        desc = name
    elif name == "make_classification":
        n, f, c = rng.choice([600, 1000, 2000, 3000]), rng.randint(8, 60), rng.randint(2, 8)
        sep = rng.choice([0.6, 1.0, 1.5, 2.0])
        informative, clusters = max(2, min(f, rng.randint(3, 20))), rng.choice([1, 2])
        informative = min(f, max(informative, math.ceil(math.log2(c * clusters))))  # sklearn: c·k ≤ 2^informative
        clusters = clusters if c * clusters <= 2 ** informative else 1
        x, y = datasets.make_classification(n, f, n_informative=informative, n_redundant=0, n_classes=c,
                                            n_clusters_per_class=clusters, class_sep=sep,
                                            flip_y=rng.choice([0.0, 0.02]), random_state=seed)
        desc = f"make_classification n={n} f={f} c={c} sep={sep}"
    elif name == "make_regression":
        n, f = rng.choice([500, 1000, 2000]), rng.randint(5, 40)
        x, y = datasets.make_regression(n, f, n_informative=rng.randint(2, f), noise=rng.choice([1.0, 10.0]),
                                        random_state=seed)
        y = np.tanh(y / y.std()) + 0.1 * y / y.std()  # a bend an MLP must learn
        desc = f"make_regression n={n} f={f}"
    elif name == "friedman":
        n = rng.choice([500, 1000, 2000])
        x, y = datasets.make_friedman1(n, rng.randint(5, 20), noise=1.0, random_state=seed)
        desc = f"friedman1 n={n} f={x.shape[1]}"
    else:
        return (*shapes(rng.choice([3, 4, 6]), rng.choice([900, 1500]), seed), "classification",
                "shapes 1x12x12")
    task = "regression" if name in ("diabetes", "make_regression", "friedman") else "classification"
    x = (x - x.mean(0)) / np.maximum(x.std(0), 1e-6)
    if task == "regression":
        y = (y - y.mean()) / y.std()
    return x.astype(np.float32), y, task, desc


def shapes(classes: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """1×12×12 images: a noisy square, cross, ring, bar, diagonal or dot at a random place."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[:12, :12]
    x = np.zeros((n, 1, 12, 12), np.float32)
    y = g.integers(0, classes, n)
    for i in range(n):
        cy, cx = g.integers(3, 9, 2)
        r = g.uniform(1.5, 3.0)
        d, k = np.hypot(yy - cy, xx - cx), y[i]
        mask = [np.maximum(abs(yy - cy), abs(xx - cx)) <= r, (abs(yy - cy) < 1) | (abs(xx - cx) < 1),
                abs(d - r) < 0.8, abs(yy - cy) < 1, abs((yy - cy) - (xx - cx)) < 1, d < 1.2][k]
        x[i, 0] = mask * g.uniform(0.6, 1.0) + g.normal(0, 0.35, (12, 12))
    return x, y


# --- one case -------------------------------------------------------------------------------------


def draw_case(rng: random.Random, i: int, order: list[str]) -> dict[str, Any]:
    name = order[i % len(order)]
    x, y, task, desc = make_data(name, rng)
    out = int(y.max()) + 1 if task == "classification" else 1
    if x.ndim == 4:
        ch = rng.choice([16, 32, 48])
        cfg = {"architecture": "cnn", "task": task, "in_channels": 1, "input_size": [12, 12],
               "channels": [ch, 2 * ch, 2 * ch], "kernel_size": 3, "hidden": rng.choice([64, 128]), "output_dim": out}
    else:
        width = rng.choice([256, 384, 512, 768, 1024])
        depth = rng.randint(1, 4)
        hidden = [max(32, int(width / rng.choice([1, 1, 2]))) for _ in range(depth)]
        cfg = {"architecture": "mlp", "task": task, "input_dim": x.shape[1], "hidden": hidden,
               "activation": rng.choice(["relu", "gelu"]), "output_dim": out}
    return {"dataset": desc, "task": task, "x": x, "y": y, "cfg": cfg, "seed": rng.randrange(10**6)}


def to_data(x: np.ndarray, y: np.ndarray, task: str) -> TensorData:
    yt = torch.tensor(y, dtype=torch.long if task == "classification" else torch.float32)
    if task == "regression":
        yt = yt[:, None]
    return TensorData({"x": torch.tensor(x)}, yt, input_kind="image" if x.ndim == 4 else "vector")


def loss_of(task: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y) if task == "classification" else F.mse_loss(out, y)


def train_teacher(cfg: dict[str, Any], data: TensorData, task: str, seed: int, seconds: float = 8.0) -> torch.nn.Module:
    """Supervised training, one-cycle AdamW, 60 epochs and at least 2,000 steps (a tiny data set's
    teacher is trained properly too), stopping early at ``seconds``."""
    torch.manual_seed(seed)
    model = zoo.build(cfg)
    x, y = data.inputs["x"], data.y
    batch = 64
    epochs = max(60, math.ceil(2000 / math.ceil(len(x) / batch)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-3, total_steps=epochs * math.ceil(len(x) / batch))
    t0 = time.perf_counter()
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), batch):
            idx = perm[i:i + batch]
            loss = loss_of(task, model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if time.perf_counter() - t0 > seconds:
            break
    return model.eval()


def peer(teacher: torch.nn.Module, cfg: dict[str, Any], x: torch.Tensor, y: torch.Tensor, task: str,
         epochs: int = 150, seed: int = 0) -> torch.nn.Module:
    """The plain KD script: 64-64 MLP (8-16 CNN for images), T=4, α=0.5, AdamW 3e-3, batch 32, fp32."""
    torch.manual_seed(seed)
    if cfg["architecture"] == "cnn":
        student = zoo.build({**cfg, "channels": [8, 16], "hidden": 32})
    else:
        student = zoo.build({**cfg, "hidden": [64, 64], "activation": "relu"})
    with torch.no_grad():
        soft = teacher(x)
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
    t, a = 4.0, 0.5
    student.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 32):
            idx = perm[i:i + 32]
            out = student(x[idx])
            if task == "classification":
                kd = F.kl_div(F.log_softmax(out / t, -1), F.log_softmax(soft[idx] / t, -1), reduction="batchmean",
                              log_target=True) * t * t
            else:
                kd = F.mse_loss(out, soft[idx])
            loss = a * kd + (1 - a) * loss_of(task, out, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return student.eval()


def metric(path: Path, test: TensorData, task: str) -> float:
    out = np.asarray(onnx_outputs(path, {"x": test.inputs["x"].numpy()}, threads=1))
    if task == "classification":
        return float((out.argmax(1) == test.y.numpy()).mean())
    return float(((out.reshape(-1) - test.y.numpy().reshape(-1)) ** 2).mean())


def run_case(i: int, case: dict[str, Any], folder: Path, max_budget: float, peer_data: str,
             target: str, z: float | None = None) -> dict[str, Any]:
    task, cfg = case["task"], case["cfg"]
    data = to_data(case["x"], case["y"], task)
    job, test = data.split(0.25, seed=case["seed"])
    train, evald = job.split(0.2, seed=case["seed"] + 1)
    t0 = time.perf_counter()
    module = train_teacher(cfg, train, task, case["seed"])  # the eval split stays unseen by the teacher too
    teacher = as_teacher(module, cfg, folder / "teacher")
    teacher_s = time.perf_counter() - t0
    sample = {"x": test.inputs["x"][:8]}
    teacher_onnx = export_onnx(teacher.module, sample, folder / "teacher.onnx", task=task)

    t0 = time.perf_counter()
    fit = job if peer_data == "job" else train
    peer_model = peer(teacher.module, cfg, fit.inputs["x"], fit.y, task)
    peer_s = time.perf_counter() - t0
    peer_onnx = export_onnx(peer_model, sample, folder / "peer.onnx", task=task)
    # the noise ceiling: the same script with another seed, judged as the service is
    twin_onnx = export_onnx(peer(teacher.module, cfg, fit.inputs["x"], fit.y, task, seed=1), sample,
                            folder / "twin.onnx", task=task)

    budget = min(max_budget, max(20.0, 8 * peer_s))
    if target == "peer" and peer_data == "train":  # the peer never saw the eval split: its score there is fair
        peer_val = metric(peer_onnx, evald, task)
        targets = {"min": peer_val} if task == "classification" else {"max": peer_val}
    else:
        targets = {"max_drop": 0.0}
    spec = CompressSpec.model_validate({
        "student": {"kind": "search"},
        "targets": {**targets, "latency_batch_size": BATCH, "time_budget_s": budget},
        "evaluation": {"latency_batch_sizes": [BATCH], "threads": 1},
    })
    t0 = time.perf_counter()
    result = search(teacher, train, evald, spec, teacher_onnx=teacher_onnx, workdir=folder / "search",
                    options=SearchOptions(rounds=1, min_timed_s=0.05,
                                          **({} if z is None else {"confidence_z": z})))
    service_s = time.perf_counter() - t0
    chosen = result.chosen

    paths = {"teacher": teacher_onnx, "peer": peer_onnx, "service": chosen.path, "twin": twin_onnx}
    lat = time_models(paths, {"x": test.inputs["x"][:BATCH].numpy()}, batches=(BATCH,), rounds=3, min_s=0.1)
    rows = {k: {"metric": metric(p, test, task), "size": onnx_size_bytes(p), "p50_ms": lat[k][BATCH]}
            for k, p in paths.items()}
    rows["teacher"]["wall_s"], rows["peer"]["wall_s"], rows["service"]["wall_s"] = teacher_s, peer_s, service_s
    rows["twin"]["wall_s"] = peer_s
    checks = judge(rows["service"], rows["peer"], task)
    twin_checks = judge(rows["twin"], rows["peer"], task)
    return {"case": i, "dataset": case["dataset"], "task": task, "teacher_cfg": describe(cfg),
            "teacher_params": zoo.count_parameters(teacher.module), "rows": rows, "chosen": chosen.name,
            "chosen_eval_metric": chosen.value, "bound": result.goal.bound, "met_all": result.choice.met_all,
            "budget_s": budget, "targets": targets, "checks": checks, "won": all(checks.values()),
            "twin_checks": twin_checks, "twin_won": all(twin_checks.values()),
            "candidates": [{k: c.get(k) for k in ("name", "status", "metric", "epochs", "train_s")}
                           for c in result.candidates if c["status"] not in ("not trained", "candidate")],
            "search_phases_s": result.budget["phases_s"], "rungs": result.rungs}


def judge(s: dict[str, Any], p: dict[str, Any], task: str) -> dict[str, bool]:
    """The win checks of model ``s`` against the peer ``p``: metric as good, size and p50 within ``TIE``."""
    better = s["metric"] >= p["metric"] if task == "classification" else s["metric"] <= p["metric"]
    return {"metric": better, "size": s["size"] <= p["size"] * (1 + TIE), "speed": s["p50_ms"] <= p["p50_ms"] * (1 + TIE)}


def describe(cfg: dict[str, Any]) -> str:
    if cfg["architecture"] == "cnn":
        return "cnn-" + "-".join(map(str, cfg["channels"])) + f"-h{cfg['hidden']}"
    return "mlp-" + "-".join(map(str, cfg["hidden"])) + f" {cfg.get('activation', 'relu')}"


# --- output ---------------------------------------------------------------------------------------


def gmean(values: list[float]) -> float:
    return math.exp(statistics.fmean(math.log(v) for v in values)) if values else float("nan")


def print_case(r: dict[str, Any]) -> None:
    rows = r["rows"]
    mname = "acc" if r["task"] == "classification" else "mse"
    print(f"\n[{r['case']:2d}] {r['dataset']} | teacher {r['teacher_cfg']} ({r['teacher_params']:,} params) | "
          f"service chose {r['chosen']} | {'WON' if r['won'] else 'lost: ' + ', '.join(k for k, v in r['checks'].items() if not v)}")
    for k in ("teacher", "peer", "service", "twin"):
        x = rows[k]
        print(f"     {k:8s} {mname} {x['metric']:.4f}  size {x['size']:>10,} B  p50@{BATCH} {x['p50_ms']:8.4f} ms  "
              f"wall {x['wall_s']:6.1f} s")


def summary(results: list[dict[str, Any]]) -> list[str]:
    n = len(results)
    wins = sum(r["won"] for r in results)
    size = gmean([r["rows"]["peer"]["size"] / r["rows"]["service"]["size"] for r in results])
    speed = gmean([r["rows"]["peer"]["p50_ms"] / r["rows"]["service"]["p50_ms"] for r in results])
    wall = gmean([r["rows"]["service"]["wall_s"] / r["rows"]["peer"]["wall_s"] for r in results])
    worst = max(r["rows"]["service"]["wall_s"] / r["rows"]["peer"]["wall_s"] for r in results)
    by = {k: sum(not r["checks"][k] for r in results) for k in ("metric", "size", "speed")}
    twins = sum(r["twin_won"] for r in results)
    twin_by = {k: sum(not r["twin_checks"][k] for r in results) for k in ("metric", "size", "speed")}
    return [
        f"win rate: {wins}/{n} = {wins / n:.0%} (target ≥ 90 %); losses by check: "
        + ", ".join(f"{k} {v}" for k, v in by.items()),
        f"noise ceiling: the peer's own script with another seed 'wins' {twins}/{n} = {twins / n:.0%} by the same "
        "checks; losses by check: " + ", ".join(f"{k} {v}" for k, v in twin_by.items()),
        f"geomean peer/service size: {size:.2f}x smaller; peer/service p50@{BATCH}: {speed:.2f}x faster (target ≥ 1.3x)",
        f"geomean service/peer wall time: {wall:.2f}x (worst {worst:.2f}x; target ≤ 10x)",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=None, help="repeat a run (default: a new seed)")
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="4 cases, a smoke run")
    parser.add_argument("--max-budget", type=float, default=90.0, help="cap of a search's time budget, s")
    parser.add_argument("--peer-data", choices=("train", "job"), default="train",
                        help="the peer trains on the service's training split (equal data, default) or on all the "
                             "job's data (train + the service's eval split)")
    parser.add_argument("--target", choices=("peer", "teacher"), default="peer",
                        help="the search's metric target: at least the peer's score on the search's eval split "
                             "(which the peer never trains on; default), or no drop from the teacher's")
    parser.add_argument("--z", type=float, default=None,
                        help="the search's confidence_z (standard errors a candidate must clear the bound by; "
                             "default: the engine's)")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(10**6)
    n = 4 if args.quick else args.cases
    print(f"bench/unseen.py --seed {seed} --cases {n} --target {args.target} --peer-data {args.peer_data} "
          f"--z {args.z if args.z is not None else SearchOptions().confidence_z} "
          "(torch threads 1, onnxruntime 1 thread)", flush=True)
    torch.set_num_threads(1)
    warm_up()
    rng = random.Random(seed)
    order = rng.sample(DATASETS, len(DATASETS))
    results = []
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(n):
            case = draw_case(rng, i, order)
            folder = Path(tmp) / f"case{i:02d}"
            folder.mkdir()
            r = run_case(i, case, folder, args.max_budget, args.peer_data, args.target, args.z)
            results.append(r)
            print_case(r)
            sys.stdout.flush()
    print(f"\n== summary over {n} cases (seed {seed}, {time.perf_counter() - t_all:.0f} s wall)")
    lines = summary(results)
    print("\n".join(lines))
    OUT.mkdir(exist_ok=True)
    (OUT / "unseen.json").write_text(json.dumps({"seed": seed, "summary": lines, "cases": results}, indent=2,
                                                default=str))
    print(f"JSON: {OUT / 'unseen.json'}")


if __name__ == "__main__":
    main()
