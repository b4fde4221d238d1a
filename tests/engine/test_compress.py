"""One call runs a whole compression: distil, quantize, evaluate, export, report."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import onnxruntime as ort
import pytest
import torch
from pydantic import ValidationError

from worker.compression.compress import compress
from worker.compression.errors import Cancelled
from worker.compression.io.teachers import load_teacher, save_zoo_model
from worker.compression.measure.export import export_onnx
from worker.compression.measure.report import sha256_file
from worker.compression.pipeline import CandidatePipeline
from worker.compression.spec import CompressSpec
from worker.compression.students import zoo

CFG = {"architecture": "mlp", "task": "classification", "input_dim": 16, "hidden": [128, 128], "output_dim": 4}


@pytest.fixture(scope="module")
def problem(tmp_path_factory):
    """A learnable 4-class problem and a teacher trained on it for a second."""
    root = tmp_path_factory.mktemp("compress")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 16, generator=g)
    w = torch.randn(16, 4, generator=g)
    y = (x @ w).argmax(1)
    torch.manual_seed(0)
    teacher = zoo.build(CFG)
    opt = torch.optim.Adam(teacher.parameters(), 1e-2)
    for _ in range(150):
        loss = torch.nn.functional.cross_entropy(teacher(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_zoo_model(teacher.eval(), CFG, root / "teacher")
    np.savez(root / "data.npz", x=x.numpy(), y=y.numpy())
    return root


def _spec(**over):
    base = {
        "student": {"kind": "auto", "max_params_ratio": 0.3},
        "distillation": {"epochs": 4, "batch_size": 32, "lr": 3e-3},
        "quantization": {"method": "static_int8", "calibration_samples": 64},
        "evaluation": {"latency_batch_sizes": [1, 16], "repeats": 3, "warmup": 1},
    }
    base.update(over)
    return CompressSpec.model_validate(base)


def test_full_run_produces_checked_artifacts_and_an_honest_report(problem, tmp_path):
    stages = []
    res = compress(_spec(), teacher_path=problem / "teacher", dataset_path=problem / "data.npz",
                   output_dir=tmp_path / "out", progress=lambda p: stages.append(p.stage))
    kinds = {a.kind: a for a in res.artifacts}
    assert {"student", "onnx_fp32", "onnx_int8", "report_json", "report_html", "manifest"} <= set(kinds)
    assert {"load", "distill", "baseline", "export", "quantize", "evaluate", "report"} <= set(stages)

    # the int8 model runs, is smaller than fp32, and agrees with it on most of the eval split
    fp32, int8 = kinds["onnx_fp32"].path, kinds["onnx_int8"].path
    assert int8.stat().st_size < fp32.stat().st_size
    x = np.load(problem / "data.npz")["x"][:200]
    out32 = ort.InferenceSession(str(fp32)).run(None, {"x": x})[0]
    out8 = ort.InferenceSession(str(int8)).run(None, {"x": x})[0]
    assert (out32.argmax(1) == out8.argmax(1)).mean() >= 0.9

    # the student zip loads again as a teacher
    with zipfile.ZipFile(kinds["student"].path) as zf:
        zf.extractall(tmp_path / "student")
    again = load_teacher(tmp_path / "student")
    assert again.kind == "zoo" and again.num_parameters <= 0.3 * load_teacher(problem / "teacher").num_parameters

    # report.json holds what it claims: measured metrics, sizes equal to the files, per-class rows
    report = json.loads(kinds["report_json"].path.read_text())
    rows = {r["name"]: r for r in report["models"]}
    assert set(rows) == {"teacher", "student", "int8", "baseline", "baseline int8"}
    assert rows["int8"]["size_bytes"] == int8.stat().st_size
    assert rows["student"]["size_bytes"] == fp32.stat().st_size
    assert 0.0 <= rows["int8"]["metric"]["accuracy"] <= 1.0
    assert report["distillation"]["metrics"]["baseline"] is not None
    assert len(report["per_class"]) == 4

    # the delivered model is the best candidate measured, and the job says whether to ship it
    summary, delivery = report["summary"], report["delivery"]
    chosen = rows[summary["delivered"]["name"]]
    assert chosen["name"] in {"student", "int8", "baseline", "baseline int8"} and summary["final"] == chosen["name"]
    assert summary["verdict"] in ("ship", "ship_with_caution", "do_not_ship") and "reasons" in summary
    best = max(r["metric"]["accuracy"] for name, r in rows.items() if name != "teacher")
    assert chosen["metric"]["accuracy"] >= best - delivery["tolerance"]
    # the verdict weighs a drop against the noise of the eval rows, and says where they came from
    assert delivery["eval_from"] == "held out from the upload" and delivery["eval_rows"] == report["data"]["eval"]["samples"]
    assert isinstance(delivery["drop_noise"], float) and 0 <= delivery["drop_noise"] < 0.2
    model = res.artifacts[[a.name for a in res.artifacts].index("model.onnx")].path
    assert model.stat().st_size == chosen["size_bytes"]
    html = kinds["report_html"].path.read_text()
    assert f"{rows['int8']['metric']['accuracy']:.4f}" in html and "data:image/png;base64" in html

    # the manifest's hashes are the files' hashes
    manifest = json.loads(kinds["manifest"].path.read_text())
    assert manifest["outputs"]["model_int8.onnx"]["sha256"] == sha256_file(int8)
    assert manifest["inputs"]["dataset"]["sha256"] == sha256_file(problem / "data.npz")
    assert len(manifest["calibration_ids"]) == 64


def test_quantize_only_an_onnx_teacher(problem, tmp_path):
    teacher = load_teacher(problem / "teacher")
    onnx_path = export_onnx(teacher.module, {"x": torch.randn(2, 16)}, tmp_path / "teacher.onnx")
    res = compress(_spec(student=None, quantization={"method": "dynamic_int8"}), teacher_path=onnx_path,
                   dataset_path=problem / "data.npz", output_dir=tmp_path / "out")
    names = {a.name for a in res.artifacts}
    assert "student.zip" not in names and "model_int8.onnx" in names
    assert [r["name"] for r in res.metrics["models"]] == ["teacher", "int8"]


def test_cancel_between_stages_raises(problem, tmp_path):
    calls = {"n": 0}

    def cancel():
        calls["n"] += 1
        return calls["n"] > 3

    with pytest.raises(Cancelled):
        compress(_spec(), teacher_path=problem / "teacher", dataset_path=problem / "data.npz",
                 output_dir=tmp_path / "out", cancel=cancel)


def test_qat_needs_a_student(problem, tmp_path):
    with pytest.raises(ValidationError, match="qat"):  # the spec refuses it, before any work
        _spec(student=None, quantization={"method": "qat"})


def test_qat_is_a_quantization_method_of_the_pipeline(problem, tmp_path, monkeypatch):
    """compress quantizes through the candidate pipeline; qat fine-tunes the distilled student there
    (its registered handler) and delivers static int8 beside the plain fp32 student; the labels-only
    baseline, a candidate too, gets the static int8 that QAT's last step applies."""
    calls = []
    original = CandidatePipeline.quantize

    def counted(self, fp32, out, config, **kw):
        calls.append((type(config).__name__, kw.get("module") is not None))
        return original(self, fp32, out, config, **kw)

    monkeypatch.setattr(CandidatePipeline, "quantize", counted)
    res = compress(_spec(quantization={"method": "qat", "qat_epochs": 1, "calibration_samples": 64}),
                   teacher_path=problem / "teacher", dataset_path=problem / "data.npz", output_dir=tmp_path / "out")
    assert calls == [("QatConfig", True), ("StaticInt8Config", False)]
    kinds = {a.kind: a for a in res.artifacts}
    assert {"student", "onnx_fp32", "onnx_int8"} <= set(kinds)
    quant = res.metrics["quantization"]
    assert quant["method"] == "qat" and quant["options"]["qat_epochs"] == 1
    assert quant["calibration"]["method"] == "minmax" and len(quant["calibration"]["sample_ids"]) == 64
    rows = {r["name"]: r for r in res.metrics["models"]}
    assert set(rows) == {"teacher", "student", "int8", "baseline", "baseline int8"}
    assert rows["int8"]["size_bytes"] < rows["student"]["size_bytes"]
    assert rows["int8"]["metric"]["accuracy"] >= rows["student"]["metric"]["accuracy"] - 0.1


