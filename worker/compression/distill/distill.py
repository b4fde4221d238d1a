"""Knowledge distillation of a student from a teacher, with a labels-only baseline beside it.

The loss follows the task: soft-target KD (+ hard labels) for classification, cosine / MSE
to the teacher's embedding, MSE to the teacher's values (+ labels) for regression; plus
optional feature and attention matching. Teacher outputs are cached once when nothing
makes them differ between epochs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DatasetError, SpecError
from ..fields import monitored_metric
from ..measure.metrics import TASK_METRICS, evaluate_outputs, primary_metric
from ..spec import DistillSpec
from ..students.zoo import count_parameters
from ..types import (
    CancelFn,
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
    IGNORE_INDEX,
    attention_loss,
)
from .objective import (
    EVAL_BATCH,
    TeacherRunner,
    baseline_loss_fn,
    cache_plan,
    frozen_embeddings,
    mixup_fn,
    noise_fn,
    probe,
    task_loss_fn,
    with_mixed_labels,
)
from .teacher_cache import TeacherCache
from .trainer import TrainResult, resolve_device, steps_per_epoch, target_threshold
from .trainer import train as run_training


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
    if task == "token_classification":
        ids = data.inputs.get("input_ids")
        if torch.is_floating_point(y) or ids is None or y.shape != ids.shape:
            raise DatasetError(f"{name} labels must be one tag index (or -100) per token")
        bad = ((y != IGNORE_INDEX) & ((y < 0) | (y >= teacher.output_dim))).nonzero()
        if bad.numel():
            raise DatasetError(f"{name} tag index {int(y[tuple(bad[0])])} is outside the teacher's "
                               f"{teacher.output_dim} tags", row=int(bad[0, 0]))
    elif task == "classification":
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
            pad_tokens_back(model(**trim({k: v[lo : lo + EVAL_BATCH] for k, v in inputs.items()})).float(),
                            inputs, tokens)
            for lo in range(0, n, EVAL_BATCH)
        ]
    )
    model.train(was_training)
    return out.cpu()


def pad_tokens_back(out: torch.Tensor, inputs: dict[str, torch.Tensor], tokens: bool) -> torch.Tensor:
    """Per-token outputs ``(B, T', C)`` of a trimmed batch padded back to the data's length (zeros), so
    batches of different trimmed lengths line up; other outputs come back as they are."""
    ids = inputs.get("input_ids")
    if not tokens or out.ndim != 3 or ids is None or out.shape[1] >= ids.shape[1]:
        return out
    return F.pad(out, (0, 0, 0, ids.shape[1] - out.shape[1]))


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
    spec = with_min_steps(spec, len(train), teacher.input_kind)
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
        runner = TeacherRunner(teacher, device)
        student.to(device)
        projector, attn_map = probe(spec, student, runner, train, device)

        # --- the teacher cache ----------------------------------------------------------
        total = steps_per_epoch(len(train), min(spec.batch_size, len(train))) * spec.epochs
        cache: TeacherCache | None = None
        use_cache, reason = cache_plan(spec, need_internals)
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
        teacher_metrics = evaluate_outputs(task, teacher_eval, eval_data.y, teacher_eval, eval_data.classes)
        timings["teacher_eval_s"] = time.perf_counter() - t0
        metric = monitored_metric(task, eval_data.meta, primary_metric(task))
        if metric not in teacher_metrics:  # AUC needs both classes among the eval labels
            metric = primary_metric(task)

        def evaluator(model: nn.Module) -> Callable[[], dict[str, Any]]:
            return lambda: evaluate_outputs(
                task, _model_outputs(model, eval_inputs, tokens), eval_data.y, teacher_eval, eval_data.classes
            )

        # --- distillation ---------------------------------------------------------------
        add_noise = noise_fn(spec, train, device)
        trim = trim_padding if tokens else _keep
        mixup = mixup_fn(spec, train)
        task_loss = task_loss_fn(task, spec)
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
                return with_mixed_labels(task_loss(out, target, y), out, mixed, task, spec.alpha)
            inputs = trim(inputs)
            s_out, t_out = student.forward_features(**inputs), runner.features(inputs)
            loss = with_mixed_labels(task_loss(s_out.output, t_out.output.float(), y), s_out.output, mixed,
                                      task, spec.alpha)
            if projector is not None:
                loss = loss + fw * projector(s_out.hidden, t_out.hidden)
            if attn_map is not None:
                loss = loss + aw * attention_loss(s_out.attentions, t_out.attentions, attn_map)
            return loss

        t0 = time.perf_counter()
        with frozen_embeddings(student, spec.freeze_embeddings):
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
            with frozen_embeddings(model, spec.freeze_embeddings):
                baseline_run = run_training(
                    model, None, train, baseline_loss_fn(task, spec, model), spec, stage="baseline",
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
                task, _model_outputs(student, eval_inputs, tokens), eval_data.y, teacher_eval, eval_data.classes
            ),
            "baseline": None
            if baseline is None
            else evaluate_outputs(
                task, _model_outputs(baseline, eval_inputs, tokens), eval_data.y, teacher_eval, eval_data.classes
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


def with_min_steps(spec: DistillSpec, rows: int, input_kind: str) -> DistillSpec:
    """``spec`` with its epochs raised to reach ``spec.min_steps`` on ``rows`` training rows (at most
    10× the epochs asked for); transformers (token inputs) train the epochs they were given."""
    if spec.min_steps is None or input_kind == "tokens" or rows <= 0:
        return spec
    per_epoch = steps_per_epoch(rows, min(spec.batch_size, rows))
    epochs = min(max(spec.epochs, -(-spec.min_steps // per_epoch)), 10 * spec.epochs, 10_000)
    return spec if epochs == spec.epochs else spec.model_copy(update={"epochs": epochs})
