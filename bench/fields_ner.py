"""The ``ner`` case of `bench.fields`: a Hugging Face BERT token classifier (6 layers, hidden 128, 7 BIO tags
over people, organisations and places, `bench.field_ner`) compressed by the engine (auto student, default
recipe; and a derived student of 2 layers) against a hand-written per-token KD script (a BERT of the
teacher's first and last layers with its embeddings and classifier, KL at T = 2 over the labelled tokens
plus cross-entropy on the tags, fp32).

Judged on the engine's own held-out split (the job's data split, the same tokenization): entity F1,
precision and recall (seqeval, CoNLL spans), token accuracy over the words, file size, p50 latency at
batch 1 and 64 (onnxruntime, 1 thread, interleaved), ratios to the teacher's fp32 ONNX.
"""

from __future__ import annotations

import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F

from bench.field_ner import TAGS, ner_problem
from bench.fields_vit import job_columns
from worker.compression.deliver import teacher_onnx
from worker.compression.io.datasets import load_for_teacher
from worker.compression.io.teachers import load_teacher
from worker.compression.spec import DataSpec

TEACHER = {"hidden_size": 128, "num_hidden_layers": 6, "num_attention_heads": 4, "intermediate_size": 512}
KEYS = ("input_ids", "attention_mask", "token_type_ids")


