"""Tiny upload files for the service tests: a zoo MLP teacher (zip) and npz datasets."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from worker.compression.io.teachers import save_zoo_model
from worker.compression.students import zoo

FEATURES, CLASSES, SAMPLES = 16, 3, 240
TEACHER_CONFIG = {
    "architecture": "mlp",
    "task": "classification",
    "input_dim": FEATURES,
    "hidden": [32, 32],
    "output_dim": CLASSES,
}

FAST_SPEC = {
    "student": {"kind": "auto", "max_params_ratio": 0.5},
    "distillation": {"epochs": 2, "batch_size": 32, "baseline": False, "seed": 0},
    "quantization": {"method": "static_int8", "calibration_samples": 32},
    "evaluation": {"latency_batch_sizes": [1], "warmup": 1, "repeats": 3, "disagreements": 2},
}
"""A job spec that runs in seconds on the tiny teacher."""


def write_teacher_zip(folder: Path) -> Path:
    """The tiny teacher, trained for a moment on the clusters `write_dataset` draws (a teacher that
    agrees with the labels: a job checks that before it distils)."""
    torch.manual_seed(0)
    model = zoo.build(TEACHER_CONFIG)
    rng = np.random.default_rng(123)
    y = torch.from_numpy(rng.integers(0, CLASSES, 2000))
    x = torch.from_numpy(rng.normal(size=(2000, FEATURES)).astype(np.float32)) + y[:, None].float()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(150):
        loss = torch.nn.functional.cross_entropy(model(x=x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    src = save_zoo_model(model, TEACHER_CONFIG, folder / "teacher")
    archive = folder / "teacher.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted(src.iterdir()):
            zf.write(f, f.name)
    return archive


def write_dataset(folder: Path, name: str = "data.npz", *, label_offset: int = 0, seed: int = 0) -> Path:
    """Gaussian clusters labelled 0..CLASSES-1 (plus ``label_offset``: out-of-range labels fail training)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, SAMPLES)
    x = rng.normal(size=(SAMPLES, FEATURES)).astype(np.float32) + y[:, None].astype(np.float32)
    path = folder / name
    np.savez(path, x=x, y=(y + label_offset).astype(np.int64))
    return path


def write_assets(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    teacher = write_teacher_zip(folder)
    truncated = folder / "truncated.zip"
    truncated.write_bytes(teacher.read_bytes()[: teacher.stat().st_size // 2])
    return {
        "teacher": teacher,
        "truncated": truncated,
        "data": write_dataset(folder),
        "bad_labels": write_dataset(folder, "bad_labels.npz", label_offset=CLASSES),
    }


EXPECTED_ARTIFACTS = {  # what a FAST_SPEC job stores
    "student.zip",
    "model_fp32.onnx",
    "model_int8.onnx",
    "report.json",
    "report.html",
    "manifest.json",
    "model.onnx",
    "bundle.zip",
}
