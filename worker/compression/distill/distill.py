"""Knowledge distillation of a student from a teacher, with a labels-only baseline beside it.

The loss follows the task: soft-target KD (+ hard labels) for classification, cosine / MSE
to the teacher's embedding, MSE to the teacher's values (+ labels) for regression; plus
optional feature and attention matching. Teacher outputs are cached once when nothing
makes them differ between epochs.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DatasetError, SpecError
from ..measure.metrics import TASK_METRICS, evaluate_outputs, primary_metric
from ..spec import DistillSpec
from ..students.zoo import count_parameters
from ..types import (
    CancelFn,
    ModelOutput,
    Progress,
    ProgressFn,
    Task,
    Teacher,
    TensorData,
    never_cancel,
    no_progress,
    trim_padding,
)
from .losses import (
    FeatureProjector,
    attention_loss,
    default_layer_map,
    embedding_loss,
    hard_ce,
    kd_kl,
    kd_kl_topk,
    regression_loss,
)
from .teacher_cache import TeacherCache
from .trainer import LossFn, TrainResult, resolve_device, steps_per_epoch, target_threshold
from .trainer import train as run_training

EVAL_BATCH = 256


@dataclass
class DistillResult:
    student: nn.Module
    """The distilled student, in eval mode, on the CPU."""
    baseline: nn.Module | None
    task: str
    metrics: dict[str, dict[str, Any] | None]
    """``teacher``, ``student`` and ``baseline`` metrics on the eval split."""
    parameters: dict[str, Any]
    history: dict[str, list[dict[str, Any]]]
    train: dict[str, dict[str, Any]]
    teacher_cache: dict[str, Any]
    timings: dict[str, float]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Everything but the modules, JSON-serialisable."""
        return {
            "task": self.task,
            "metrics": self.metrics,
            "parameters": self.parameters,
            "history": self.history,
            "train": self.train,
            "teacher_cache": self.teacher_cache,
            "timings": self.timings,
            "notes": self.notes,
        }


def _check_data(task: str, teacher: Teacher, data: TensorData, name: str) -> None:
    if len(data) == 0:
        raise DatasetError(f"the {name} split has no samples")
    y = data.y
    if y is None:
        return
    if y.shape[0] != len(data):
        raise DatasetError(f"the {name} split has {len(data)} inputs but {y.shape[0]} targets")
    if task == "classification":
        if torch.is_floating_point(y) or y.ndim != 1:
            raise DatasetError(f"{name} labels must be one integer class index per sample")
        bad = ((y < 0) | (y >= teacher.output_dim)).nonzero()
        if bad.numel():
            row = int(bad[0, 0])
            raise DatasetError(
                f"{name} label {int(y[row])} is outside the teacher's {teacher.output_dim} classes", row=row
            )
    elif y.reshape(len(data), -1).shape[1] != teacher.output_dim:
        raise DatasetError(
            f"{name} targets have {y.reshape(len(data), -1).shape[1]} values per sample, "
            f"the teacher outputs {teacher.output_dim}"
        )


def _check_target(spec: DistillSpec, task: str) -> None:
    if spec.target is None:
        return
    if spec.target.metric not in TASK_METRICS[task]:
        raise SpecError(
            f"target metric {spec.target.metric!r} is not measured for {task}; "
            f"use one of {', '.join(TASK_METRICS[task])}"
        )
    target_threshold(spec.target)


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


class _TeacherRunner:
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


