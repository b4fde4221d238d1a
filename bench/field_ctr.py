"""Click-through (CTR): the service's engine against a plain hand-written KD script on click logs drawn
from a known ground-truth model. Prints a table and writes bench/out/field_ctr.json.

The data (`click_rows`, offline, seeded): four categorical columns with Zipf-skewed frequencies — ``site``
(300 values), ``app`` (60), ``hour`` (24, uniform) and ``user`` (20,000: hashed into 2,048 buckets by the
spec's ``hash_above``) — and three dense features. A click is drawn with probability sigmoid(logit), the
logit a sum of per-value effects, a dense linear term, a site × hour low-rank interaction and a bias
giving a click rate of about 20 %. The teacher: a zoo ``ctr`` (embedding dim 16, MLP [128, 64], concat or
DLRM dot interaction) trained here for 3 epochs on cross-entropy to the clicks. The "ground truth p" row
scores the true click probabilities: the best AUC / log-loss any model can expect on these rows.

Compared on the same held-out split the engine uses (onnxruntime, 1 thread): the teacher's fp32 graph,
the engine's job (`compress`: auto student, its default recipe, the model it delivers) and a plain
script (the teacher's architecture at embedding dim 4 and half its MLP widths, Adam on KL at T = 2 to the
teacher's logits, exported fp32): AUC, log-loss, file size, p50 latency at batch 1 and at the eval batch.
Case ``onnx``: the same clicks with integer ids and a multi-input ONNX teacher (`ClickNet`: inputs ``dense``,
``site``, ``app``, ``hour``, ``user``; embedding 8, MLP [64]); its plain script is a zoo ctr at embedding 4,
MLP [32].

Usage: python bench/field_ctr.py [--interaction concat,dot,onnx] [--rows 30000] [--quick]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.fields import engine_job, export, fmt, p50s, run_onnx
from worker.compression.deliver import teacher_onnx
from worker.compression.io.datasets import (
    load_dataset,
    load_for_teacher,
    train_eval_split,
)
from worker.compression.io.teachers import load_teacher, save_zoo_model
from worker.compression.measure.metrics import click_metrics
from worker.compression.spec import DataSpec
from worker.compression.students import zoo

COLUMNS = {"site": (300, 1.2), "app": (60, 1.1), "hour": (24, 0.0), "user": (20_000, 1.05)}
"""Categorical column → (cardinality, Zipf exponent; 0 is uniform)."""
DENSE = ("price", "age_days", "position")
DATA_SPEC = {"task": "ctr", "label_column": "click", "hash_above": 1000, "hash_buckets": 2048}
EVAL_BATCH = 64


def _zipf(rng: np.random.Generator, n: int, card: int, a: float) -> np.ndarray:
    p = 1.0 / np.arange(1, card + 1) ** a
    return rng.choice(card, size=n, p=p / p.sum())


def click_rows(n: int, seed: int = 0) -> tuple[list[dict[str, Any]], np.ndarray]:
    """``n`` click-log rows (module doc) and each row's true click probability; the ground truth is the same
    for every ``seed``."""
    truth = np.random.default_rng(1234)
    effects = {c: truth.normal(0, 0.3 if c == "user" else 0.8, card) for c, (card, _) in COLUMNS.items()}
    u, v = truth.normal(0, 0.7, (COLUMNS["site"][0], 2)), truth.normal(0, 0.7, (24, 2))
    w_dense = np.array([-0.8, 0.4, -0.6])
    rng = np.random.default_rng(seed)
    ids = {c: _zipf(rng, n, card, a) for c, (card, a) in COLUMNS.items()}
    dense = rng.normal(0, 1, (n, len(DENSE)))
    logit = -1.7 + sum(effects[c][ids[c]] for c in COLUMNS) + dense @ w_dense
    logit += (u[ids["site"]] * v[ids["hour"]]).sum(1) + 0.5 * np.tanh(dense[:, 0] * dense[:, 2])
    truth_p = 1 / (1 + np.exp(-logit))
    click = rng.random(n) < truth_p
    return [{"site": f"s{ids['site'][i]}", "price": round(float(dense[i, 0]), 4), "app": f"app_{ids['app'][i]}",
             "hour": f"h{ids['hour'][i]:02d}", "age_days": round(float(dense[i, 1]), 4), "user": f"u{ids['user'][i]}",
             "position": round(float(dense[i, 2]), 4), "click": int(click[i])} for i in range(n)], truth_p


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def train_ctr(cfg: dict[str, Any], x: torch.Tensor, y: torch.Tensor, *, epochs: int, seed: int = 0,
              targets: torch.Tensor | None = None, lr: float = 3e-3) -> torch.nn.Module:
    """A zoo ``ctr`` trained with Adam (batch 256): on cross-entropy to ``y``, or on KL at T = 2 to the
    logits ``targets`` (plain KD)."""
    torch.manual_seed(seed)
    net = zoo.build(cfg)
    opt = torch.optim.Adam(net.parameters(), lr)
    for _ in range(epochs):
        net.train()
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 256):
            idx = perm[i:i + 256]
            out = net(x[idx])
            if targets is None:
                loss = F.cross_entropy(out, y[idx])
            else:
                loss = F.kl_div(F.log_softmax(out / 2, -1), F.softmax(targets[idx] / 2, -1), reduction="batchmean") * 4
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def ctr_problem(folder: Path, *, rows: int = 30_000, interaction: str = "concat", epochs: int = 4,
                embedding_dim: int = 16, hidden: tuple[int, ...] = (128, 64), seed: int = 0) -> dict[str, Any]:
    """``clicks.csv`` and a zoo ``ctr`` teacher folder trained on its training split (the engine's split)."""
    table, truth_p = click_rows(rows, seed)
    data_path = write_csv(folder / "clicks.csv", table)
    spec = DataSpec(**DATA_SPEC)
    data = load_dataset(data_path, spec)
    train, evald = train_eval_split(data, None, spec)
    cfg = {"architecture": "ctr", "task": "classification", "output_dim": 2, "input_dim": train.inputs["x"].shape[1],
           "categorical": data.meta["categorical"], "embedding_dim": embedding_dim, "hidden": list(hidden),
           "interaction": interaction}
    net = train_ctr(cfg, train.inputs["x"], train.y, epochs=epochs, seed=seed)
    teacher = save_zoo_model(net, cfg, folder / "teacher")
    held = torch.randperm(rows, generator=torch.Generator().manual_seed(spec.split_seed))  # the split's rows
    truth = torch.from_numpy(truth_p[held[: len(evald)].numpy()])
    return {"teacher": teacher, "data": data_path, "spec": dict(DATA_SPEC), "train": train, "eval": evald,
            "config": cfg, "truth_logit": torch.log(truth / (1 - truth))}


class ClickNet(torch.nn.Module):
    """A click model with an input per id column beside the dense features (as teams export them)."""

    def __init__(self, sizes: list[int], dense: int, dim: int = 8, hidden: int = 64) -> None:
        super().__init__()
        self.tables = torch.nn.ModuleList(torch.nn.Embedding(n, dim) for n in sizes)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dense + dim * len(sizes), hidden), torch.nn.ReLU(),
                                       torch.nn.Linear(hidden, 2))

    def forward(self, dense: torch.Tensor, site: torch.Tensor, app: torch.Tensor, hour: torch.Tensor,
                user: torch.Tensor) -> torch.Tensor:
        vectors = [t(i) for t, i in zip(self.tables, (site, app, hour, user))]
        return self.mlp(torch.cat([dense, *vectors], 1))


