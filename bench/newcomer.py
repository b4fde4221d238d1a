"""Newcomer: small tasks sent the way a README reader sends them, judged for silent failures.

Twelve tasks from data installed packages ship (scikit-learn's bundled sets) or that this file
generates (coloured shapes as PNG files, 1-D signals, templated sentences), each with a teacher made
the way its users make them: torch's default ONNX export (a graph plus a ``.data`` file, zipped as
``onnx_zip``), the legacy exporter's single file, the zoo format, a transformers folder; string
labels; raw pixels in [0, 255] files; features not standardised. Each is uploaded over HTTP and
submitted with only the two ids (every spec field at its default: what a reader sends first).

Printed per task: state, verdict and reason codes, the teacher's and the delivered model's metric,
how much smaller and faster the delivered model is than the teacher's fp32 graph at batch 64, and
the outcome:

* ``delivered``: within 1 point (classification) or 10 % of the MSE (regression) of the teacher,
  smaller and faster than it, and the verdict is not ``do_not_ship``;
* ``named``: the job refused to ship (``do_not_ship``, or FAILED) and said why, or its metric is
  further than that from the teacher's and a ``metric_drop_uncertain`` caution says so (a drop the
  eval split is too small to confirm);
* ``SILENT``: anything else — a job that ships a worse, larger or slower model. Target: none.

Usage: python bench/newcomer.py [--stack embedded|postgres] [--only cancer-zoo,digits-png,...]
Writes bench/out/newcomer.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.service import OUT, Service
from tests.service import results_assets as ra
from worker.compression.io.teachers import save_zoo_model
from worker.compression.students import zoo

BATCH = 64
Task = dict[str, Any]
"""``teacher`` (path, upload fields), ``data`` (path, upload fields), ``expect`` (what the reader expects)."""


def _zip_folder(folder: Path, archive: Path) -> Path:
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                zf.write(f, f.relative_to(folder).as_posix())
    return archive


def cancer(root: Path) -> dict[str, Task]:
    made = ra.breast_cancer(root / "cancer")
    data = (made["data"], {"label_column": "label"})
    return {"cancer-zoo": {"teacher": (made["zoo"], {}), "data": data},
            "cancer-onnx-unnamed": {"teacher": (made["onnx"], {}), "data": data}}  # fmt: skip


def digits_png(root: Path) -> dict[str, Task]:
    made = ra.digit_pngs(root / "digits")
    return {"digits-png": {"teacher": (made["teacher"], {}), "data": (made["data"], {})}}


def diabetes(root: Path) -> dict[str, Task]:
    made = ra.regression(root / "diabetes")
    return {"diabetes-regression": {"teacher": (made["teacher"], {}), "data": (made["data"], {})}}


def useless(root: Path) -> dict[str, Task]:
    made = ra.three_class(root / "useless", useless=True)
    return {"useless-teacher": {"teacher": (made["teacher"], {}), "data": (made["data"], {})}}


class Scaled(nn.Module):
    """A teacher with its scaler inside, as a team that exports its pipeline writes it."""

    def __init__(self, mean: np.ndarray, std: np.ndarray, net: nn.Module) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))
        self.net = net

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net((features - self.mean) / self.std)


def wine(root: Path) -> dict[str, Task]:
    """Raw (unstandardised) wine features in a CSV, integer labels; the teacher standardises inside
    and is exported with torch's default exporter (graph + data file)."""
    from sklearn.datasets import load_wine

    folder = root / "wine"
    folder.mkdir(parents=True)
    d = load_wine()
    x = torch.tensor(d.data, dtype=torch.float32)
    net = nn.Sequential(nn.Linear(13, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 3))
    model = Scaled(d.data.mean(0), d.data.std(0), net)
    ra.train(model, x, torch.tensor(d.target), epochs=60, lr=3e-3)
    teacher = ra.default_onnx_export(model, torch.zeros(2, 13), folder / "teacher", input_name="features")
    cols = list(d.feature_names)
    rows = [",".join(["cultivar", *cols])] + [",".join([str(t), *map(str, r)]) for r, t in zip(d.data, d.target)]
    (folder / "wine.csv").write_text("\n".join(rows) + "\n")
    return {"wine-raw-csv": {"teacher": (teacher, {}), "data": (folder / "wine.csv", {"label_column": "cultivar"})}}


