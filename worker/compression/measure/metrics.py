"""Task metrics on whole eval sets (small torch implementations: no sklearn at runtime)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..errors import SpecError
from ..spec.base import LOWER_IS_BETTER
from ..types import Task
from .entities import ENTITY_METRICS, entity_metrics

TASK_METRICS: dict[str, tuple[str, ...]] = {
    "classification": ("accuracy", "macro_f1", "auc", "log_loss"),
    "embedding": ("cosine", "mse"),
    "regression": ("mse", "mae", "r2"),
    "token_classification": ENTITY_METRICS,
}


def primary_metric(task: Task | str) -> str:
    """The metric early stopping and reports lead with."""
    return {"classification": "accuracy", "embedding": "cosine", "regression": "mse",
            "token_classification": "entity_f1"}[task]


def higher_is_better(metric: str) -> bool:
    return metric not in LOWER_IS_BETTER


def accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of predicted class indices equal to ``y``."""
    return (pred.long() == y.long()).double().mean().item()


def _counts(pred: torch.Tensor, y: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, ...]:
    pred, y = pred.long().cpu(), y.long().cpu()
    tp = torch.bincount(y[pred == y], minlength=num_classes).double()
    predicted = torch.bincount(pred, minlength=num_classes).double()
    support = torch.bincount(y, minlength=num_classes).double()
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), 0.0)
    recall = torch.where(support > 0, tp / support.clamp(min=1), 0.0)
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-300), 0.0)
    return precision, recall, f1, support, predicted


def macro_f1(pred: torch.Tensor, y: torch.Tensor) -> float:
    """Unweighted mean F1 over the classes present in ``y`` or ``pred`` (as scikit-learn)."""
    n = int(max(pred.max().item(), y.max().item())) + 1
    _, _, f1, support, predicted = _counts(pred, y, n)
    present = (support > 0) | (predicted > 0)
    return f1[present].mean().item()


def per_class(
    pred: torch.Tensor, y: torch.Tensor, num_classes: int, classes: list[str] | None = None
) -> list[dict[str, Any]]:
    """Precision, recall, F1 and support for every class index below ``num_classes``."""
    precision, recall, f1, support, _ = _counts(pred, y, num_classes)
    names = (
        classes
        if classes is not None and len(classes) == num_classes
        else [str(i) for i in range(num_classes)]
    )
    return [
        {
            "class": names[i],
            "precision": precision[i].item(),
            "recall": recall[i].item(),
            "f1": f1[i].item(),
            "support": int(support[i].item()),
        }
        for i in range(num_classes)
    ]