def test_the_bundle_of_a_model_trained_on_arrays_predicts_csv_rows_of_numbers(problem, tmp_path):
    """predict.py rows.csv failed with KeyError 'tabular' for a model trained on an .npz (stranger trial)."""
    import subprocess
    import sys

    compress(_spec(quantization={"method": "none"}), teacher_path=problem / "teacher",
             dataset_path=problem / "data.npz", output_dir=tmp_path / "out")
    with zipfile.ZipFile(tmp_path / "out" / "bundle.zip") as zf:
        zf.extractall(tmp_path / "bundle")
    x = np.load(problem / "data.npz")["x"][:5]
    header = ",".join(f"f{i}" for i in range(x.shape[1]))
    (tmp_path / "rows.csv").write_text(header + "\n" + "\n".join(",".join(map(str, r)) for r in x) + "\n")
    out = subprocess.run([sys.executable, "predict.py", str(tmp_path / "rows.csv")], capture_output=True, text=True,
                         cwd=tmp_path / "bundle", timeout=120)
    assert out.returncode == 0, out.stderr
    expected = ort.InferenceSession(str(tmp_path / "bundle" / "model.onnx")).run(None, {"x": x})[0].argmax(1)
    answers = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(answers) == 5 and [a["index"] for a in answers] == expected.tolist()
    (tmp_path / "bad.csv").write_text("1,2,3\n")
    bad = subprocess.run([sys.executable, "predict.py", str(tmp_path / "bad.csv")], capture_output=True, text=True,
                         cwd=tmp_path / "bundle", timeout=120)
    assert bad.returncode != 0 and "must be 16 numbers" in bad.stderr


