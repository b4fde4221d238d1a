"""A fresh student learns on standardised values while it keeps the teacher's interface.

Tabular features span many scales (a breast-cancer set runs from 0.001 to 4,000), and regression
targets sit far from zero (house prices, ages); a freshly initialised MLP trained on them raw
learns slowly or predicts about 0 (measured: MSE 22,986 against the teacher's 105). So a fresh
MLP student (on vectors, or on a flattened image or window) is wrapped (`Standardized`): it
standardises its inputs with the training split's mean and std, and for regression maps its outputs back with the targets' mean
and std. It trains that way, and afterwards the two affine maps are folded into its first and last
linear layers (`fold`), exactly: the delivered student is a plain MLP that takes what the teacher
took and answers on the teacher's scale, with no extra ops. Students initialised from the
teacher's weights (``derived``) keep the teacher's raw inputs and are not wrapped.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..types import ModelOutput, TensorData
from .student import Student
from .zoo import MLP

MIN_STD = 1e-6
"""A feature whose std on the training split is at most this (times 1 + |mean|) is constant there:
the student ignores it (its standardised value is 0 and its folded weights are 0). Dividing by the
clamped std instead put 1e6 into the folded first layer: every int8 form of a digits student
(whose border pixels are always 0) scored 0.11, and a row where such a column moved would blow up
in fp32 too."""


class Standardized(nn.Module):
    def __init__(self, inner: MLP, x_mean: torch.Tensor, x_std: torch.Tensor,
                 y_mean: torch.Tensor | None = None, y_std: torch.Tensor | None = None) -> None:  # fmt: skip
        super().__init__()
        self.inner = inner
        constant = x_std.float() <= MIN_STD * (1 + x_mean.float().abs())
        self.register_buffer("x_mean", x_mean.float())
        self.register_buffer("x_std", torch.where(constant, torch.ones_like(x_std.float()), x_std.float()))
        self.register_buffer("x_keep", (~constant).float())
        self.scale_outputs = y_mean is not None and y_std is not None
        self.register_buffer("y_mean", (y_mean if y_mean is not None else torch.zeros(1)).float())
        self.register_buffer("y_std", (y_std if y_std is not None else torch.ones(1)).float().clamp(min=MIN_STD))
        self.kdq_layer_map = getattr(inner, "kdq_layer_map", None)

    def forward_features(self, x: torch.Tensor) -> ModelOutput:
        out = self.inner.forward_features((x.flatten(1) - self.x_mean) / self.x_std * self.x_keep)
        if self.scale_outputs:
            out = ModelOutput(out.output * self.y_std + self.y_mean, out.hidden, out.attentions)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x).output


def wrap(student: Student, train: TensorData, task: str, teacher_outputs: torch.Tensor | None = None) -> dict[str, Any]:
    """Wrap a fresh MLP student (in place); what was done, for the preprocessing
    record (empty when the student is left as it is)."""
    if not isinstance(student.module, MLP) or train.input_kind == "tokens" or student.how == "derived":
        return {}
    x = train.inputs["x"].float().flatten(1)
    x_mean, x_std = x.mean(0), x.std(0, unbiased=False)
    y_mean = y_std = None
    targets = train.y if train.y is not None and train.y.is_floating_point() else teacher_outputs
    if task == "regression" and targets is not None:
        values = targets.float().reshape(len(targets), -1)
        y_mean, y_std = values.mean(0), values.std(0, unbiased=False)
    layer_map = student.module.kdq_layer_map if hasattr(student.module, "kdq_layer_map") else None
    wrapped = Standardized(student.module, x_mean, x_std, y_mean, y_std)
    if student.init is not None and (student.init.full or student.init.partial):
        unfold_first(wrapped)
    student.module = wrapped
    student.module.kdq_layer_map = layer_map
    record: dict[str, Any] = {"inputs": "standardised with the training split's mean and std, folded into the "
                                        "first layer (the model takes raw features)"}
    if y_mean is not None:
        record["outputs"] = ("trained on standardised targets, mapped back in the last layer (the model "
                             "answers on the teacher's scale)")
    return record


@torch.no_grad()
def unfold_first(module: Standardized) -> None:
    """A first layer copied from the teacher expects raw features; fed standardised ones it must take
    ``W x + b = (W s k) x̂ + (W m + b)`` (k = 0 for a constant feature, whose x is m). Without this an
    auto student initialised from a teacher on raw features (scales 0.001 to 4,000) started with
    activations in the thousands and never left 'one class for every row'."""
    inner = module.inner
    first = inner.layers[0] if len(inner.layers) else inner.head
    if first.in_features != module.x_mean.numel():
        return
    first.bias.add_(first.weight @ module.x_mean)
    first.weight.mul_((module.x_std * module.x_keep)[None, :])


@torch.no_grad()
def fold(module: nn.Module) -> nn.Module:
    """A trained `Standardized` as a copy of its plain inner MLP with the affine maps folded into its
    first and last linear layers (any other module is returned as it is). The wrapper itself is left
    as it was: a search may go on training it."""
    if not isinstance(module, Standardized):
        return module
    inner = copy.deepcopy(module.inner).eval()
    first = inner.layers[0] if len(inner.layers) else inner.head
    scale = module.x_keep / module.x_std
    # W k (x - m) / s + b  =  (W k / s) x + (b - W (k m / s)), k = 0 for a constant feature
    first.bias.sub_(first.weight @ (module.x_mean * scale))
    first.weight.mul_(scale[None, :])
    if module.scale_outputs:
        # (W h + b) * s + m  =  (s W) h + (s b + m)
        inner.head.weight.mul_(module.y_std[:, None])
        inner.head.bias.mul_(module.y_std).add_(module.y_mean)
    inner.kdq_layer_map = getattr(module, "kdq_layer_map", None)
    return inner
