"""The pieces `distill.distill` builds its loss from: the teacher's per-batch outputs and features, the
task loss (KD with temperature and labels, embedding and regression losses), input augmentation
(noise, mixup), the feature and attention matching set up by a probe of both models, and whether
the teacher's outputs can be cached."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SpecError
from ..spec import DistillSpec
from ..types import ModelOutput, Teacher, TensorData
from .losses import (
    FeatureProjector,
    default_layer_map,
    embedding_loss,
    hard_ce,
    kd_kl,
    kd_kl_topk,
    regression_loss,
    token_ce,
    token_kd_kl,
)
from .trainer import LossFn

EVAL_BATCH = 256


def _hidden_map(spec: DistillSpec, student: nn.Module, s: ModelOutput, t: ModelOutput) -> dict[int, int]:
    """The spec's layer map, else the student factory's ``kdq_layer_map``, else evenly spaced."""
    chosen = spec.layer_map or getattr(student, "kdq_layer_map", None)
    return dict(chosen) if chosen else default_layer_map(len(s.hidden), len(t.hidden))


def _attention_map(hidden_map: dict[int, int], s: ModelOutput, t: ModelOutput) -> dict[int, int]:
    """Follow the hidden-state map when hidden[0] is the embedding output (hidden[i] = layer i-1)."""
    shifted = len(s.hidden) == len(s.attentions) + 1 and len(t.hidden) == len(t.attentions) + 1
    if shifted:
        ns, nt = len(s.hidden), len(t.hidden)
        mapped = {(a % ns) - 1: (b % nt) - 1 for a, b in hidden_map.items() if a % ns >= 1 and b % nt >= 1}
        if mapped:
            return mapped
    return default_layer_map(len(s.attentions), len(t.attentions))


class TeacherRunner:
    """Per-batch teacher calls on the training device (ONNX teachers run on CPU tensors)."""

    def __init__(self, teacher: Teacher, device: torch.device) -> None:
        self.teacher, self.device = teacher, device

    def outputs(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.teacher.run_onnx is not None:
            return self.teacher.predict({k: v.cpu() for k, v in inputs.items()}).float().to(self.device)
        return self.teacher.predict(inputs)

    def features(self, inputs: dict[str, torch.Tensor]) -> ModelOutput:
        out = self.teacher.features(inputs)
        assert out is not None
        return out

    @torch.no_grad()
    def all_outputs(self, data: TensorData) -> torch.Tensor:
        n = len(data)
        chunks = []
        for lo in range(0, n, EVAL_BATCH):
            batch = {k: v[lo : lo + EVAL_BATCH].to(self.device) for k, v in data.inputs.items()}
            chunks.append(self.outputs(batch).float().cpu())
        return torch.cat(chunks)


Inputs = dict[str, torch.Tensor]


@contextlib.contextmanager
def frozen_embeddings(model: nn.Module, freeze: bool) -> Iterator[None]:
    """``spec.freeze_embeddings``: the embedding tables sit out the run, trainable again after it."""
    tables = [m.weight for m in model.modules() if isinstance(m, nn.Embedding) and m.weight.requires_grad]
    for weight in tables if freeze else []:
        weight.requires_grad_(False)
    try:
        yield
    finally:
        for weight in tables if freeze else []:
            weight.requires_grad_(True)


def noise_fn(spec: DistillSpec, data: TensorData, device: torch.device) -> Callable[[Inputs], Inputs] | None:
    """Gaussian noise of ``augment_noise`` × the per-feature std of each float input."""
    if spec.augment_noise <= 0:
        return None
    scales = {
        k: (spec.augment_noise * v.float().std(0, correction=0, keepdim=True)).to(device)
        for k, v in data.inputs.items()
        if torch.is_floating_point(v)
    }
    if not scales:
        raise SpecError("augment_noise needs float inputs (vectors, images or signals), not token ids")

    def add_noise(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v + torch.randn_like(v) * scales[k] if k in scales else v for k, v in inputs.items()}

    return add_noise


Mixer = Callable[[Inputs], tuple[Inputs, torch.Tensor, torch.Tensor]]


def mixup_fn(spec: DistillSpec, data: TensorData) -> Mixer | None:
    """Mix each sample with another of the batch: ``λ x + (1 - λ) x[perm]``, λ ~ Beta(a, a)."""
    if spec.augment_mixup <= 0:
        return None
    if not any(torch.is_floating_point(v) for v in data.inputs.values()):
        raise SpecError("augment_mixup needs float inputs (vectors, images or signals), not token ids")
    beta = torch.distributions.Beta(spec.augment_mixup, spec.augment_mixup)

    def mix(inputs: Inputs) -> tuple[Inputs, torch.Tensor, torch.Tensor]:
        n = next(iter(inputs.values())).shape[0]
        perm = torch.randperm(n)
        lam = beta.sample((n,))
        out = {}
        for k, v in inputs.items():
            if torch.is_floating_point(v):
                w = lam.to(v.device, v.dtype).view(-1, *([1] * (v.dim() - 1)))
                v = w * v + (1 - w) * v[perm.to(v.device)]
            out[k] = v
        return out, perm, lam

    return mix


def with_mixed_labels(kd: torch.Tensor, out: torch.Tensor, mixed: tuple | None, task: str,
                       alpha: float) -> torch.Tensor:
    """Under mixup, weigh in the labels of both mixed samples (λ-weighted CE), as ``alpha`` says."""
    if mixed is None or mixed[0] is None or alpha == 1.0 or task != "classification":
        return kd
    y, perm, lam = mixed
    lam = lam.to(out.device)
    ce = lam * F.cross_entropy(out, y, reduction="none") + (1 - lam) * F.cross_entropy(
        out, y[perm.to(y.device)], reduction="none")
    return alpha * kd + (1 - alpha) * ce.mean()


def task_loss_fn(
    task: str, spec: DistillSpec
) -> Callable[[torch.Tensor, Any, torch.Tensor | None], torch.Tensor]:
    """loss(student_output, teacher_target, labels) for the task; ``alpha`` weighs teacher vs labels."""
    a, temperature = spec.alpha, spec.temperature

    def loss(s: torch.Tensor, t: Any, y: torch.Tensor | None) -> torch.Tensor:
        if task == "classification":
            kd = kd_kl_topk(s, t[0], t[1], temperature) if isinstance(t, tuple) else kd_kl(s, t, temperature)
            return kd if y is None or a == 1.0 else a * kd + (1.0 - a) * hard_ce(s, y)
        if task == "token_classification":
            kd = token_kd_kl(s, t, y, temperature)
            return kd if y is None or a == 1.0 else a * kd + (1.0 - a) * token_ce(s, y)
        if task == "embedding":
            return embedding_loss(s, t, spec.embedding_loss)
        to_teacher = regression_loss(s, t)
        return to_teacher if y is None or a == 1.0 else a * to_teacher + (1.0 - a) * regression_loss(s, y)

    return loss


def baseline_loss_fn(task: str, spec: DistillSpec, model: nn.Module) -> LossFn:
    """The same student's loss on the labels alone."""

    def loss(inputs: dict[str, torch.Tensor], y: torch.Tensor | None, _: torch.Tensor) -> torch.Tensor:
        assert y is not None
        out = model(**inputs)
        if task == "classification":
            return hard_ce(out, y)
        if task == "token_classification":
            return token_ce(out, y)
        if task == "embedding":
            return embedding_loss(out, y, spec.embedding_loss)
        return regression_loss(out, y)

    return loss


