"""The candidate pipeline: student → distil → export fp32 ONNX → quantize → measure.

One `CandidatePipeline` per teacher, data split and spec. The single run (`compress`) walks it once;
the search (`search.run`) walks it for every candidate of its ladder (distilling in rungs) and every
quantization recipe. Each stage is one method, so both measure, export and quantize the same way:

1. `make_student`: the student a student config asks for (``students.factory``); a fresh MLP on
   vector inputs learns on standardised values (``students.standardize``); an auto student for an
   image, signal or token teacher is first timed against the teacher's graph (``students.speed_fit``).
2. `distil`: knowledge distillation from the teacher (``distill.distill``); the standardisation is
   then folded into the student's own first and last layers.
3. `export`: the float model as an fp32 ONNX graph, traced on a few eval rows.
4. `quantize`: the graph by a quantization method config, through its registered handler
   (``quantize.registry``); calibration rows come from the training split, the evaluation (for the
   accuracy-aware fallback and the reported drop) from the eval split, and ``qat`` gets the float
   model, the teacher and the training data it fine-tunes with.
5. `measure`: the task metric on the eval split (against the teacher's outputs), size on disk and
   onnxruntime latency (`measure.meter.Meter`).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .distill.distill import DistillResult, distill
from .distill.teacher_cache import TeacherCache
from .errors import SpecError
from .fields import primary_metric as field_metric
from .measure.export import export_onnx, onnx_size_bytes
from .measure.meter import Meter, latency_at
from .measure.metrics import higher_is_better, primary_metric
from .quantize.api import quantize
from .quantize.calibration import calibration_sample
from .quantize.handlers import resolve_method
from .quantize.registry import QuantizationResult, TrainingInputs
from .spec import (
    AutoStudent,
    CompressSpec,
    DistillSpec,
    QatConfig,
    QuantizationConfig,
    QuantizationMethod,
    SearchStudent,
    StaticInt8Config,
    StudentKind,
)
from .students import standardize
from .students.derive import student_budget
from .students.factory import make_student
from .students.speed_fit import fit_speed, needs_timing
from .students.student import Student
from .types import CancelFn, ProgressFn, Task, Teacher, TensorData

SAMPLE_ROWS = 8
"""Eval rows the fp32 graphs are traced on."""
TIMING_S = 0.3
SCALE_SAMPLE = 256
"""Training rows a dynamic or weight-only quantization looks at for its inputs' scales."""
TIMING_ROUNDS = 3
"""Seconds of runs per graph at least, and interleaved rounds, behind each timing that picks an auto student."""


def evaluation_batch(spec: CompressSpec) -> int:
    """The batch size the verdict compares speeds at: the search's target batch, else the largest measured."""
    if spec.targets is not None:
        return spec.targets.latency_batch_size
    return max(spec.evaluation.latency_batch_sizes)


@dataclass
class Measurement:
    """One measured graph."""

    path: Path
    metrics: dict[str, Any]
    size_bytes: int
    latency: dict[str, Any]
    outputs: torch.Tensor | None = None
    """Its outputs on the eval split, when asked for."""