def binary_auc(scores: torch.Tensor, y: torch.Tensor) -> float | None:
    """ROC AUC of ``scores`` for labels 0 / 1 (the Mann-Whitney statistic, ties counting half, as
    scikit-learn's ``roc_auc_score``); None when either class is absent."""
    y = y.long().reshape(-1).cpu()
    positive = y == 1
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    _, inverse, counts = torch.unique(scores.double().reshape(-1).cpu(), return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    ranks = ((ends - counts + 1 + ends) / 2)[inverse]  # 1-based, ties share their mean rank
    return ((ranks[positive].sum().item() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def click_metrics(outputs: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """AUC and log-loss (natural log, mean over samples) of binary logits: 2 softmax logits (class 1 is the
    click) or 1 sigmoid logit; {} for other outputs or labels other than 0 / 1."""
    outputs, y = outputs.double().reshape(len(outputs), -1), y.long().reshape(-1)
    if outputs.shape[1] not in (1, 2) or y.min() < 0 or y.max() > 1:
        return {}
    if outputs.shape[1] == 2:
        score = outputs[:, 1] - outputs[:, 0]
        loss = F.cross_entropy(outputs, y).item()
    else:
        score = outputs[:, 0]
        loss = F.binary_cross_entropy_with_logits(score, y.double()).item()
    auc = binary_auc(score, y)
    return {"log_loss": loss} if auc is None else {"auc": auc, "log_loss": loss}


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean per-sample cosine similarity."""
    return F.cosine_similarity(a.double().flatten(1), b.double().flatten(1), dim=1).mean().item()


def mse(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean squared error; a ``(N,)`` target is matched against ``(N, 1)`` predictions."""
    pred = pred.double()
    return F.mse_loss(pred, target.double().reshape(pred.shape)).item()


def mae(pred: torch.Tensor, target: torch.Tensor) -> float:
    pred = pred.double()
    return F.l1_loss(pred, target.double().reshape(pred.shape)).item()


def r2(pred: torch.Tensor, target: torch.Tensor) -> float:
    """1 − residual / total sum of squares (over every output): 0 is what predicting the mean scores."""
    pred = pred.double()
    target = target.double().reshape(pred.shape)
    total = ((target - target.mean(0)) ** 2).sum().item()
    residual = ((target - pred) ** 2).sum().item()
    return 1.0 - residual / total if total > 0 else (1.0 if residual == 0 else 0.0)


def evaluate_outputs(
    task: Task | str, outputs: torch.Tensor, y: torch.Tensor | None, teacher_outputs: torch.Tensor | None,
    classes: list[str] | None = None,
) -> dict[str, Any]:
    """Metrics of one model's eval-set outputs.

    ``reference`` says what they were measured against: the labels when there are any,
    else the teacher (argmax agreement reported as ``accuracy``, for unlabelled data).
    Embeddings are always compared with the teacher's. Token classification (entity F1, `entities`)
    needs the labels and the tag names ``classes``.
    """
    outputs = outputs.detach().float().cpu()
    teacher = None if teacher_outputs is None else teacher_outputs.detach().float().cpu()
    if task == "classification":
        pred = outputs.argmax(-1)
        t_pred = None if teacher is None else teacher.argmax(-1)
        ref = y.cpu() if y is not None else t_pred
        if ref is None:
            raise SpecError("classification metrics need labels or teacher outputs")
        out: dict[str, Any] = {
            "reference": "labels" if y is not None else "teacher",
            "accuracy": accuracy(pred, ref),
            "macro_f1": macro_f1(pred, ref),
        }
        if y is not None and t_pred is not None:
            out["teacher_agreement"] = accuracy(pred, t_pred)
        if y is not None:
            out.update(click_metrics(outputs, y.cpu()))
        return out
    if task == "token_classification":
        if y is None:
            raise SpecError("token classification metrics need the tags (labels)")
        return entity_metrics(outputs, y.cpu(), classes, teacher)
    if task == "embedding":
        if teacher is None:
            raise SpecError("embedding metrics need the teacher's embeddings")
        return {"reference": "teacher", "cosine": mean_cosine(outputs, teacher), "mse": mse(outputs, teacher)}
    if task == "regression":
        ref = y.cpu() if y is not None else teacher
        if ref is None:
            raise SpecError("regression metrics need labels or teacher outputs")
        return {"reference": "labels" if y is not None else "teacher", "mse": mse(outputs, ref),
                "mae": mae(outputs, ref), "r2": r2(outputs, ref)}
    raise SpecError(f"unknown task {task!r}")


def paired_drop_noise(metric: str, task: Task | str, teacher: torch.Tensor | None, student: torch.Tensor | None,
                      y: torch.Tensor | None) -> float | None:
    """The standard error of the student's drop from the teacher on the same eval rows, in the units
    of ``measure.verdict.drop`` (points of accuracy; a fraction of the teacher's MSE or MAE), from the
    per-row differences: on 66 rows a 15 % higher MSE can be three rows; log-loss as MSE. None where the
    metric has no per-row form here (F1, R², cosine, AUC) or there are no labels."""
    if teacher is None or student is None or y is None or len(y) < 2:
        return None
    t, s = teacher.detach().double().cpu(), student.detach().double().cpu()
    if task == "classification" and metric == "accuracy":
        ref = y.cpu()
        diff = (t.argmax(-1) == ref).double() - (s.argmax(-1) == ref).double()
        return (diff.std() / len(diff) ** 0.5).item()
    if task == "regression" and metric in ("mse", "mae"):
        ref = y.double().cpu().reshape(t.shape)
        power = 2 if metric == "mse" else 1
        per_t = (t - ref).abs().pow(power).reshape(len(t), -1).mean(1)
        per_s = (s.reshape(t.shape) - ref).abs().pow(power).reshape(len(t), -1).mean(1)
        return _relative_se(per_t, per_s)
    if task == "classification" and metric == "log_loss" and t.ndim == 2 and t.shape[-1] == 2:
        ref = y.long().cpu()
        return _relative_se(F.cross_entropy(t, ref, reduction="none"),
                            F.cross_entropy(s.reshape(t.shape), ref, reduction="none"))
    return None


def _relative_se(per_t: torch.Tensor, per_s: torch.Tensor) -> float | None:
    """The standard error of the mean per-row loss difference, as a fraction of the teacher's mean loss."""
    scale = per_t.mean().item()
    return ((per_s - per_t).std() / len(per_t) ** 0.5).item() / scale if scale > 0 else None
