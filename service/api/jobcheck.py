"""Checks a job spec against the validated uploads before anything is queued.

Pure functions over the upload summaries (what the workers recorded at validation), so
the API answers "this cannot work" with a 422 and a pointer instead of a failed job. What the
spec alone decides (fields, their ranges, how they combine) is the spec's own validation
(`worker.compression.spec`), in one place; only what needs the uploads is checked here.
"""

from __future__ import annotations

import math
from typing import Any

from worker.compression.spec import LOWER_IS_BETTER, CompressSpec

from .problems import FieldError

BLACK_BOX_KINDS = ("onnx", "torchscript", "exported_program")
"""Teachers that give outputs only: ONNX graphs, and code checkpoints run in the sandbox."""
METRIC_TASKS = {
    "accuracy": {"classification"},
    "macro_f1": {"classification"},
    "cosine": {"embedding"},
    "mse": {"regression", "embedding"},
    "mae": {"regression"},
    "auc": {"classification"},
    "log_loss": {"classification"},
    "entity_f1": {"token_classification"},
}
BINARY_METRICS = ("auc", "log_loss")
"""Measured for labels of two classes only (`worker.compression.measure.metrics.click_metrics`)."""


def check_job(
    spec: CompressSpec,
    teacher: dict[str, Any],
    dataset: dict[str, Any],
    eval_dataset: dict[str, Any] | None = None,
) -> list[FieldError]:
    """Problems with running ``spec`` on these uploads (empty when it fits together)."""
    errors: list[FieldError] = []

    def bad(pointer: str, detail: str) -> None:
        errors.append(FieldError(pointer=pointer, detail=detail))

    teacher_task = teacher.get("task")
    task = spec.task or teacher_task
    errors += _task_errors(spec.task, teacher, dataset)

    teacher_input = teacher.get("input_kind")
    for pointer, summary in (("#/dataset_id", dataset), ("#/eval_dataset_id", eval_dataset)):
        kind = (summary or {}).get("input_kind")
        windows = (summary or {}).get("field") == "forecasting"  # (C, L) windows fit flat or time-major teachers
        if kind and teacher_input and kind != teacher_input and not windows:
            bad(pointer, f"the dataset holds {kind} inputs but the teacher takes {teacher_input} inputs")

    for pointer, summary in (("#/dataset_id", dataset), ("#/eval_dataset_id", eval_dataset)):
        if summary is not None:
            errors += _shape_errors(pointer, teacher, summary)
            if task in ("classification", "token_classification"):
                errors += _class_errors(pointer, spec, teacher, summary)
    if teacher_input == "tokens" and teacher.get("input_shape") and spec.data.max_length > teacher["input_shape"][0]:
        bad("#/data/max_length", f"the teacher reads at most {teacher['input_shape'][0]} tokens; "
                                 f"data.max_length is {spec.data.max_length}")

    black_box = teacher.get("kind") in BLACK_BOX_KINDS
    student = spec.student
    if student is not None and student.kind == "derived" and black_box:
        bad(
            "#/student/kind",
            "a derived student copies the teacher's layers, but an ONNX teacher is a "
            "black box: use 'auto' or 'zoo'",
        )
    if student is not None and student.kind == "hf_config" and teacher_input not in (None, "tokens"):
        bad(
            "#/student/kind",
            f"an hf_config student takes tokens, but the teacher takes {teacher_input} inputs",
        )

    distil = spec.distillation
    if student is not None and black_box and distil.feature_loss != "none":
        bad(
            "#/distillation/feature_loss",
            "feature matching needs the teacher's hidden states, which an ONNX teacher does not expose",
        )
    if student is not None and distil.attention_weight > 0 and (black_box or teacher_input != "tokens"):
        bad("#/distillation/attention_weight", "attention matching needs a transformer teacher with weights")
    if distil.target is not None and task and task not in METRIC_TASKS[distil.target.metric]:
        bad("#/distillation/target/metric", f"{distil.target.metric} does not measure a {task} model")
    errors += _field_errors(spec, task, teacher, dataset)

    errors += _search_errors(spec, task, dataset)

    return errors