def probe(
    spec: DistillSpec, student: nn.Module, runner: TeacherRunner, data: TensorData, device: torch.device
) -> tuple[FeatureProjector | None, dict[int, int] | None]:
    """Run both models on two samples: check the output sizes agree, build the feature
    projections and the attention layer map when asked for."""
    sample = {k: v[:2].to(device) for k, v in data.inputs.items()}
    was_training = student.training
    student.eval()  # no BatchNorm statistics from the probe
    with torch.no_grad():
        s_out = student.forward_features(**sample)
        t_out = runner.outputs(sample)
    student.train(was_training)
    s_size, t_size = s_out.output[0].numel(), t_out[0].numel()
    if s_size != t_size:
        raise SpecError(f"the student outputs {s_size} values per sample, the teacher {t_size}")
    if spec.feature_loss == "none" and spec.attention_weight == 0:
        return None, None
    t_feats = runner.features(sample)
    hidden_map = _hidden_map(spec, student, s_out, t_feats)
    projector: FeatureProjector | None = None
    attn_map: dict[int, int] | None = None
    if spec.feature_loss != "none":
        if not s_out.hidden or not t_feats.hidden:
            raise SpecError("feature matching: the student or the teacher exposes no hidden states")
        torch.manual_seed(spec.seed)
        projector = FeatureProjector(
            s_out.hidden,
            t_feats.hidden,
            hidden_map,
            kind=spec.feature_loss,
            tokens=data.input_kind == "tokens",
        )
    if spec.attention_weight > 0:
        if not s_out.attentions or not t_feats.attentions:
            raise SpecError("attention matching needs attention maps from both models (transformers)")
        attn_map = _attention_map(hidden_map, s_out, t_feats)
    return projector, attn_map


def cache_plan(spec: DistillSpec, need_internals: bool) -> tuple[bool, str]:
    """Whether to cache the teacher's outputs, and why (reported)."""
    if not spec.cache_teacher:
        return False, "turned off in the spec (cache_teacher = false): the teacher runs on every batch"
    if spec.augment_noise > 0 or spec.augment_mixup > 0:
        return False, "input augmentation is on: the teacher runs on every augmented batch"
    if need_internals:
        return False, "feature / attention matching needs the teacher's hidden states on every batch"
    return True, "inputs are the same every epoch: teacher outputs computed once and reused"