def iris(root: Path) -> dict[str, Task]:
    """String species names in a CSV, the class order given at upload (the README's advice)."""
    from sklearn.datasets import load_iris

    folder = root / "iris"
    folder.mkdir(parents=True)
    d = load_iris()
    net = nn.Sequential(nn.Linear(4, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3))
    ra.train(net, torch.tensor(d.data, dtype=torch.float32), torch.tensor(d.target), epochs=150, lr=3e-3)
    teacher = ra.legacy_onnx(net, torch.zeros(1, 4), folder / "iris.onnx")
    names = list(d.target_names)
    rows = ["sl,sw,pl,pw,species"] + [",".join([*map(str, r), names[t]]) for r, t in zip(d.data, d.target)]
    (folder / "iris.csv").write_text("\n".join(rows) + "\n")
    data = (folder / "iris.csv", {"label_column": "species", "classes": json.dumps(names)})
    return {"iris-string-labels": {"teacher": (teacher, {}), "data": data}}


def wide_mlp(root: Path) -> dict[str, Task]:
    """40 features, 5 classes, a wide 512-512 teacher exported by torch's default exporter."""
    from sklearn.datasets import make_classification

    folder = root / "wide"
    folder.mkdir(parents=True)
    x, y = make_classification(3000, 40, n_informative=20, n_classes=5, class_sep=1.5, random_state=3)
    net = nn.Sequential(nn.Linear(40, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 5))
    ra.train(net, torch.tensor(x, dtype=torch.float32), torch.tensor(y), epochs=10, lr=1e-3)
    teacher = ra.default_onnx_export(net, torch.zeros(2, 40), folder / "teacher")
    np.savez(folder / "data.npz", x=x.astype(np.float32), y=y)
    return {"wide-mlp-npz": {"teacher": (teacher, {}), "data": (folder / "data.npz", {})}}


class Shapes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(64, 3))  # fmt: skip

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.body(pixel_values)


def shapes(root: Path, n: int = 600) -> dict[str, Task]:
    """Coloured circles, squares and triangles on noisy backgrounds, 32×32 RGB PNG files in class
    folders (raw 0–255 pixels in the files); the teacher was trained on pixels in [0, 1]."""
    folder = root / "shapes"
    rng = np.random.default_rng(5)
    kinds = ["circle", "square", "triangle"]
    images, labels = [], []
    for i in range(n):
        k = i % 3
        img = Image.fromarray(rng.integers(0, 60, (32, 32, 3), dtype=np.uint8))
        draw = ImageDraw.Draw(img)
        c = tuple(int(v) for v in rng.integers(120, 256, 3))
        s, cx, cy = int(rng.integers(7, 12)), int(rng.integers(12, 20)), int(rng.integers(12, 20))
        if k == 0:
            draw.ellipse([cx - s, cy - s, cx + s, cy + s], fill=c)
        elif k == 1:
            draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=c)
        else:
            draw.polygon([(cx, cy - s), (cx - s, cy + s), (cx + s, cy + s)], fill=c)
        path = folder / "png" / kinds[k] / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path)
        images.append(np.asarray(img, dtype=np.float32) / 255.0)
        labels.append(k)
    x = torch.tensor(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    teacher = ra.train(Shapes(), x, torch.tensor(labels), epochs=10, lr=3e-3)
    teacher_zip = ra.default_onnx_export(teacher, torch.zeros(2, 3, 32, 32), folder / "teacher",
                                         input_name="pixel_values")  # fmt: skip
    data = _zip_folder(folder / "png", folder / "shapes.zip")
    return {"shapes-rgb-png": {"teacher": (teacher_zip, {}), "data": (data, {})}}


def signals(root: Path, n: int = 1500) -> dict[str, Task]:
    """Sine, square and sawtooth waves at random frequencies and phases with noise, [N, 1, 128];
    a zoo 1-D CNN teacher."""
    folder = root / "signals"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(6)
    t = np.linspace(0, 1, 128, dtype=np.float32)
    y = rng.integers(0, 3, n)
    f = rng.uniform(3, 9, n)[:, None]
    ph = rng.uniform(0, 2 * np.pi, n)[:, None]
    phase = 2 * np.pi * f * t + ph
    waves = [np.sin(phase), np.sign(np.sin(phase)), 2 * ((phase / (2 * np.pi)) % 1) - 1]
    x = np.choose(y[:, None], waves) + rng.normal(0, 0.3, (n, 128))
    x = x[:, None, :].astype(np.float32)
    cfg = {"architecture": "cnn1d", "task": "classification", "in_channels": 1, "input_length": 128,
           "channels": [32, 64, 64], "kernel_size": 5, "hidden": 64, "output_dim": 3}  # fmt: skip
    model = zoo.build(cfg)
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    xt, yt = torch.tensor(x), torch.tensor(y)
    for _ in range(10):
        for i in range(0, n, 64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x=xt[i:i + 64]), yt[i:i + 64]).backward()
            opt.step()
    src = save_zoo_model(model.eval(), cfg, folder / "teacher")
    np.savez(folder / "data.npz", x=x, y=y)
    return {"signals-cnn1d": {"teacher": (_zip_folder(src, folder / "teacher.zip"), {}),
                              "data": (folder / "data.npz", {})}}  # fmt: skip