class CandidatePipeline:
    """student → distil → export → quantize → measure for one teacher, data split and spec (module doc)."""

    def __init__(self, teacher: Teacher, train: TensorData, evald: TensorData, spec: CompressSpec, *, task: Task,
                 meter: Meter, progress: ProgressFn, cancel: CancelFn, eval_given: bool = True) -> None:
        self.teacher, self.train, self.evald, self.spec, self.task = teacher, train, evald, spec, task
        self.eval_given = eval_given
        """False when the eval split was held out from the uploaded data (the verdict's wording)."""
        self.meter, self.progress, self.cancel = meter, progress, cancel
        if task == "token_classification" and isinstance(spec.student, SearchStudent):
            raise SpecError("a search over token classification (NER) students is not supported yet: use student "
                            "kind 'derived' or 'auto'")
        self.sample = {k: v[:SAMPLE_ROWS] for k, v in evald.inputs.items()}
        self.metric = field_metric(task, evald.meta, primary_metric(task))
        """The metric the quantizers' evaluation watches (the search sets its goal's)."""
        names = teacher.input_names
        self.input_names = {"x": names[0]} if teacher.input_kind != "tokens" and len(names) == 1 else {}
        """What the student's graph inputs are called: as the teacher's (``x`` → ``image``)."""
        self.preprocessing: dict[str, Any] = {}
        """What was done to the data on its way to the student (`students.standardize`), for the record."""
        self.auto_budget: int | None = None
        """The budget the timed auto student was built for: the labels-only baseline gets the same student."""
        self.student_timing: dict[str, Any] | None = None
        """Why the auto student has its size (`students.speed_fit`), for the report."""
        self.quantized_as: QuantizationMethod | None = None
        """The int8 format ``auto`` chose by measurement for the student (`quantize_choice`): the
        labels-only baseline is quantized in it too."""

    # --- 1. student ------------------------------------------------------------------------

    def make_student(self, student: StudentKind | None = None, *, faster_than: Path | None = None) -> Student:
        """The student ``student`` (default: the spec's) asks for, seeded by the distillation seed; an auto
        student is timed against the teacher's graph ``faster_than`` where its kind needs it."""
        config = student if student is not None else self.spec.student
        assert config is not None, "a spec without a student distils nothing"
        seed = self.spec.distillation.seed
        if isinstance(config, AutoStudent) and faster_than is not None and needs_timing(self.teacher):
            batch = evaluation_batch(self.spec)
            fit = fit_speed(lambda b: make_student(self.teacher, config, seed=seed, budget=b),
                            student_budget(self.teacher, config.max_params, config.max_params_ratio),
                            lambda s: self.time_against(s.module, faster_than, batch), batch)
            made, self.auto_budget, self.student_timing = fit.student, fit.budget, fit.record
        else:
            made = make_student(self.teacher, config, seed=seed,
                                budget=self.auto_budget if isinstance(config, AutoStudent) else None)
        record = standardize.wrap(made, self.train, self.task)
        if record:
            self.preprocessing["student"] = record
        return made

    def time_against(self, module: nn.Module, reference: Path, batch: int) -> tuple[float, float]:
        """p50 (ms) at ``batch`` rows of ``module`` exported as fp32 ONNX and of the graph ``reference``: the
        meter's `TIMING_ROUNDS` interleaved rounds of at least `TIMING_S` seconds (both under the same load)."""
        with tempfile.TemporaryDirectory(prefix="kdq-timing-") as tmp:
            paths = [self.export(module, Path(tmp) / "timed.onnx"), reference]
            timed = self.meter.latencies(paths, [batch], rounds=TIMING_ROUNDS, min_timed_s=TIMING_S)
        student, teacher = (latency_at(t, batch, "p50") or 0.0 for t in timed)
        return student, teacher

    # --- 2. distil -------------------------------------------------------------------------

    def distil(self, student: nn.Module, *, workdir: Path, spec: DistillSpec | None = None,
               baseline: Callable[[], nn.Module] | None = None, teacher_cache: TeacherCache | None = None,
               teacher_eval: torch.Tensor | None = None, checkpoints: bool = True,
               progress: ProgressFn | None = None) -> DistillResult:
        """Distil ``student`` (in place) with ``spec`` (default: the spec's distillation); ``baseline``
        builds the labels-only baseline's student; a search shares the teacher's outputs."""
        result = distill(self.teacher, student, self.train, self.evald, spec or self.spec.distillation,
                         workdir=workdir, progress=progress or self.progress, cancel=self.cancel,
                         make_baseline=baseline, task=self.task, teacher_cache=teacher_cache,
                         teacher_eval=teacher_eval, checkpoints=checkpoints)
        result.student = standardize.fold(result.student)
        if result.baseline is not None:
            result.baseline = standardize.fold(result.baseline)
        return result

    # --- 3. export -------------------------------------------------------------------------

    def export(self, module: nn.Module, path: Path) -> Path:
        """``module`` as an fp32 ONNX graph at ``path``, its input named as the teacher's."""
        return export_onnx(module, self.sample, path, task=self.task, rename=self.input_names)

    # --- 4. quantize -----------------------------------------------------------------------

    def resolve(self, config: QuantizationMethod, fp32: Path) -> QuantizationMethod:
        """``auto`` as the method it picks for this graph; any other config as it is."""
        return resolve_method(config, fp32)

    def quantize(self, fp32: Path, out: Path, config: QuantizationMethod, *, module: nn.Module | None = None,
                 score: bool = True, workdir: Path | None = None, distillation: DistillSpec | None = None,
                 progress: ProgressFn | None = None) -> QuantizationResult:
        """Quantize the graph ``fp32`` (exported from ``module``) into ``out`` as ``config`` says.

        ``score``: evaluate the fp32 and the quantized graph (the report's drop) even without a
        tolerance; with ``max_metric_drop`` they are always evaluated. ``qat`` trains ``module``
        with ``distillation`` (default: the spec's) and writes its float graph into ``workdir``.
        """
        config = self.resolve(config, fp32)
        calibration, ids = None, None
        if isinstance(config, (StaticInt8Config, QatConfig)):
            calibration, ids = calibration_sample(self.train.inputs, config.calibration_samples,
                                                  self.spec.distillation.seed)
        elif isinstance(config, QuantizationConfig):  # a sample to check the inputs' scales by (input_scales)
            calibration, _ = calibration_sample(self.train.inputs, SCALE_SAMPLE, self.spec.distillation.seed)
        evaluate = None
        tolerance = isinstance(config, QuantizationConfig) and config.max_metric_drop is not None
        if score or tolerance:
            def evaluate(path: Path, metric: str = self.metric) -> float:
                return float(self.meter.metrics(path)[metric])
        training = None
        if module is not None and isinstance(config, QatConfig):
            training = TrainingInputs(module, self.teacher, self.train, distillation or self.spec.distillation,
                                      self.task, self.sample, workdir or Path(out).parent)
        result = quantize(fp32, out, config, calibration_inputs=calibration, evaluate=evaluate,
                          higher_is_better=higher_is_better(self.metric), progress=progress or self.progress,
                          cancel=self.cancel, seed=self.spec.distillation.seed, training=training)
        if ids is not None:
            result.calibration = {**(result.calibration or {}), "sample_ids": ids}  # rows of the training split
        return result

    # --- 5. measure ------------------------------------------------------------------------

    def measure(self, paths: Sequence[Path], *, batches: Sequence[int] | None = None, rounds: int | None = None,
                min_timed_s: float = 0.0, keep_outputs: bool = False,
                outputs: Sequence[torch.Tensor] | None = None) -> list[Measurement]:
        """Each graph's metrics on the eval split, size on disk and latency (one pass, or ``rounds``
        interleaved rounds of at least ``min_timed_s`` per batch size); ``outputs`` are the graphs'
        eval outputs when the caller has them already (the teacher's)."""
        outputs = list(outputs) if outputs is not None else [self.meter.outputs(p) for p in paths]
        latencies = self.meter.latencies(paths, batches, rounds=rounds, min_timed_s=min_timed_s)
        return [Measurement(Path(p), self.meter.score(o), onnx_size_bytes(p), lat, o if keep_outputs else None)
                for p, o, lat in zip(paths, outputs, latencies, strict=True)]
