"""Teachers and data made the way their users make them, for the results tests (tests/service/
test_results.py) and bench/newcomer.py: torch's default ONNX export (a graph plus an external data
file), string labels, raw pixels in PNG files, a regression teacher with one output."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from worker.compression.io.teachers import save_zoo_model
from worker.compression.students import zoo


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int = 200, lr: float = 1e-2,
          regression: bool = False, seed: int = 0) -> nn.Module:  # fmt: skip
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr)
    loss_fn = nn.functional.mse_loss if regression else nn.functional.cross_entropy
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            loss = loss_fn(model(x[idx]).squeeze(-1) if regression else model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def default_onnx_export(model: nn.Module, sample: torch.Tensor, folder: Path, input_name: str = "x") -> Path:
    """``torch.onnx.export`` as torch 2.13 does it by default (the dynamo exporter, weights in a
    ``model.onnx.data`` file beside the graph), zipped with its data file: what a team uploads."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(model, (sample,), str(folder / "model.onnx"), input_names=[input_name], output_names=["logits"],
                      dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), external_data=True)  # fmt: skip
    files = sorted(folder.iterdir())
    archive = folder.with_suffix(".zip")
    with zipfile.ZipFile(archive, "w") as zf:
        for f in files:
            zf.write(f, f.name)
    return archive


def legacy_onnx(model: nn.Module, sample: torch.Tensor, path: Path, input_name: str = "x") -> Path:
    """One self-contained ``.onnx`` file (the TorchScript exporter)."""
    torch.onnx.export(model, (sample,), str(path), input_names=[input_name], output_names=["y"],
                      dynamic_axes={input_name: {0: "batch"}}, dynamo=False)  # fmt: skip
    return path


def breast_cancer(folder: Path) -> dict[str, Path]:
    """Standardised breast-cancer features in a CSV with string labels (``benign`` / ``malignant``: sorted,
    the reverse of the teacher's outputs), a zoo teacher that names its classes, and the same teacher
    as a bare ONNX graph that does not."""
    from sklearn.datasets import load_breast_cancer

    folder.mkdir(parents=True, exist_ok=True)
    data = load_breast_cancer()
    x = (data.data - data.data.mean(0)) / data.data.std(0)
    names = list(data.target_names)  # ['malignant', 'benign']: output 0 is malignant
    cfg = {"architecture": "mlp", "task": "classification", "input_dim": 30, "hidden": [64, 64], "output_dim": 2,
           "classes": names}  # fmt: skip
    torch.manual_seed(0)
    teacher = train(zoo.build(cfg), torch.tensor(x, dtype=torch.float32), torch.tensor(data.target), epochs=60)
    src = save_zoo_model(teacher, cfg, folder / "zoo")
    with zipfile.ZipFile(folder / "teacher.zip", "w") as zf:
        for f in sorted(src.iterdir()):
            zf.write(f, f.name)
    legacy_onnx(teacher, torch.zeros(1, 30), folder / "teacher.onnx")
    columns = [f"f{i}" for i in range(30)]
    rows = ["label," + ",".join(columns)]
    rows += [f"{names[t]}," + ",".join(f"{v:.6f}" for v in row) for row, t in zip(x, data.target)]
    (folder / "data.csv").write_text("\n".join(rows) + "\n")
    (folder / "eval.csv").write_text("\n".join(rows[:1] + rows[1::4]) + "\n")
    return {"zoo": folder / "teacher.zip", "onnx": folder / "teacher.onnx", "data": folder / "data.csv",
            "eval": folder / "eval.csv"}


class Digits(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
                                  nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(128, 10))  # fmt: skip

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.body(image)


def digit_pngs(folder: Path, limit: int = 600) -> dict[str, Path]:
    """sklearn's 8×8 digits as grayscale PNG files in class folders (a zip for training, a folder
    of held-out ones), and a CNN teacher trained on pixels in [0, 1] whose input is named ``image``,
    exported with torch's default exporter (graph + ``model.onnx.data``, zipped)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, labels = digits.images[:limit] / 16.0, digits.target[:limit]
    teacher = train(Digits(), torch.tensor(images[:, None], dtype=torch.float32), torch.tensor(labels), epochs=40)
    teacher_zip = default_onnx_export(teacher, torch.zeros(2, 1, 8, 8), folder / "teacher", input_name="image")
    for split, rows in (("train", range(0, limit, 1)), ("eval", range(1, limit, 5))):
        for i in rows:
            path = folder / split / str(labels[i]) / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray((images[i] * 255).round().astype(np.uint8), mode="L").save(path)
    archive = folder / "digits.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted((folder / "train").rglob("*.png")):
            zf.write(f, f.relative_to(folder / "train").as_posix())
    evals = folder / "digits-eval.zip"
    with zipfile.ZipFile(evals, "w") as zf:
        for f in sorted((folder / "eval").rglob("*.png")):
            zf.write(f, f.relative_to(folder / "eval").as_posix())
    return {"teacher": teacher_zip, "data": archive, "eval": evals, "eval_dir": folder / "eval"}


def regression(folder: Path) -> dict[str, Path]:
    """A regression set with targets far from zero (about 150 ± 77) and an ONNX teacher with one output."""
    from sklearn.datasets import load_diabetes

    folder.mkdir(parents=True, exist_ok=True)
    data = load_diabetes()
    x = torch.tensor(data.data * 10, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.float32)
    net = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 1))
    with torch.no_grad():
        net[2].bias.fill_(float(y.mean()))
    train(net, x, y, epochs=300, lr=3e-3, regression=True)
    legacy_onnx(net, torch.zeros(1, 10), folder / "teacher.onnx", input_name="features")
    np.savez(folder / "data.npz", x=x.numpy(), y=y.numpy())
    return {"teacher": folder / "teacher.onnx", "data": folder / "data.npz"}


def three_class(folder: Path, *, mediocre: bool = False, useless: bool = False) -> dict[str, Path]:
    """A 3-class vector problem; the teacher is trained on it, or trained blind to one of the three
    features that decide the class (``mediocre``: well above chance, well below what the labels
    teach), or left at its random initialisation (``useless``)."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(900, 12, generator=g)
    y = (x[:, :3] + 0.3 * torch.randn(900, 3, generator=g)).argmax(1)
    seen = x.clone()
    if mediocre:
        seen[:, 2] = 0.0
    net = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 3))
    if useless:  # it answers class 0 whatever it is shown
        with torch.no_grad():
            for param in net.parameters():
                param.zero_()
            net[2].bias[0] = 1.0
    else:
        train(net, seen, y, epochs=40, lr=3e-3)
        if mediocre:
            with torch.no_grad():
                net[0].weight[:, 2] = 0.0  # and it stays blind to it
    legacy_onnx(net, torch.zeros(1, 12), folder / "teacher.onnx")
    np.savez(folder / "data.npz", x=x.numpy(), y=y.numpy())
    return {"teacher": folder / "teacher.onnx", "data": folder / "data.npz"}
