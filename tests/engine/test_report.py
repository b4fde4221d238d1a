"""report.json / report.html hold the numbers they claim; the manifest's hashes are right."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import torch

from worker.compression.measure.evaluate import ModelRow, compare_models
from worker.compression.measure.report import sha256_file, to_jsonable, write_manifest, write_report
from worker.compression.spec import CompressSpec


def _lat(p50: dict[int, float]) -> dict:
    return {
        "runtime": "onnxruntime",
        "threads": 1,
        "batches": [
            {
                "batch": b,
                "p50_ms": v,
                "p95_ms": v * 1.5,
                "mean_ms": v * 1.1,
                "throughput_per_s": b * 1000 / (v * 1.1),
            }
            for b, v in p50.items()
        ],
    }


def _report() -> dict:
    models = compare_models(
        [
            ModelRow(
                "teacher",
                {"accuracy": np.float32(0.9512)},
                4_321_000,
                1_000_000,
                _lat({1: 8.0, 64: 90.0}),
                None,
                "onnx fp32",
            ),
            ModelRow(
                "student",
                {"accuracy": 0.9387},
                1_050_000,
                250_000,
                _lat({1: 2.5, 64: 20.0}),
                "teacher",
                "onnx fp32",
            ),
            ModelRow(
                "int8",
                {"accuracy": 0.9301},
                1_200_000,
                250_000,
                _lat({1: 2.0, 64: 24.0}),
                "student",
                "onnx int8",
            ),
        ]
    )
    history = [{"step": s, "epoch": s / 10, "loss": 2.0 / s, "lr": 1e-3} for s in range(1, 21)]
    history[9]["metric"], history[19]["metric"] = 0.8, 0.93
    return {
        "title": "Compression report: classification",
        "task": "classification",
        "primary_metric": "accuracy",
        "teacher": {"kind": "zoo", "num_parameters": np.int64(1_000_000)},
        "spec": CompressSpec().model_dump(mode="json"),
        "models": models,
        "curves": {"student": history, "baseline": {"step": [1, 10, 20], "loss": [2.2, 0.5, 0.3]}},
        "per_class": [{"class": "<script>alert(1)</script>", "support": 3, "f1": 0.5}],
        "sensitivity": [
            {"node": "/layers.0/Gemm", "op_type": "Gemm", "metric_when_fp32": 0.9412, "cost": 0.0111}
        ],
        "disagreements": [{"index": 7, "kl": torch.tensor(1.25), "text": "a <b>bold</b> & odd text"}],
        "quantization": {"method": "static_int8", "sensitivity": "ignored here"},
        "distillation": {"best_step": 20, "history": "not rendered"},
        "teacher_cache": {"teacher_passes_saved": 19, "seconds_saved": 12.5},
        "warnings": ["the target was not reached"],
        "timings": {"distill": 12.25},
    }


def test_report_json_round_trips_and_html_holds_its_numbers(tmp_path: Path) -> None:
    report = _report()
    json_path, html_path = write_report(tmp_path, report)
    data = json.loads(json_path.read_text())
    assert data == to_jsonable(report)
    assert data["models"][0]["metric"]["accuracy"] == pytest.approx(0.9512)
    assert data["disagreements"][0]["kl"] == 1.25 and data["teacher"]["num_parameters"] == 1_000_000

    page = html_path.read_text()
    for row in data["models"]:  # every number the table shows, recomputed from report.json
        assert f"{row['metric']['accuracy']:.4f}" in page
        assert f"{row['size_bytes']:,} B" in page
        for b in row["latency"]["batches"]:
            assert f"{b['p50_ms']:.3f}" in page and f"{b['p95_ms']:.3f}" in page
            assert f"{b['throughput_per_s']:,.1f}" in page
    teacher, student, int8 = data["models"]
    speedup = teacher["latency"]["batches"][0]["p50_ms"] / student["latency"]["batches"][0]["p50_ms"]
    assert f"×{speedup:.2f}" in page  # 8.0 / 2.5 = ×3.20
    assert f"{student['size_bytes'] / teacher['size_bytes']:.4f}" in page
    for item in ("0.9412", "0.0111", "12.2500", "1.2500", "the target was not reached"):
        assert item in page

    # flags: highlighted and listed, never hidden
    assert [f["flag"] for f in int8["flags"]] == ["not_smaller", "not_faster"]
    assert page.count('class="flag"') >= 3
    assert "int8 is not smaller than student: 1,200,000 B vs 1,050,000 B" in page

    # user strings escaped; nothing loaded from outside the file
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; odd" in page
    assert not re.search(r"<script|<link|src=\"http|url\(", page)

    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 2  # metric vs size / latency, training curves
    assert all(base64.b64decode(img).startswith(b"\x89PNG\r\n\x1a\n") for img in images)


def test_partial_report_renders(tmp_path: Path) -> None:
    report = {"task": "regression", "sensitivity": [{"node": "n1", "cost": 0.25}], "warnings": []}
    json_path, html_path = write_report(tmp_path, report)
    assert json.loads(json_path.read_text()) == report
    page = html_path.read_text()
    assert "Layer sensitivity" in page and "0.2500" in page and "regression" in page
    assert "data:image/png" not in page and "Warnings" not in page
    write_report(tmp_path / "empty", {})  # every section optional


def test_to_jsonable_converts_array_types_and_refuses_objects() -> None:
    value = {
        "a": np.arange(3),
        "b": torch.tensor([1.5]),
        "c": float("nan"),
        "d": Path("/x/y"),
        3: (np.int8(4),),
    }
    assert to_jsonable(value) == {"a": [0, 1, 2], "b": [1.5], "c": None, "d": "/x/y", "3": [4]}
    with pytest.raises(TypeError, match=r"report\.bad"):
        to_jsonable({"bad": object()})


def test_manifest_hashes_match_the_files(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    teacher = src / "teacher.safetensors"
    teacher.write_bytes(np.random.default_rng(0).bytes(3 * 2**20 + 17))  # larger than one read chunk
    folder = src / "tok"
    (folder / "sub").mkdir(parents=True)
    (folder / "vocab.txt").write_text("a\nb\n")
    (folder / "sub" / "cfg.json").write_text("{}")
    out = tmp_path / "out"
    out.mkdir()
    model = out / "model_int8.onnx"
    model.write_bytes(b"onnx bytes")
    spec = CompressSpec().model_dump(mode="json")

    path = write_manifest(
        out,
        inputs={"teacher": teacher, "tokenizer": folder},
        outputs={"int8": model},
        spec=spec,
        seeds={"distillation": 0, "split": 3},
        calibration_ids=[5, 1, 9],
    )
    manifest = json.loads(path.read_text())
    assert manifest["inputs"]["teacher"] == {
        "file": "teacher.safetensors",
        "size_bytes": teacher.stat().st_size,
        "sha256": hashlib.sha256(teacher.read_bytes()).hexdigest(),
    }
    files = {f["path"]: f["sha256"] for f in manifest["inputs"]["tokenizer"]["files"]}
    assert files == {
        p: hashlib.sha256((folder / p).read_bytes()).hexdigest() for p in ("sub/cfg.json", "vocab.txt")
    }
    assert manifest["outputs"]["int8"]["sha256"] == hashlib.sha256(b"onnx bytes").hexdigest()
    assert (manifest["spec"], manifest["seeds"], manifest["calibration_ids"]) == (
        spec,
        {"distillation": 0, "split": 3},
        [5, 1, 9],
    )
    versions = manifest["versions"]
    assert versions["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert versions["numpy"] == np.__version__ and versions["python"].count(".") == 2
    assert datetime.fromisoformat(manifest["created_at"]).tzinfo == UTC
    assert sha256_file(teacher) == hashlib.sha256(teacher.read_bytes()).hexdigest()


def test_the_model_card_says_which_data_the_numbers_come_from() -> None:
    """Stranger trial: the card said 'the evaluation split of the uploaded data' when an eval set was given."""
    from worker.compression.package.model_card import model_card

    pre = {"input": {"names": ["x"], "kind": "vector", "shape": [4]}}
    card = {"verdict": {"verdict": "ship", "reasons": []}, "table": [], "metric": "accuracy", "batch": 64,
            "spec": {}, "preprocessing": pre, "data": {}}
    given = model_card(**card, inputs={"teacher": "a", "dataset": "b", "eval dataset": "c"})
    held_out = model_card(**card, inputs={"teacher": "a", "dataset": "b"})
    assert "evaluation dataset given with the job" in given and "held out from the uploaded" not in given
    assert "held out from the uploaded data" in held_out