def onnx_click_problem(folder: Path, made: dict[str, Any], *, epochs: int = 3) -> dict[str, Any]:
    """``made``'s clicks with the ids written as integers (``ids.csv``) and a `ClickNet` trained on its training
    split, exported as ``clicks.onnx`` with inputs ``dense`` (N, 3) float and ``site``, ``app``, ``hour``, ``user``
    (N,) int64: a multi-input ONNX teacher (`worker.compression.io.onnx_inputs`)."""
    folder.mkdir(parents=True, exist_ok=True)
    full = load_dataset(made["data"], DataSpec(**made["spec"]))
    columns = full.meta["columns"]
    table = {c: full.inputs["x"][:, i].numpy() for i, c in enumerate(columns)}
    ids, dense = ["site", "app", "hour", "user"], [c for c in columns if c not in COLUMNS]
    rows = [{**{c: int(table[c][r]) for c in ids}, **{c: float(table[c][r]) for c in dense},
             "click": int(full.y[r])} for r in range(len(full))]
    data_path = write_csv(folder / "ids.csv", [{k: row[k] for k in [*dense[:1], *ids, *dense[1:], "click"]}
                                               for row in rows])
    x, y = made["train"].inputs["x"], made["train"].y
    index = {c: columns.index(c) for c in columns}
    sizes = [int(v["size"]) for v in made["config"]["categorical"]]
    torch.manual_seed(0)
    net = ClickNet(sizes, len(dense))
    opt = torch.optim.Adam(net.parameters(), 3e-3)

    def feeds(rows_x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (rows_x[:, [index[c] for c in dense]], *(rows_x[:, index[c]].long() for c in ids))

    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 256):
            idx = perm[i:i + 256]
            loss = F.cross_entropy(net(*feeds(x[idx])), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    path = folder / "clicks.onnx"
    names = ["dense", *ids]
    torch.onnx.export(net.eval(), feeds(x[:2]), str(path), input_names=names, output_names=["logits"],
                      dynamic_axes={n: {0: "batch"} for n in [*names, "logits"]}, opset_version=17, dynamo=False)
    return {"teacher": path, "data": data_path, "spec": {"task": "ctr", "label_column": "click"}}


def case(interaction: str, rows: int, quick: bool, tmp: Path, hidden: tuple[int, ...] = (128, 64),
         embedding_dim: int = 16) -> list[dict[str, Any]]:
    epochs = 3 if quick else 8
    made = ctr_problem(tmp / interaction, rows=rows, interaction="concat" if interaction == "onnx" else interaction,
                       epochs=3, hidden=hidden, embedding_dim=embedding_dim)
    plain_cfg = {**made["config"], "embedding_dim": 4, "hidden": [max(4, h // 2) for h in made["config"]["hidden"]]}
    if interaction == "onnx":  # the same clicks, ids as integers, a multi-input ONNX teacher (ClickNet)
        made = {**made, **onnx_click_problem(tmp / "onnx-teacher", made, epochs=3)}
        ids = [{"index": j, "size": int(v["size"])} for j, v in enumerate(made["config"]["categorical"])]
        plain_cfg = {**plain_cfg, "categorical": ids, "hidden": [32]}
    teacher = load_teacher(made["teacher"])
    train, evald, _ = load_for_teacher(made["data"], None, DataSpec(**made["spec"]), teacher, "classification")

    t0 = time.perf_counter()
    delivered, report = engine_job(made["teacher"], made["data"], made["spec"], tmp / interaction / "engine", epochs)
    engine_s = time.perf_counter() - t0
    teacher_graph = teacher_onnx(teacher, made["teacher"], {"x": evald.inputs["x"][:8]}, tmp / interaction / "tw")

    t0 = time.perf_counter()
    plain_net = train_ctr(plain_cfg, train.inputs["x"], train.y, epochs=epochs, targets=teacher.predict(train.inputs))
    plain = export(plain_net, train.inputs["x"][:1], tmp / interaction / "plain.onnx")
    plain_s = time.perf_counter() - t0

    x_eval = evald.inputs["x"].numpy()
    graphs = {"teacher": teacher_graph, "engine": delivered, "plain KD": plain}
    lat = p50s(graphs, x_eval, batches=(1, EVAL_BATCH))
    out = []
    for k, path in graphs.items():
        metrics = click_metrics(torch.from_numpy(run_onnx(path, x_eval)), evald.y)
        out.append({"case": f"ctr-{interaction}", "model": k, **metrics, "size_bytes": path.stat().st_size,
                    "p50_ms_b1": lat[k][1], f"p50_ms_b{EVAL_BATCH}": lat[k][EVAL_BATCH],
                    "wall_s": {"engine": engine_s, "plain KD": plain_s}.get(k),
                    "delivered": report["summary"].get("delivered", {}).get("name") if k == "engine" else None,
                    "verdict": report["summary"]["verdict"] if k == "engine" else None,
                    "reasons": ",".join(x["code"] for x in report["delivery"]["reasons"]) if k == "engine" else None})
    truth = click_metrics(made["truth_logit"][:, None], evald.y)
    out.append({"case": f"ctr-{interaction}", "model": "ground truth p", **truth})
    t = out[0]
    for r in out:
        if "size_bytes" in r:
            r["size_ratio"] = t["size_bytes"] / r["size_bytes"]
            r[f"speedup_b{EVAL_BATCH}"] = t[f"p50_ms_b{EVAL_BATCH}"] / r[f"p50_ms_b{EVAL_BATCH}"]
        r["auc_drop"] = t["auc"] - r["auc"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--interaction", default="concat,dot,onnx")
    parser.add_argument("--rows", type=int, default=30_000)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--hidden", default="128,64", help="the teacher's MLP widths (production: 1024,512,256)")
    parser.add_argument("--embedding-dim", type=int, default=16, help="the teacher's embedding width")
    args = parser.parse_args()
    hidden = tuple(int(h) for h in args.hidden.split(","))
    torch.set_num_threads(1)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for interaction in args.interaction.split(","):
            rows += case(interaction, args.rows, args.quick, Path(tmp), hidden, args.embedding_dim)
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    (out / "field_ctr.json").write_text(json.dumps(rows, indent=2, default=str))
    cols = ["case", "model", "auc", "log_loss", "auc_drop", "size_bytes", "p50_ms_b1", f"p50_ms_b{EVAL_BATCH}",
            "size_ratio", f"speedup_b{EVAL_BATCH}", "wall_s", "delivered", "verdict", "reasons"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |")


if __name__ == "__main__":
    main()
