"""Before any training: does the teacher mean what the labels mean?

The teacher is scored on a labelled sample of the evaluation split. A teacher at or below chance
(a classifier no better than always answering the commonest class, a regressor no better than the
targets' mean) is not distilled: the job fails ``teacher_disagrees_with_labels`` at once, instead
of delivering a student of a teacher that is wrong about this data. When a reordering of the class
labels explains the teacher (its predictions matched to the labels, scipy's linear assignment), the
error names the order that fits, and how to give it.

For images whose scale was not given (``image_scale: auto``), the teacher is scored under each
common pixel scale and the one it agrees with best is kept: a teacher trained on pixels in [0, 1]
scores 0.96 there and 0.85 on [-1, 1] (seen). The choice is the job's, and is recorded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from ..errors import InputError
from ..io.data_images import IMAGE_SCALES
from ..types import Teacher, TensorData
from .entities import IGNORE
from .metrics import accuracy, click_metrics, r2

SAMPLE = 512
BATCH = 256


class TeacherDisagreesError(InputError):
    code = "teacher_disagrees_with_labels"


@dataclass
class TeacherCheck:
    task: str
    samples: int
    metric: str
    value: float
    chance: float
    passed: bool
    detail: str = ""
    image_scale: dict[str, Any] = field(default_factory=dict)
    """For images: the scale chosen and each scale's score."""

    def to_dict(self) -> dict[str, Any]:
        out = {"task": self.task, "samples": self.samples, "metric": self.metric, "value": round(self.value, 6),
               "chance": round(self.chance, 6), "passed": self.passed, "detail": self.detail}
        if self.image_scale:
            out["image_scale"] = self.image_scale
        return out


def _predict(teacher: Teacher, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    n = next(iter(inputs.values())).shape[0]
    parts = [teacher.predict({k: v[i:i + BATCH] for k, v in inputs.items()}) for i in range(0, n, BATCH)]
    return torch.cat(parts).float()


def _sample(data: TensorData) -> TensorData:
    if len(data) <= SAMPLE:
        return data
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:SAMPLE]
    return data.subset(idx)


def _margin(chance: float, n: int) -> float:
    """Two standard errors of an accuracy at ``chance`` on ``n`` samples (and at least 2 points)."""
    return max(0.02, 2 * math.sqrt(max(chance * (1 - chance), 1e-9) / max(n, 1)))


def check_teacher(teacher: Teacher, train: TensorData, evald: TensorData, task: str,
                  image_scale: str = "0-1") -> tuple[TeacherCheck | None, TensorData, TensorData]:
    """Score the teacher on labelled eval rows (raises `TeacherDisagreesError` when it is at chance);
    for images with ``image_scale`` ``auto``, rescale train and eval to the scale it agrees with best.
    None when there is nothing to check (no labels, or an embedding teacher)."""
    if evald.y is None or task not in ("classification", "regression", "token_classification"):
        return None, train, evald
    sample = _sample(evald)
    if task == "token_classification":  # the tags of the labelled words against the commonest tag
        outputs, mask = _predict(teacher, sample.inputs), sample.y != IGNORE
        check = _classification(outputs[mask], replace(sample, y=sample.y[mask]))
        check.task, check.metric = task, "token_accuracy"
        if not check.passed:
            raise TeacherDisagreesError(check.detail.replace("accuracy", "token accuracy", 1)
                                        .replace("labelled evaluation rows", "tagged evaluation words", 1)
                                        .replace("the commonest class", "the commonest tag", 1))
        return check, train, evald
    scales: dict[str, float] = {}
    raw = sample  # as read, before any image scale is chosen
    decoded = evald.meta.get("image_scale", "0-1") == "0-1"  # not normalised yet (no mean/std given or known)
    if task == "classification" and evald.input_kind == "image" and image_scale == "auto" and decoded:
        channels = sample.inputs["x"].shape[1]
        for name, (mean, std) in IMAGE_SCALES.items():
            if name == "imagenet" and channels != 3:
                continue
            pred = _predict(teacher, {"x": _rescale(sample.inputs["x"], mean, std)}).argmax(-1)
            scales[name] = accuracy(pred, sample.y)
        best = max(scales, key=lambda k: (scales[k], k == "0-1"))
        mean, std = IMAGE_SCALES[best]
        train, evald = _rescaled(train, mean, std, best), _rescaled(evald, mean, std, best)
        sample = _sample(evald)
    outputs = _predict(teacher, sample.inputs)
    if task == "classification" and sample.meta.get("field") == "ctr" and outputs.shape[-1] in (1, 2):
        check = _clicks(outputs, sample)
    else:
        check = _classification(outputs, sample) if task == "classification" else _regression(outputs, sample)
    if scales:
        check.image_scale = {"chosen": best, "accuracy_by_scale": {k: round(v, 4) for k, v in scales.items()}}
    hint = _scale_hint(teacher, raw, check) if check.metric == "accuracy" else ""
    if hint:
        check.detail = f"{check.detail}; {hint}" if check.detail else hint
        evald.meta["input_scale_hint"] = hint  # for the verdict (`deliver.evidence`)
    if not check.passed:
        raise TeacherDisagreesError(check.detail)
    return check, train, evald


