"""Quantization-aware distillation: fine-tune the student under simulated int8, against the teacher.

Route (chosen because it reuses the one export and quantization path, with its accuracy-aware
fallback, and needs no exporter support for fake-quant ops): the returned model is the plain
float student (no hooks, same state-dict keys) with weights fine-tuned so that the engine's
``static_int8`` quantization of its ONNX export keeps the accuracy. During training every
``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` sees, with straight-through gradients
(``torch.fake_quantize_per_*_affine``):

* its weight on the grid static quantization will store: symmetric int8, per output channel when
  ``spec.per_channel`` (per-channel rounding is unchanged when a following BatchNorm is folded
  in, as that only rescales each channel), in [-64, 64] when ``quantize.cpu_choices.CPU_CHOICES`` picks
  onnxruntime's ``reduce_range`` (7-bit weights), else [-127, 127];
* its input per tensor, affine over 256 levels (uint8 [0, 255]; int8 with a zero point is the
  same grid), with the range min-max calibration would pick for the *current* weights: the min
  and max of the float model's activations over the calibration sample the engine will use
  (``quantize.calibration.calibration_sample`` of the training inputs with the distillation seed),
  recomputed ``RECALIBRATIONS`` times over the run. A moving average of batch min/max was tried
  first: it lagged the drifting weights and under-estimated the sample's extremes, and the
  toy test lost up to half of its recovery once the engine recalibrated the final model.

The loss is the distillation loss against the teacher's outputs (``losses``: KL with temperature
for classification, MSE for regression, ``embedding_loss`` for embeddings), mixed with the label
loss when labels exist; the teacher runs once over the training set first. The grid matches the
engine's static path with min-max calibration; percentile / entropy calibration clip ranges the
training did not clip. Not simulated: activation × activation MatMuls (attention scores) and
the quantization of op outputs.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import DatasetError, SpecError
from ..quantize.calibration import calibration_sample
from ..quantize.cpu_choices import CPU_CHOICES
from ..spec import DistillSpec, QatConfig
from ..types import (
    CancelFn,
    ProgressFn,
    Task,
    Teacher,
    TensorData,
    never_cancel,
    no_progress,
)
from .losses import (
    embedding_loss,
    hard_ce,
    kd_kl,
    regression_loss,
    token_ce,
    token_kd_kl,
)
from .trainer import resolve_device, steps_per_epoch
from .trainer import train as train_loop

QUANTIZED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)
RECALIBRATIONS = 50
"""About how many times a run re-derives the activation ranges (at least once per epoch)."""


class _Calibrating:
    """Shared switch: while on, weights and inputs pass through in float and ranges are recorded."""

    on = False


class _WeightFakeQuant(nn.Module):
    """Parametrization: symmetric int8 fake quantization of a weight in [-qmax, qmax], one scale
    per output channel (or one for the whole tensor)."""

    def __init__(self, qmax: int, per_channel: bool, calibrating: _Calibrating) -> None:
        super().__init__()
        self.qmax, self.per_channel, self.calibrating = qmax, per_channel, calibrating

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.calibrating.on:
            return w
        amax = w.detach().abs().flatten(1).amax(dim=1)
        if not self.per_channel:
            amax = amax.max().expand_as(amax)
        scale = (amax.clamp(min=1e-8) / self.qmax).float()
        zero = torch.zeros_like(scale, dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(w, scale, zero, 0, -self.qmax, self.qmax)


class _InputFakeQuant:
    """Forward pre-hook: fake-quantizes the layer input on the calibrated 256-level grid, or,
    while calibrating, records the float input's min and max."""

    def __init__(self, calibrating: _Calibrating) -> None:
        self.calibrating = calibrating
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None

    def __call__(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        x = args[0]
        if self.calibrating.on:
            lo, hi = x.detach().min().float(), x.detach().max().float()
            self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
            self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)
            return args
        if self.lo is None or self.hi is None:
            return args
        lo, hi = self.lo.clamp(max=0.0), self.hi.clamp(min=0.0)  # the grid must hold 0 exactly
        scale = ((hi - lo) / 255.0).clamp(min=1e-8)
        zero = (-lo / scale).round().clamp(0, 255).to(torch.int32)
        q = torch.fake_quantize_per_tensor_affine(x.float(), scale, zero, 0, 255).to(x.dtype)  # autocast
        return (q, *args[1:])


def weight_qmax() -> int:
    """The symmetric int8 weight range of the engine's static quantization: [-64, 64] with
    onnxruntime's ``reduce_range`` (7-bit weights, chosen in ``quantize.cpu_choices``), else 127."""
    return 64 if CPU_CHOICES["static"]["reduce_range"] else 127