PRIMARY_METRIC = {"classification": "accuracy", "embedding": "cosine", "regression": "mse",
                  "token_classification": "entity_f1"}


def _search_errors(spec: CompressSpec, task: str | None, dataset: dict[str, Any] | None = None) -> list[FieldError]:
    """A search's targets against the teacher's task (the spec checked the rest on its own).

    A latency cap at a batch size outside ``evaluation.latency_batch_sizes`` is fine: the search
    measures that batch size too.
    """
    targets = spec.targets
    if task == "token_classification" and spec.student is not None and spec.student.kind == "search":
        return [FieldError(pointer="#/student/kind", detail="a search over token classification (NER) students "
                                                            "is not supported yet: use student kind 'derived' or 'auto'")]
    if targets is None or not task:
        return []
    metric = targets.metric or PRIMARY_METRIC.get(task)
    if metric is None:
        return []
    if task not in METRIC_TASKS[metric]:
        return [FieldError(pointer="#/targets/metric", detail=f"{metric} does not measure a {task} model; "
                           f"use one of {', '.join(m for m, tasks in METRIC_TASKS.items() if task in tasks)}")]
    if metric in BINARY_METRICS and dataset is not None and dataset.get("num_classes", 2) != 2:
        return [FieldError(pointer="#/targets/metric", detail=f"{metric} measures binary (click) labels; the dataset "
                           f"has {dataset.get('num_classes')} classes")]
    lower = metric in LOWER_IS_BETTER
    if lower and targets.min is not None:
        return [FieldError(pointer="#/targets/min",
                           detail=f"the target metric {metric} is lower-is-better: give 'max' (a ceiling)")]
    if not lower and targets.max is not None:
        return [FieldError(pointer="#/targets/max",
                           detail=f"the target metric {metric} is higher-is-better: give 'min' (a floor)")]
    return []


def _field_errors(spec: CompressSpec, task: str | None, teacher: dict[str, Any],
                  dataset: dict[str, Any]) -> list[FieldError]:
    """A field of use against the teacher: forecasts are values, a policy's outputs fit its action space."""
    field, errors = spec.data.task, []
    if field == "forecasting" and task and task != "regression":
        errors.append(FieldError(pointer="#/data/task", detail=f"a forecaster outputs values, but the teacher is a "
                                                               f"{task} model (its upload's guess for an ONNX graph): "
                                                               "add \"task\": \"regression\" to the job"))
    horizon, targets = dataset.get("horizon"), dataset.get("target_columns")
    outputs = teacher.get("output_dim")
    columns = targets if isinstance(targets, list) else str(targets or "").split(",")
    want = int(horizon or 0) * len(columns)
    if field == "forecasting" and horizon and targets and outputs and want != outputs:
        errors.append(FieldError(pointer="#/dataset_id", detail=f"the teacher has {outputs} outputs, but a forecast of "
                                 f"{horizon} steps of {targets} has {want}"))
    shape = teacher.get("input_shape") or []
    if dataset.get("format") == "audio_zip" and spec.data.audio_length and len(shape) == 2 and shape[1] > 0 \
            and spec.data.audio_length != shape[1]:
        errors.append(FieldError(pointer="#/data/audio_length", detail=f"the teacher takes clips of {shape[1]} samples; "
                                 f"data.audio_length is {spec.data.audio_length} (leave it out to use the teacher's)"))
    if field == "policy" and task:
        want = "classification" if spec.data.action_space == "discrete" else "regression"
        if task != want:
            errors.append(FieldError(pointer="#/data/action_space", detail=f"a {spec.data.action_space} policy is a "
                                     f"{want} model, but the teacher is a {task} model"))
    return errors