def _scale_hint(teacher: Teacher, sample: TensorData, check: TeacherCheck) -> str:
    """For inputs of raw 0–255 values (`io.data_arrays.value_range`): the teacher scored on them divided
    by 255 too; a hint to divide when it scores clearly better that way than as the job feeds them (it
    may have trained on 0–1)."""
    if sample.meta.get("value_range") != "0-255" or set(sample.inputs) != {"x"}:
        return ""
    scaled = accuracy(_predict(teacher, {"x": sample.inputs["x"] / 255}).argmax(-1), sample.y.long())
    if scaled <= check.value + _margin(check.chance, check.samples):
        return ""
    return (f"the inputs range 0–255 and the teacher scores accuracy {scaled:.3f} on them divided by 255 "
            f"({check.value:.3f} as they are fed to it): it may expect inputs in 0–1; divide x by 255 and upload again")


def _rescale(x: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype).reshape(-1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).reshape(-1, 1, 1)
    return (x - m) / s


def _rescaled(data: TensorData, mean: list[float], std: list[float], name: str) -> TensorData:
    """Images decoded to [0, 1] (``image_scale`` auto), brought to ``name``'s scale."""
    meta = {**data.meta, "image_scale": name, "image_mean": list(mean), "image_std": list(std)}
    return replace(data, inputs={"x": _rescale(data.inputs["x"], mean, std)}, meta=meta)


def _classification(outputs: torch.Tensor, sample: TensorData) -> TeacherCheck:
    y = sample.y.long()
    n, k = len(y), outputs.shape[-1]
    pred = outputs.argmax(-1)
    value = accuracy(pred, y)
    counts = torch.bincount(y, minlength=k).double()
    chance = max(counts.max().item() / n, 1.0 / max(int((counts > 0).sum().item()), 1))
    passed = value > chance + _margin(chance, n)
    check = TeacherCheck("classification", n, "accuracy", value, chance, passed)
    if passed:
        return check
    names = sample.classes or [str(i) for i in range(max(k, int(y.max()) + 1))]
    detail = (f"the teacher scores accuracy {value:.3f} on {n} labelled evaluation rows, no better than chance "
              f"({chance:.3f}: always answering the commonest class); it does not predict these labels")
    order, permuted = _order_that_fits(pred, y, k, names)
    if order is not None and permuted > chance + _margin(chance, n):
        detail += (f". Its outputs match the labels in this order: {order} (accuracy {permuted:.3f} that way); "
                   f"give the classes in that order (data.classes, at upload or in the job)")
    else:
        detail += "; check the label column, the class order, and the input preprocessing"
    check.detail = detail
    return check


def _clicks(outputs: torch.Tensor, sample: TensorData) -> TeacherCheck:
    """Click data (rare positives: accuracy says little): the teacher's AUC against 0.5, past two standard
    errors of an AUC at chance (Mann-Whitney) and at least 0.02."""
    y = sample.y.long()
    n_pos = int((y == 1).sum())
    n_neg = len(y) - n_pos
    value = click_metrics(outputs, y).get("auc")
    if value is None:
        return TeacherCheck("classification", len(y), "auc", float("nan"), 0.5, True,
                            "the sample holds one class only: AUC not checked")
    margin = max(0.02, 2 * math.sqrt((len(y) + 1) / (12 * n_pos * n_neg)))
    check = TeacherCheck("classification", len(y), "auc", value, 0.5, value > 0.5 + margin)
    if not check.passed:
        check.detail = (f"the teacher scores AUC {value:.3f} on {len(y)} labelled evaluation rows, no better than "
                        "chance (0.5); it does not rank these clicks")
        check.detail += ("; it ranks them backwards: give the classes in the other order (data.classes)"
                         if value < 0.5 - margin else "; check the label column and the categorical columns")
    return check


def _order_that_fits(pred: torch.Tensor, y: torch.Tensor, k: int, names: list[str]) -> tuple[list[str] | None, float]:
    """The label names in the teacher's output order that best explain its predictions, and the
    accuracy under that order."""
    size = max(k, len(names), int(y.max()) + 1, int(pred.max()) + 1)
    confusion = np.zeros((size, size))
    np.add.at(confusion, (y.numpy(), pred.numpy()), 1)
    rows, cols = linear_sum_assignment(-confusion)  # label i → teacher output cols[i]
    fitted = confusion[rows, cols].sum() / len(y)
    by_output = {int(c): int(r) for r, c in zip(rows, cols)}
    if any(by_output.get(j, len(names)) >= len(names) for j in range(k)):
        return None, float(fitted)
    return [names[by_output[j]] for j in range(k)], float(fitted)


def _regression(outputs: torch.Tensor, sample: TensorData) -> TeacherCheck:
    y = sample.y.float().reshape(len(sample.y), -1)
    out = outputs.reshape(len(outputs), -1)
    if out.shape[1] != y.shape[1]:
        return TeacherCheck("regression", len(y), "r2", float("nan"), 0.0, False,
                            f"the teacher answers {out.shape[1]} value(s) per row but the targets have {y.shape[1]}")
    value = r2(out, y)
    check = TeacherCheck("regression", len(y), "r2", value, 0.0, value > 0.0)
    if not check.passed:
        fit = np.corrcoef(out[:, 0].numpy(), y[:, 0].numpy())[0, 1] if len(y) > 2 else float("nan")
        check.detail = (f"the teacher's predictions score R² {value:.3f} against the {len(y)} labelled evaluation "
                        "targets: no better than predicting their mean")
        if np.isfinite(fit) and abs(fit) > 0.8:
            ratio = float(y[:, 0].std() / max(out[:, 0].std().item(), 1e-12))
            check.detail += (f"; yet they follow the targets (correlation {fit:.2f}), so the targets are likely on "
                             f"another scale or offset than the teacher's outputs (about ×{ratio:.3g})")
        else:
            check.detail += "; check the target column and the teacher's task"
    return check
