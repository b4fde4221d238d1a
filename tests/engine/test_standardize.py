"""A fresh MLP student on standardised features, folded back: constant features are ignored, not scaled by 1e6."""

from __future__ import annotations

import torch

from worker.compression.students import zoo
from worker.compression.students.standardize import fold, wrap
from worker.compression.students.student import Student
from worker.compression.types import TensorData

CFG = {"architecture": "mlp", "task": "classification", "input_dim": 6, "hidden": [16], "output_dim": 3}


def student() -> Student:
    torch.manual_seed(0)
    module = zoo.build(CFG)
    return Student(module, "zoo", CFG, None, "a fresh MLP", zoo.count_parameters(module), "auto")


def test_a_feature_constant_in_training_is_ignored_and_the_fold_stays_exact_and_small() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=g) * torch.tensor([1.0, 10.0, 0.001, 1.0, 1.0, 1.0])
    x[:, 3] = 0.0  # a border pixel: always 0
    x[:, 4] = 255.0  # a flag that never changes in this data
    s = student()
    wrap(s, TensorData({"x": x}, torch.zeros(200, dtype=torch.long), input_kind="vector"), "classification")
    wrapped = s.module.eval()
    plain = fold(wrapped)
    probe = torch.randn(50, 6, generator=g)
    probe[:, 3], probe[:, 4] = 0.0, 255.0
    assert torch.allclose(wrapped(probe), plain(probe), atol=1e-4)  # the fold is exact
    first = plain.layers[0].weight
    assert first[:, 3].abs().max() == 0 and first[:, 4].abs().max() == 0  # constant features: no weight
    assert first.abs().max() < 1e4  # 1 / 0.001 at most, never 1 / 1e-6
    moved = probe.clone()
    moved[:, 3], moved[:, 4] = 7.0, 0.0  # the constant features move at inference: the answer does not
    assert torch.allclose(plain(moved), plain(probe), atol=1e-5)