def friedman(root: Path) -> dict[str, Task]:
    """A nonlinear regression (Friedman #1, targets about 14 ± 5) with a zoo MLP teacher."""
    from sklearn.datasets import make_friedman1

    folder = root / "friedman"
    folder.mkdir(parents=True)
    x, y = make_friedman1(3000, 10, noise=0.5, random_state=7)
    cfg = {"architecture": "mlp", "task": "regression", "input_dim": 10, "hidden": [256, 256], "output_dim": 1}
    model = zoo.build(cfg)
    xt, yt = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(30):
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            nn.functional.mse_loss(model(x=xt[idx]).squeeze(-1), yt[idx]).backward()
            opt.step()
    src = save_zoo_model(model.eval(), cfg, folder / "teacher")
    np.savez(folder / "data.npz", x=x.astype(np.float32), y=y.astype(np.float32))
    return {"friedman-regression": {"teacher": (_zip_folder(src, folder / "teacher.zip"), {}),
                                    "data": (folder / "data.npz", {})}}  # fmt: skip


TOPICS = {
    "sports": ["match", "goal", "team", "coach", "season", "league", "player", "score", "final", "stadium"],
    "weather": ["rain", "storm", "sunny", "cloud", "wind", "forecast", "snow", "cold", "humid", "temperature"],
    "cooking": ["recipe", "oven", "flour", "sauce", "garlic", "bake", "onion", "salt", "pan", "dough"],
}
FILLER = ["the", "a", "today", "we", "saw", "really", "this", "very", "and", "about", "new", "after", "some", "was"]