def _keep(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return inputs


@torch.no_grad()
def _model_outputs(model: nn.Module, inputs: dict[str, torch.Tensor], tokens: bool = False) -> torch.Tensor:
    n = next(iter(inputs.values())).shape[0]
    trim = trim_padding if tokens else _keep
    was_training = model.training
    model.eval()
    out = torch.cat(
        [
            model(**trim({k: v[lo : lo + EVAL_BATCH] for k, v in inputs.items()})).float()
            for lo in range(0, n, EVAL_BATCH)
        ]
    )
    model.train(was_training)
    return out.cpu()


Inputs = dict[str, torch.Tensor]


@contextlib.contextmanager
def _frozen_embeddings(model: nn.Module, freeze: bool) -> Iterator[None]:
    """``spec.freeze_embeddings``: the embedding tables sit out the run, trainable again after it."""
    tables = [m.weight for m in model.modules() if isinstance(m, nn.Embedding) and m.weight.requires_grad]
    for weight in tables if freeze else []:
        weight.requires_grad_(False)
    try:
        yield
    finally:
        for weight in tables if freeze else []:
            weight.requires_grad_(True)


def _noise_fn(spec: DistillSpec, data: TensorData, device: torch.device) -> Callable[[Inputs], Inputs] | None:
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


def _mixup_fn(spec: DistillSpec, data: TensorData) -> Mixer | None:
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


def _with_mixed_labels(kd: torch.Tensor, out: torch.Tensor, mixed: tuple | None, task: str,
                       alpha: float) -> torch.Tensor:
    """Under mixup, weigh in the labels of both mixed samples (λ-weighted CE), as ``alpha`` says."""
    if mixed is None or mixed[0] is None or alpha == 1.0 or task != "classification":
        return kd
    y, perm, lam = mixed
    lam = lam.to(out.device)
    ce = lam * F.cross_entropy(out, y, reduction="none") + (1 - lam) * F.cross_entropy(
        out, y[perm.to(y.device)], reduction="none")
    return alpha * kd + (1 - alpha) * ce.mean()


def _task_loss(
    task: str, spec: DistillSpec
) -> Callable[[torch.Tensor, Any, torch.Tensor | None], torch.Tensor]:
    """loss(student_output, teacher_target, labels) for the task; ``alpha`` weighs teacher vs labels."""
    a, temperature = spec.alpha, spec.temperature

    def loss(s: torch.Tensor, t: Any, y: torch.Tensor | None) -> torch.Tensor:
        if task == "classification":
            kd = kd_kl_topk(s, t[0], t[1], temperature) if isinstance(t, tuple) else kd_kl(s, t, temperature)
            return kd if y is None or a == 1.0 else a * kd + (1.0 - a) * hard_ce(s, y)
        if task == "embedding":
            return embedding_loss(s, t, spec.embedding_loss)
        to_teacher = regression_loss(s, t)
        return to_teacher if y is None or a == 1.0 else a * to_teacher + (1.0 - a) * regression_loss(s, y)

    return loss


def _baseline_loss(task: str, spec: DistillSpec, model: nn.Module) -> LossFn:
    """The same student's loss on the labels alone."""

    def loss(inputs: dict[str, torch.Tensor], y: torch.Tensor | None, _: torch.Tensor) -> torch.Tensor:
        assert y is not None
        out = model(**inputs)
        if task == "classification":
            return hard_ce(out, y)
        if task == "embedding":
            return embedding_loss(out, y, spec.embedding_loss)
        return regression_loss(out, y)

    return loss


def _probe(
    spec: DistillSpec, student: nn.Module, runner: _TeacherRunner, data: TensorData, device: torch.device
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


def _cache_plan(spec: DistillSpec, need_internals: bool) -> tuple[bool, str]:
    """Whether to cache the teacher's outputs, and why (reported)."""
    if not spec.cache_teacher:
        return False, "turned off in the spec (cache_teacher = false): the teacher runs on every batch"
    if spec.augment_noise > 0 or spec.augment_mixup > 0:
        return False, "input augmentation is on: the teacher runs on every augmented batch"
    if need_internals:
        return False, "feature / attention matching needs the teacher's hidden states on every batch"
    return True, "inputs are the same every epoch: teacher outputs computed once and reused"


def _teacher_params(teacher: Teacher) -> int:
    if teacher.num_parameters:
        return teacher.num_parameters
    return count_parameters(teacher.module) if teacher.module is not None else 0


def _train_dict(result: TrainResult) -> dict[str, Any]:
    return {k: v for k, v in result.to_dict().items() if k != "history"}


def distill(
    teacher: Teacher,
    student: nn.Module,
    train: TensorData,
    eval_data: TensorData,
    spec: DistillSpec,
    *,
    workdir: Path,
    progress: ProgressFn = no_progress,
    cancel: CancelFn = never_cancel,
    make_baseline: Callable[[], nn.Module] | None = None,
    task: Task | None = None,
    teacher_cache: TeacherCache | None = None,
    teacher_eval: torch.Tensor | None = None,
    checkpoints: bool = True,
) -> DistillResult:
    """Distil ``student`` (trained in place) from ``teacher``; evaluate teacher, student, baseline.

    ``workdir`` holds the teacher cache and the checkpoints: a rerun in the same folder
    resumes where a killed run stopped. ``make_baseline`` builds a fresh student for the
    labels-only baseline (trained when ``spec.baseline`` and the data has labels) with the
    same epochs, seed, schedule, target and time budget (the budget holds for each stage).

    A caller distilling many students from one teacher (the search) computes the teacher's
    outputs once: ``teacher_cache`` (its training-set outputs, used when the spec allows a
    cache) and ``teacher_eval`` (its eval-set outputs). ``checkpoints=False`` writes none.
    """
    started = time.perf_counter()
    task = task or teacher.task
    _check_data(task, teacher, train, "train")
    _check_data(task, teacher, eval_data, "eval")
    _check_target(spec, task)
    need_internals = spec.feature_loss != "none" or spec.attention_weight > 0
    if need_internals and teacher.module is None:
        raise SpecError(
            "feature / attention matching needs a PyTorch teacher; this teacher is a black box "
            f"({teacher.kind}): set feature_loss to 'none' and attention_weight to 0"
        )
    device = resolve_device(spec.device)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    notes: list[str] = []
    first = None if teacher.module is None else next(teacher.module.parameters(), None)
    home = None if first is None else first.device
    if teacher.module is not None:
        teacher.module.to(device)
    try:
        runner = _TeacherRunner(teacher, device)
        student.to(device)
        projector, attn_map = _probe(spec, student, runner, train, device)

        # --- the teacher cache ----------------------------------------------------------
        total = steps_per_epoch(len(train), min(spec.batch_size, len(train))) * spec.epochs
        cache: TeacherCache | None = None
        use_cache, reason = _cache_plan(spec, need_internals)
        if use_cache and teacher_cache is not None:
            cache = teacher_cache.to(device)
            reason += " (shared: computed once for every student of this run)"
        elif use_cache:
            progress(Progress("distill", 0, total, message="caching teacher outputs"))
            t0 = time.perf_counter()
            cache = TeacherCache.build(
                teacher, train, batch_size=max(spec.batch_size, EVAL_BATCH), top_k=spec.top_k,
                path=workdir / "teacher_cache.safetensors", device=device, cancel=cancel,
            ).to(device)  # fmt: skip
            timings["teacher_cache_s"] = time.perf_counter() - t0
            if cache.reused:
                reason += " (reused the cache of an earlier attempt)"

        # --- evaluation -----------------------------------------------------------------
        tokens = train.input_kind == "tokens"
        t0 = time.perf_counter()
        eval_inputs = {k: v.to(device) for k, v in eval_data.inputs.items()}
        teacher_eval = runner.all_outputs(eval_data) if teacher_eval is None else teacher_eval.float().cpu()
        teacher_metrics = evaluate_outputs(task, teacher_eval, eval_data.y, teacher_eval)
        timings["teacher_eval_s"] = time.perf_counter() - t0
        metric = primary_metric(task)

        def evaluator(model: nn.Module) -> Callable[[], dict[str, Any]]:
            return lambda: evaluate_outputs(
                task, _model_outputs(model, eval_inputs, tokens), eval_data.y, teacher_eval
            )

        # --- distillation ---------------------------------------------------------------
        add_noise = _noise_fn(spec, train, device)
        trim = trim_padding if tokens else _keep
        mixup = _mixup_fn(spec, train)
        task_loss = _task_loss(task, spec)
        fw, aw = spec.feature_weight, spec.attention_weight

        def kd_loss(
            inputs: dict[str, torch.Tensor], y: torch.Tensor | None, idx: torch.Tensor
        ) -> torch.Tensor:
            if add_noise is not None:
                inputs = add_noise(inputs)
            mixed = None
            if mixup is not None:  # the teacher labels the mixed inputs; labels enter as a mixed CE
                inputs, perm, lam = mixup(inputs)
                mixed, y = (y, perm, lam), None
            if not need_internals:  # an ONNX teacher may need the padded length: it gets the batch as is
                target = cache.targets(idx) if cache is not None else runner.outputs(inputs)
                out = student(**trim(inputs))
                return _with_mixed_labels(task_loss(out, target, y), out, mixed, task, spec.alpha)
            inputs = trim(inputs)
            s_out, t_out = student.forward_features(**inputs), runner.features(inputs)
            loss = _with_mixed_labels(task_loss(s_out.output, t_out.output.float(), y), s_out.output, mixed,
                                      task, spec.alpha)
            if projector is not None:
                loss = loss + fw * projector(s_out.hidden, t_out.hidden)
            if attn_map is not None:
                loss = loss + aw * attention_loss(s_out.attentions, t_out.attentions, attn_map)
            return loss

        t0 = time.perf_counter()
        with _frozen_embeddings(student, spec.freeze_embeddings):
            student_run = run_training(
                student, projector, train, kd_loss, spec, stage="distill", evaluate_fn=evaluator(student),
                metric=metric, progress=progress, cancel=cancel, device=device,
                checkpoint_dir=workdir / "checkpoints" / "distill" if checkpoints else None,
            )  # fmt: skip
        timings["distill_s"] = time.perf_counter() - t0

        # --- the labels-only baseline ---------------------------------------------------
        baseline: nn.Module | None = None
        baseline_run: TrainResult | None = None
        if spec.baseline and not train.labelled:
            notes.append("no labels in the training data: no labels-only baseline")
        elif spec.baseline and make_baseline is None:
            notes.append("no baseline student factory given: no labels-only baseline")
        elif spec.baseline:
            assert make_baseline is not None
            torch.manual_seed(spec.seed)
            model = make_baseline().to(device)
            t0 = time.perf_counter()
            with _frozen_embeddings(model, spec.freeze_embeddings):
                baseline_run = run_training(
                    model, None, train, _baseline_loss(task, spec, model), spec, stage="baseline",
                    evaluate_fn=evaluator(model), metric=metric, progress=progress, cancel=cancel,
                    checkpoint_dir=workdir / "checkpoints" / "baseline" if checkpoints else None, device=device,
                )  # fmt: skip
            timings["baseline_s"] = time.perf_counter() - t0
            baseline = model

        # --- final metrics (float32, no autocast) ---------------------------------------
        t0 = time.perf_counter()
        metrics: dict[str, dict[str, Any] | None] = {
            "teacher": teacher_metrics,
            "student": evaluate_outputs(
                task, _model_outputs(student, eval_inputs, tokens), eval_data.y, teacher_eval
            ),
            "baseline": None
            if baseline is None
            else evaluate_outputs(
                task, _model_outputs(baseline, eval_inputs, tokens), eval_data.y, teacher_eval
            ),
        }
        timings["evaluate_s"] = time.perf_counter() - t0 + timings.pop("teacher_eval_s")
    finally:
        if teacher.module is not None and home is not None:
            teacher.module.to(home)

    student.to("cpu").eval()
    if baseline is not None:
        baseline.to("cpu").eval()
    n_teacher, n_student = _teacher_params(teacher), count_parameters(student)
    epochs_run = student_run.steps / steps_per_epoch(len(train), min(spec.batch_size, len(train)))
    timings["total_s"] = time.perf_counter() - started
    return DistillResult(
        student=student,
        baseline=baseline,
        task=task,
        metrics=metrics,
        parameters={
            "teacher": n_teacher,
            "student": n_student,
            "baseline": None if baseline is None else count_parameters(baseline),
            "ratio": n_student / n_teacher if n_teacher else None,
        },
        history={
            "student": student_run.history,
            "baseline": None if baseline_run is None else baseline_run.history,
        },
        train={
            "student": _train_dict(student_run),
            "baseline": None if baseline_run is None else _train_dict(baseline_run),
        },
        teacher_cache={
            "used": cache is not None,
            "reason": reason,
            "top_k": None if cache is None else cache.top_k,
            "build_s": None if cache is None else cache.seconds_to_build,
            "bytes": None if cache is None else cache.bytes,
            "reused": None if cache is None else cache.reused,
            "saved_s_estimate": None
            if cache is None
            else max(0.0, epochs_run - 1.0) * cache.seconds_to_build,
        },
        timings=timings,
        notes=notes,
    )