def plain_ner_kd(teacher: Any, inputs: dict[str, torch.Tensor], y: torch.Tensor, targets: torch.Tensor, *,
                 layers: list[int], epochs: int, out: Path) -> Path:
    """The hand-written peer: a BERT token classifier of the teacher's config keeping ``layers`` (copied with
    the embeddings and the classifier), AdamW 1e-3, batch 32, loss ``0.5 · T² KL(teacher ‖ student)`` at T = 2
    over the labelled tokens + ``0.5 · CE`` on the tags; exported fp32 with dynamic batch and length."""
    from transformers import BertForTokenClassification

    config = type(teacher.config).from_dict({**teacher.config.to_dict(), "num_hidden_layers": len(layers)})
    net = BertForTokenClassification(config)
    net.bert.embeddings.load_state_dict(teacher.bert.embeddings.state_dict())
    for i, t in enumerate(layers):
        net.bert.encoder.layer[i].load_state_dict(teacher.bert.encoder.layer[t].state_dict())
    net.classifier.load_state_dict(teacher.classifier.state_dict())
    opt = torch.optim.AdamW(net.parameters(), 1e-3)
    torch.manual_seed(0)
    for _ in range(epochs):
        net.train()
        perm = torch.randperm(len(y))
        for i in range(0, len(y), 32):
            idx = perm[i:i + 32]
            logits = net(**{k: v[idx] for k, v in inputs.items()}).logits
            mask = y[idx] != -100
            kd = F.kl_div(F.log_softmax(logits[mask] / 2, -1), F.softmax(targets[idx][mask] / 2, -1),
                          reduction="batchmean") * 4
            loss = 0.5 * kd + 0.5 * F.cross_entropy(logits[mask], y[idx][mask])
            opt.zero_grad()
            loss.backward()
            opt.step()

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    token_type_ids: torch.Tensor) -> torch.Tensor:
            return self.net(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits

    sample = tuple(inputs[k][:2] for k in KEYS)
    axes = {k: {0: "batch", 1: "sequence"} for k in KEYS} | {"logits": {0: "batch", 1: "sequence"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Logits().eval(), sample, str(out), input_names=list(KEYS), output_names=["logits"],
                          dynamic_axes=axes, opset_version=17, dynamo=False)
    return out


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _feeds(s: ort.InferenceSession, inputs: dict[str, np.ndarray], rows: slice) -> dict[str, np.ndarray]:
    return {i.name: inputs[i.name][rows] for i in s.get_inputs()}


def token_p50s(paths: dict[str, Path], inputs: dict[str, np.ndarray], batches: tuple[int, ...] = (1, 64),
               rounds: int = 5, repeats: int = 40) -> dict[str, dict[int, float]]:
    """Median latency (ms) per graph and batch of token inputs, graphs interleaved round by round."""
    sessions = {k: _session(p) for k, p in paths.items()}
    times: dict[str, dict[int, list[float]]] = {k: {b: [] for b in batches} for k in paths}
    for _ in range(rounds):
        for k, s in sessions.items():
            for b in batches:
                feed = _feeds(s, inputs, slice(0, b))
                s.run(None, feed)
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    s.run(None, feed)
                    times[k][b].append((time.perf_counter() - t0) * 1000)
    return {k: {b: statistics.median(v) for b, v in per.items()} for k, per in times.items()}


def scores(logits: np.ndarray, y: torch.Tensor, teacher_pred: torch.Tensor) -> dict[str, float]:
    """Entity F1 / precision / recall (seqeval) and token accuracy over the labelled words."""
    from seqeval.metrics import f1_score, precision_score, recall_score

    pred = torch.from_numpy(logits).argmax(-1)
    mask = y != -100
    truth = [[TAGS[t] for t in row[m].tolist()] for row, m in zip(y, mask, strict=True)]
    guess = [[TAGS[t] for t in row[m].tolist()] for row, m in zip(pred, mask, strict=True)]
    return {"entity_f1": f1_score(truth, guess, zero_division=0),
            "entity_precision": precision_score(truth, guess, zero_division=0),
            "entity_recall": recall_score(truth, guess, zero_division=0),
            "token_accuracy": (pred[mask] == y[mask]).double().mean().item(),
            "agreement": (pred[mask] == teacher_pred[mask]).double().mean().item()}


def ner_case(quick: bool, tmp: Path, *, engine_job: Any) -> list[dict[str, Any]]:
    """Rows for the table of `bench.fields` (its ``engine_job`` passed in)."""
    epochs = 10 if quick else 30
    made = ner_problem(tmp / "ner", sentences_n=500 if quick else 1000, steps=300 if quick else 600, **TEACHER)
    teacher = load_teacher(made["teacher"])
    train, evald, _ = load_for_teacher(made["data"], None, DataSpec(), teacher, "token_classification")

    jobs: dict[str, tuple[Path, dict[str, Any], float]] = {}
    for name, student in (("engine (auto)", None), ("engine derived 2 layers", {"kind": "derived", "num_layers": 2})):
        t0 = time.perf_counter()
        path, job = engine_job(made["teacher"], made["data"], {}, tmp / "ner" / name.split()[1], epochs, student)
        jobs[name] = (path, job, time.perf_counter() - t0)
    sample = {k: v[:8] for k, v in evald.inputs.items()}
    teacher_graph = teacher_onnx(teacher, made["teacher"], sample, tmp / "ner" / "t")

    t0 = time.perf_counter()
    n = teacher.module.config.num_hidden_layers
    plain = plain_ner_kd(teacher.module.backbone, train.inputs, train.y, teacher.predict(train.inputs),
                         layers=[0, n - 1], epochs=epochs, out=tmp / "ner" / "plain.onnx")
    plain_s = time.perf_counter() - t0

    graphs = {"teacher (fp32 ONNX)": teacher_graph, **{k: v[0] for k, v in jobs.items()}, "plain KD (2 layers)": plain}
    inputs = {k: v.numpy() for k, v in evald.inputs.items()}
    outputs = {k: np.concatenate([(s := _session(p)).run(None, _feeds(s, inputs, slice(i, i + 64)))[0]
                                  for i in range(0, len(evald), 64)]) for k, p in graphs.items()}
    teacher_pred = torch.from_numpy(outputs["teacher (fp32 ONNX)"]).argmax(-1)
    lat = token_p50s(graphs, inputs)
    rows = []
    for k, path in graphs.items():
        wall = jobs[k][2] if k in jobs else plain_s if k.startswith("plain") else None
        rows.append({"case": "ner", "model": k, **scores(outputs[k], evald.y, teacher_pred),
                     "size_bytes": path.stat().st_size, "p50_ms_b1": lat[k][1], "p50_ms_b64": lat[k][64],
                     "wall_s": wall, **job_columns(jobs[k][1] if k in jobs else None)})
    t = rows[0]
    for r in rows:
        r["size_ratio"] = t["size_bytes"] / r["size_bytes"]
        r["speedup_b1"] = t["p50_ms_b1"] / r["p50_ms_b1"]
        r["speedup_b64"] = t["p50_ms_b64"] / r["p50_ms_b64"]
        r["f1_vs_teacher"] = r["entity_f1"] / t["entity_f1"] if t["entity_f1"] else None
    return rows