ONE_LOGIT_HINT = ("A binary classifier with one logit (a sigmoid output) is not taken as a classifier: export it "
                  "with two outputs, torch.cat([-z, z], dim=1) / 2 for its logit z (their softmax is sigmoid(z)), "
                  "or distil the logit itself with numeric labels and task 'regression'.")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _task_errors(asked: str | None, teacher: dict[str, Any], dataset: dict[str, Any]) -> list[FieldError]:
    """The job's task against the teacher's (one it declares is binding; one guessed from its output is
    not) and against the labels."""
    errors: list[FieldError] = []
    teacher_task, source, outputs = teacher.get("task"), teacher.get("task_source", "declared"), teacher.get("output_dim")
    if asked and teacher_task and asked != teacher_task:
        if source == "declared":
            errors.append(FieldError(pointer="#/task", detail=f"the teacher is a {teacher_task} model; it cannot "
                                                               f"teach {asked}"))  # fmt: skip
        elif asked == "classification" and outputs == 1:
            errors.append(FieldError(pointer="#/task", detail="the teacher has one output: it cannot classify. "
                                                               + ONE_LOGIT_HINT))
    task = asked or teacher_task
    names = [str(c) for c in dataset.get("classes") or []]
    if task == "regression" and outputs == 1 and names and not all(_is_number(c) for c in names):
        errors.append(FieldError(pointer="#/dataset_id", detail=(
            f"the labels are class names ({', '.join(map(repr, names[:4]))}{', …' if len(names) > 4 else ''}), but "
            "the teacher has one output, so the job would be a regression on numbers. " + ONE_LOGIT_HINT)))
    tagged = dataset.get("labels") == "per_word"
    if task == "token_classification" and not tagged:
        errors.append(FieldError(pointer="#/dataset_id", detail="a token classifier (NER) learns from tagged words: "
                                 "upload JSON Lines of {\"tokens\": [words], \"tags\": [one tag per word]}"))
    if tagged and task and task != "token_classification":
        errors.append(FieldError(pointer="#/dataset_id", detail=f"the dataset tags words (token classification), "
                                 f"but the teacher is a {task} model"))
    labelled_numbers = dataset.get("labelled") and not dataset.get("classes")
    if task == "classification" and labelled_numbers:
        errors.append(FieldError(pointer="#/task", detail="the dataset's labels are numbers with fractions "
                                                          "(regression targets), not classes: add \"task\": "
                                                          "\"regression\" to the job"))  # fmt: skip
    return errors


def _shape_errors(pointer: str, teacher: dict[str, Any], summary: dict[str, Any]) -> list[FieldError]:
    """Samples the teacher cannot take: another number of values (reshaping is allowed when the counts
    agree); images decoded per teacher (image zips) are sized at job time."""
    want = teacher.get("input_shape")
    got = (summary.get("inputs") or {}).get("x")
    kind = teacher.get("input_kind")
    if not want or not got or kind == "tokens" or summary.get("format") in ("image_zip", "audio_zip"):
        return []
    if math.prod(got) == math.prod(want):
        return []
    what = {"vector": "features", "signal": "values", "image": "pixel values"}.get(kind or "", "values")
    return [FieldError(pointer=pointer, detail=f"the dataset has {math.prod(got)} {what} per sample (shape {got}) "
                                               f"but the teacher takes {math.prod(want)} (shape {want})")]  # fmt: skip


def _class_errors(pointer: str, spec: CompressSpec, teacher: dict[str, Any], summary: dict[str, Any]) -> list[FieldError]:
    """Class labels the teacher cannot mean: more classes than outputs, names it does not have."""
    classes, outputs = summary.get("classes"), teacher.get("output_dim")
    if not classes:
        return []
    names = spec.data.classes or teacher.get("classes")
    integers = classes == [str(i) for i in range(len(classes))]
    if names and not integers:
        unknown = [c for c in classes if c not in names]
        if unknown:
            source = "data.classes" if spec.data.classes else "the teacher's classes"
            return [FieldError(pointer=pointer, detail=f"label(s) {', '.join(unknown[:5])} are not among {source} "
                                                       f"({', '.join(names[:20])})")]  # fmt: skip
        return []
    if outputs and len(classes) > outputs:
        return [FieldError(pointer=pointer, detail=f"the dataset has {len(classes)} classes but the teacher predicts "
                                                   f"{outputs}")]  # fmt: skip
    return []