def _distill_loss(
    task: Task, out: torch.Tensor, target: torch.Tensor, y: torch.Tensor | None, spec: DistillSpec
) -> torch.Tensor:
    """The loss against the teacher's outputs, mixed ``alpha : 1 - alpha`` with the label loss when
    there are labels (classification and regression; embeddings follow the teacher only)."""
    if task == "classification":
        kd = kd_kl(out, target, spec.temperature)
        return kd if y is None else spec.alpha * kd + (1.0 - spec.alpha) * hard_ce(out, y)
    if task == "token_classification":
        kd = token_kd_kl(out, target, y, spec.temperature)
        return kd if y is None else spec.alpha * kd + (1.0 - spec.alpha) * token_ce(out, y)
    if task == "regression":
        kd = regression_loss(out, target)
        return kd if y is None else spec.alpha * kd + (1.0 - spec.alpha) * regression_loss(out, y)
    return embedding_loss(out, target, spec.embedding_loss)


@torch.no_grad()
def _teacher_outputs(teacher: Teacher, data: TensorData, batch_size: int) -> torch.Tensor:
    n = len(data)
    parts = [
        teacher.predict({k: v[i : i + batch_size] for k, v in data.inputs.items()})
        for i in range(0, n, batch_size)
    ]
    return torch.cat(parts).float().cpu()


@torch.no_grad()
def _calibrate(
    model: nn.Module,
    hooks: list[_InputFakeQuant],
    calibrating: _Calibrating,
    inputs: dict[str, torch.Tensor],
    batch_size: int,
) -> None:
    """Set every input range to the min / max of the float model's activations over ``inputs``."""
    was_training = model.training
    model.eval()
    for hook in hooks:
        hook.lo = hook.hi = None
    calibrating.on = True
    try:
        n = next(iter(inputs.values())).shape[0]
        for i in range(0, n, batch_size):
            model(**{k: v[i : i + batch_size] for k, v in inputs.items()})
    finally:
        calibrating.on = False
        model.train(was_training)


def qat_distill(
    student: nn.Module,
    teacher: Teacher,
    train: TensorData,
    spec: QatConfig,
    distill_spec: DistillSpec,
    *,
    progress: ProgressFn = no_progress,
    cancel: CancelFn = never_cancel,
    task: Task | None = None,
) -> nn.Module:
    """Fine-tune a copy of ``student`` for ``spec.qat_epochs`` epochs under simulated int8 with the
    teacher as target (the shared training loop: AdamW, warm-up + cosine LR, clipping, cancel,
    time budget of ``distill_spec``); returns the float model (eval mode, CPU) to export and
    quantize with ``static_int8``."""
    task = task or teacher.task
    if len(train) == 0:
        raise DatasetError("quantization-aware training needs at least one training sample")
    model = copy.deepcopy(student).float()
    layers = [m for m in model.modules() if isinstance(m, QUANTIZED_LAYERS)]
    if not layers:
        raise SpecError("quantization.method 'qat': the model has no Linear or Conv layer to quantize")
    device = resolve_device(distill_spec.device)
    batch = distill_spec.batch_size
    targets = _teacher_outputs(teacher, train, max(batch, 256)).to(device)
    sample, _ = calibration_sample(train.inputs, spec.calibration_samples, distill_spec.seed)
    calib = {k: torch.from_numpy(v).to(device) for k, v in sample.items()}
    total = steps_per_epoch(len(train), min(batch, len(train))) * spec.qat_epochs
    every = min(steps_per_epoch(len(train), min(batch, len(train))), max(1, total // RECALIBRATIONS))

    calibrating = _Calibrating()
    hooks = [_InputFakeQuant(calibrating) for _ in layers]
    step = 0

    def loss_fn(inputs: dict[str, torch.Tensor], y: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor:
        nonlocal step
        if step % every == 0:
            _calibrate(model, hooks, calibrating, calib, max(batch, 256))
        step += 1
        out, target = model(**inputs).float(), targets[idx]
        if out.shape != target.shape:
            raise SpecError(f"QAT: the model outputs {list(out.shape)}, the teacher {list(target.shape)}")
        return _distill_loss(task, out, target, y, distill_spec)

    qmax = weight_qmax()
    handles = []
    model.to(device)
    for layer, hook in zip(layers, hooks, strict=True):
        parametrize.register_parametrization(
            layer, "weight", _WeightFakeQuant(qmax, spec.per_channel, calibrating)
        )
        handles.append(layer.register_forward_pre_hook(hook))
    try:
        run_spec = distill_spec.model_copy(update={"epochs": spec.qat_epochs})
        train_loop(
            model,
            None,
            train,
            loss_fn,
            run_spec,
            stage="qat",
            progress=progress,
            cancel=cancel,
            device=device,
        )
    finally:
        for handle in handles:
            handle.remove()
        for layer in layers:
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
    return model.cpu().eval()