def text(root: Path, n: int = 900) -> dict[str, Task]:
    """Templated sentences about three topics (JSON Lines, string labels) and a small BERT teacher
    trained here with its own WordPiece vocabulary, saved as a transformers folder."""
    from tokenizers import BertWordPieceTokenizer
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        BertTokenizerFast,
    )

    folder = root / "text"
    (folder / "teacher").mkdir(parents=True)
    rng = np.random.default_rng(8)
    names = list(TOPICS)
    rows = []
    for i in range(n):
        label = names[i % 3]
        words = [*rng.choice(TOPICS[label], 3), *rng.choice(FILLER, 6)]
        if rng.random() < 0.3:  # a distractor word from another topic
            words.append(rng.choice(TOPICS[names[(i + 1) % 3]]))
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted({w for ws in TOPICS.values() for w in ws} | set(FILLER))]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # (transformers 5's BertTokenizerFast(vocab_file=...) maps every word to [UNK]: build it with tokenizers)
    tok = BertTokenizerFast(tokenizer_object=BertWordPieceTokenizer(str(folder / "vocab.txt"), lowercase=True)._tokenizer)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=512, max_position_embeddings=64, num_labels=3,
                     id2label=dict(enumerate(names)), label2id={k: i for i, k in enumerate(names)})  # fmt: skip
    torch.manual_seed(0)
    model = BertForSequenceClassification(cfg)
    enc = tok([r["text"] for r in rows], padding="max_length", truncation=True, max_length=24, return_tensors="pt")
    y = torch.tensor([names.index(r["label"]) for r in rows])
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    model.train()
    for _ in range(3):
        perm = torch.randperm(n)
        for i in range(0, n, 32):
            idx = perm[i:i + 32]
            out = model(input_ids=enc["input_ids"][idx], attention_mask=enc["attention_mask"][idx], labels=y[idx])
            opt.zero_grad()
            out.loss.backward()
            opt.step()
    model.eval()
    model.save_pretrained(folder / "teacher")
    tok.save_pretrained(folder / "teacher")
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"text-bert-jsonl": {"teacher": (_zip_folder(folder / "teacher", folder / "teacher.zip"), {}),
                                "data": (folder / "data.jsonl", {"label_column": "label", "max_length": "32"})}}


MAKERS: list[Callable[[Path], dict[str, Task]]] = [cancer, digits_png, diabetes, useless, wine, iris, wide_mlp,
                                                   shapes, signals, friedman, text]  # fmt: skip


def upload(api: httpx.Client, kind: str, path: Path, fields: dict[str, str]) -> dict[str, Any]:
    with open(path, "rb") as f:
        r = api.post(f"/v1/{kind}", files={"file": (path.name, f)}, data=fields)
    if r.status_code != 201:
        return {"state": "refused", "problem": r.json()}
    ident = r.json()["id"]
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        body = api.get(f"/v1/{kind}/{ident}").json()
        if body["state"] != "validating":
            return body
        time.sleep(0.3)
    return {"state": "timeout", "id": ident}


def p50(row: dict[str, Any], batch: int) -> float | None:
    for b in (row.get("latency") or {}).get("batches", []):
        if int(b["batch"]) == batch:
            return float(b["p50_ms"])
    return None


def judge(job: dict[str, Any], rep: dict[str, Any]) -> dict[str, Any]:
    """The task's outcome from the job document and its metrics (see the module docstring)."""
    out: dict[str, Any] = {"state": job["state"]}
    if job["state"] != "SUCCEEDED":
        err = job.get("error") or {}
        out.update(verdict="-", reasons=[err.get("code") or "?"], why=err.get("detail", ""))
        out["outcome"] = "named" if err.get("code") else "SILENT"
        return out
    summary = rep.get("summary") or {}
    rows = {r["name"]: r for r in rep.get("models", [])}
    metric = rep.get("primary_metric") or summary.get("metric") or "accuracy"
    teacher = next((r for n, r in rows.items() if n.startswith("teacher") and "int8" not in n), None)
    chosen = rows.get((summary.get("delivered") or {}).get("name", ""))
    out.update(verdict=summary.get("verdict"), reasons=[r["code"] for r in summary.get("reasons", [])],
               metric=metric, delivered=(summary.get("delivered") or {}).get("name"))  # fmt: skip
    if teacher is None or chosen is None:
        out["outcome"] = "SILENT" if out["verdict"] != "do_not_ship" else "named"
        return out
    tv, cv = teacher["metric"].get(metric), chosen["metric"].get(metric)
    out.update(teacher_metric=tv, delivered_metric=cv,
               smaller=teacher["size_bytes"] / max(chosen["size_bytes"], 1),
               faster=(p50(teacher, BATCH) or 0) / max(p50(chosen, BATCH) or 1e-9, 1e-9))  # fmt: skip
    regression = metric in ("mse", "mae")
    close = (cv <= tv * 1.10) if regression else (cv >= tv - 0.01)
    good = close and out["smaller"] > 1 and out["faster"] > 1
    if out["verdict"] == "do_not_ship" or (not close and "metric_drop_uncertain" in out["reasons"]):
        out["outcome"] = "named"  # refused, or shipped with a caution that names the drop and its noise
    else:
        out["outcome"] = "delivered" if good else "SILENT"
    return out