@pytest.mark.parametrize("export", ["external_data", "fixed_batch"])
def test_static_int8_of_a_default_torch_export_teacher(problem, tmp_path, export):
    """Stranger trial: torch's default export (weights in model.onnx.data beside the graph) failed
    'cannot prepare … should be stored in /tmp/…/bc.onnx.data', and a graph with its batch axis fixed
    to 1 failed calibration 'Got: 32 Expected: 1' (an internal error)."""
    teacher = load_teacher(problem / "teacher")
    folder = tmp_path / "teacher"
    folder.mkdir()
    if export == "external_data":
        import onnx

        export_onnx(teacher.module, {"x": torch.randn(2, 16)}, tmp_path / "plain.onnx")
        onnx.save_model(onnx.load(str(tmp_path / "plain.onnx")), str(folder / "t.onnx"), save_as_external_data=True,
                        all_tensors_to_one_file=True, location="t.onnx.data", size_threshold=0)
        assert (folder / "t.onnx.data").stat().st_size > 10_000
    else:
        torch.onnx.export(teacher.module.eval(), (torch.zeros(1, 16),), str(folder / "t.onnx"), input_names=["x"],
                          dynamo=False)
    res = compress(_spec(student=None, quantization={"method": "static_int8", "calibration_samples": 40}),
                   teacher_path=folder / "t.onnx", dataset_path=problem / "data.npz", output_dir=tmp_path / "out")
    rows = {r["name"]: r for r in res.metrics["models"]}
    assert rows["int8"]["metric"]["accuracy"] >= rows["teacher"]["metric"]["accuracy"] - 0.05
    headline = res.metrics["summary"]["headline"]
    batch = res.metrics["delivery"]["batch"]
    # a speed-up against a batch-1 graph is said to be one (it ran `batch` calls): the trial read 31x for 2.7x
    assert (f"takes batches of 1 only, so at batch {batch} it ran {batch} calls" in headline) == (export == "fixed_batch")