def run_task(api: httpx.Client, name: str, task: Task) -> dict[str, Any]:
    started = time.monotonic()
    teacher = upload(api, "models", *task["teacher"])
    data = upload(api, "datasets", *task["data"])
    for what, body in (("teacher", teacher), ("dataset", data)):
        if body["state"] != "ready":
            problem = body.get("problem") or body.get("error") or {}
            reason = "; ".join(f"{e.get('loc')}: {e.get('msg')}" for e in problem.get("errors") or []) or \
                problem.get("detail") or body["state"]
            return {"task": name, "state": f"{what} {body['state']}", "verdict": "-", "reasons": [str(reason)[:80]],
                    "outcome": "named" if body["state"] in ("invalid", "refused") else "SILENT",
                    "wall_s": time.monotonic() - started}  # fmt: skip
    r = api.post("/v1/jobs", json={"teacher_model_id": teacher["id"], "dataset_id": data["id"], "name": name})
    if r.status_code != 202:
        return {"task": name, "state": f"refused {r.status_code}", "verdict": "-",
                "reasons": [r.json().get("detail", "")[:80]], "outcome": "named", "wall_s": time.monotonic() - started}
    job_id = r.json()["id"]
    deadline = time.monotonic() + 1200
    while time.monotonic() < deadline:
        job = api.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in ("SUCCEEDED", "FAILED", "CANCELLED"):
            break
        time.sleep(1)
    rep = api.get(f"/v1/jobs/{job_id}/metrics").json() if job["state"] == "SUCCEEDED" else {}
    return {"task": name, **judge(job, rep), "wall_s": time.monotonic() - started}


def fmt(v: Any, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stack", choices=["embedded", "postgres"], default="embedded")
    parser.add_argument("--only", default="", help="comma-separated task names")
    args = parser.parse_args()
    only = {t for t in args.only.split(",") if t}
    results = []
    with tempfile.TemporaryDirectory(prefix="kdq-newcomer-") as tmp:
        root = Path(tmp)
        tasks: dict[str, Task] = {}
        for make in MAKERS:
            if only and not any(t.startswith(make.__name__.split("_")[0]) for t in only):
                continue  # (a task's name starts with its maker's)
            tasks.update(make(root / make.__name__))
        tasks = {k: v for k, v in tasks.items() if not only or k in only}
        svc = Service(args.stack, root / "svc")
        try:
            with httpx.Client(base_url=svc.url, headers=svc.headers, timeout=120) as api:
                for name, task in tasks.items():
                    res = run_task(api, name, task)
                    results.append(res)
                    print(json.dumps(res), flush=True)
        finally:
            svc.stop()
    print(f"\n{'task':22} {'state':10} {'verdict':17} {'metric':8} {'teacher':>8} {'deliv.':>8} {'smaller':>8} "
          f"{'faster@64':>9} {'wall s':>7}  outcome  reasons")  # fmt: skip
    for r in results:
        print(f"{r['task']:22} {r['state'][:10]:10} {str(r.get('verdict'))[:17]:17} {str(r.get('metric', '-'))[:8]:8} "
              f"{fmt(r.get('teacher_metric')):>8} {fmt(r.get('delivered_metric')):>8} {fmt(r.get('smaller'), '.1f'):>8} "
              f"{fmt(r.get('faster'), '.1f'):>9} {r['wall_s']:7.0f}  {r['outcome']:8} {','.join(r.get('reasons', []))}")
    silent = [r["task"] for r in results if r["outcome"] == "SILENT"]
    counts = {k: sum(r["outcome"] == k for r in results) for k in ("delivered", "named", "SILENT")}
    print(f"\n{len(results)} tasks: {counts['delivered']} delivered, {counts['named']} refused with a named cause, "
          f"{counts['SILENT']} silent failures (target 0){': ' + ', '.join(silent) if silent else ''}")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "newcomer.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
