"""One whole compression run: load, then the candidate pipeline once (student → distil → export →
quantize → measure, `pipeline.CandidatePipeline`) or the search over it, then the report.

Each stage is optional: no ``spec.student`` quantizes the teacher itself; quantization
method ``none`` stops at the fp32 ONNX. ``progress`` hears every stage; ``cancel`` is
polled at every training step and between stages. ``checkpoint_dir`` keeps the teacher
cache and training checkpoints, so a rerun with the same folder resumes a killed run.
"""

from __future__ import annotations

import shutil
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .deliver import (
    Made,
    artifact_kind,
    comparisons,
    deliver,
    measure_all,
    quantize_baseline,
    row_name,
    search_verdict,
    summary_of,
    teacher_onnx,
)
from .distill.distill import DistillResult
from .errors import Cancelled
from .fields import field_of
from .fields.policy import judge_returns
from .io.datasets import load_for_teacher
from .io.sandbox import SandboxLimits, close_teacher
from .io.teachers import load_teacher
from .measure.evaluate import ModelRow, compare_models, disagreements, per_class_table
from .measure.export import check_onnx
from .measure.meter import Meter
from .measure.report import sha256_file, write_manifest, write_report
from .measure.teacher_check import TeacherCheck, check_teacher
from .package.bundle import bundle_job
from .pipeline import CandidatePipeline
from .quantize.registry import QuantizationResult
from .quantize_choice import quantize_measured
from .search.run import search
from .spec import CompressSpec, Int4Config, NoQuantizationConfig, SearchStudent
from .students.factory import save_student
from .students.student import Student
from .students.zoo import count_parameters
from .types import (
    Artifact,
    CancelFn,
    CompressResult,
    Progress,
    ProgressFn,
    Teacher,
    never_cancel,
    no_progress,
)


def compress(
    spec: CompressSpec,
    *,
    teacher_path: Path,
    dataset_path: Path,
    eval_dataset_path: Path | None = None,
    output_dir: Path,
    progress: ProgressFn = no_progress,
    cancel: CancelFn = never_cancel,
    checkpoint_dir: Path | None = None,
    allow_code: bool = False,
    sandbox: SandboxLimits | None = None,
) -> CompressResult:
    """``allow_code`` / ``sandbox``: TorchScript and ExportedProgram teachers (the operator's choice;
    they run in a sandboxed child, see `io.sandbox`)."""
    run = _Run(spec, Path(output_dir), progress, cancel, checkpoint_dir)
    run.allow_code, run.sandbox = allow_code, sandbox
    try:
        return run.execute(Path(teacher_path), Path(dataset_path), eval_dataset_path and Path(eval_dataset_path))
    finally:
        if run.teacher is not None:
            close_teacher(run.teacher)  # a sandboxed teacher's child ends with the run
        if checkpoint_dir is None:
            shutil.rmtree(run.work, ignore_errors=True)


@dataclass
class _Chosen:
    path: Path


class _Run:
    allow_code: bool = False
    sandbox: SandboxLimits | None = None
    teacher: Teacher | None = None
    teacher_check: TeacherCheck | None = None
    teacher_graph: Path | None = None
    class_order: dict[str, Any] | None = None
    inputs_sha256: dict[str, str] = {}
    """Where the class numbering came from: ``teacher`` (its names), ``given``, ``sorted`` or ``indices``."""

    def __init__(self, spec: CompressSpec, out: Path, progress: ProgressFn, cancel: CancelFn,
                 checkpoint_dir: Path | None) -> None:
        self.spec, self.out, self.progress, self.cancel = spec, out, progress, cancel
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(checkpoint_dir) if checkpoint_dir is not None else self.out / "_work"
        self.work.mkdir(parents=True, exist_ok=True)
        self.artifacts: list[Artifact] = []
        self.timings: dict[str, float] = {}
        self.warnings: list[str] = []

    # --- helpers -------------------------------------------------------------------------

    def _stage(self, name: str, step: int = 0, total: int = 1, message: str | None = None) -> None:
        if self.cancel():
            raise Cancelled(f"cancelled before {name}")
        self.progress(Progress(stage=name, step=step, total=total, message=message))

    def _timed(self, name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        result = fn()
        self.timings[name] = round(time.perf_counter() - t0, 3)
        return result

    def _add(self, name: str, kind: Any, path: Path, description: str) -> None:
        self.artifacts.append(Artifact(name=name, kind=kind, path=path, description=description))

    # --- the run ----------------------------------------------------------------------------

    def execute(self, teacher_path: Path, dataset_path: Path, eval_path: Path | None) -> CompressResult:
        spec = self.spec
        self.inputs_sha256 = {name: sha256_file(path) for name, path in
                              (("teacher", teacher_path), ("dataset", dataset_path), ("eval dataset", eval_path))
                              if path is not None and path.is_file()}  # fmt: skip
        self._stage("load", 0, 2, "loading the teacher")
        teacher = self.teacher = self._timed("load_teacher", lambda: load_teacher(
            teacher_path, task=spec.task, allow_code=self.allow_code, sandbox=self.sandbox))
        task = spec.task or teacher.task
        self._stage("load", 1, 2, "reading the data")
        train, evald, self.class_order = self._timed("load_data", lambda: load_for_teacher(
            dataset_path, eval_path, spec.data, teacher, task))
        self._stage("load", 2, 2, "checking the teacher against the labels")
        check, train, evald = self._timed("teacher_check", lambda: check_teacher(
            teacher, train, evald, task, spec.data.image_scale))
        self.teacher_check = check
        if check is not None:
            self._stage("load", 2, 2, f"the teacher scores {check.metric} {check.value:.3f} on {check.samples} "
                                      f"labelled rows (chance {check.chance:.3f})")
        goal_batch = [] if spec.targets is None else [spec.targets.latency_batch_size]
        pipe = CandidatePipeline(teacher, train, evald, spec, task=task,
                                 meter=Meter(task, evald, spec.evaluation, extra_batches=goal_batch),
                                 progress=self.progress, cancel=self.cancel, eval_given=eval_path is not None)
        if isinstance(spec.student, SearchStudent):
            return self._execute_search(pipe, teacher_path, dataset_path, eval_path)
        return self._execute_once(pipe, teacher_path, dataset_path, eval_path)

    def _execute_once(self, pipe: CandidatePipeline, teacher_path: Path, dataset_path: Path,
                      eval_path: Path | None) -> CompressResult:
        """The candidate pipeline once: the spec's student (and its labels-only baseline) distilled,
        exported, quantized; then every model measured and the best delivered (`deliver`)."""
        spec, teacher = self.spec, pipe.teacher
        distilled: DistillResult | None = None
        deploy: torch.nn.Module | None = teacher.module
        student: Student | None = None
        if spec.student is not None:  # an auto student may be timed against the teacher's graph first
            self._stage("load", 2, 2, "exporting the teacher" + (", timing students against it"
                                                                  if spec.student.kind == "auto" else ""))
            student = pipe.make_student(faster_than=self._teacher_onnx(teacher, teacher_path, pipe.sample))
            distilled = self._timed("distill", lambda: pipe.distil(
                student.module, workdir=self.work / "distill", baseline=lambda: pipe.make_student().module))
            deploy = distilled.student
            self._save_student(student, deploy, teacher)

        self._stage("export", 0, 2)
        teacher_onnx = self._teacher_onnx(teacher, teacher_path, pipe.sample)
        made = Made(teacher_onnx)
        fp32 = self.out / "model_fp32.onnx"
        role = "student" if student is not None else "teacher"
        if deploy is None:  # an ONNX teacher quantized as it is
            shutil.copyfile(teacher_onnx, fp32)
            export_check = None
        else:
            pipe.export(deploy, fp32)
            export_check = check_onnx(fp32, deploy, pipe.sample)
        if student is not None:
            made.add("student", "fp32", fp32, count_parameters(deploy))
        self._add("model_fp32.onnx", "onnx_fp32", fp32, f"the {role} as an fp32 ONNX graph")
        self._stage("export", 2, 2)

        teacher_out = pipe.meter.use_teacher(teacher_onnx)
        quant = None
        if not isinstance(spec.quantization, NoQuantizationConfig):
            quant = self._timed("quantize", lambda: self._quantize(pipe, fp32, deploy))
            if student is not None:
                made.add("student", "int4" if quant.method == "int4" else "int8", Path(quant.path),
                         count_parameters(deploy))
            else:  # the teacher quantized: its int8 graph is the one candidate besides the teacher
                made.add("student", "int8", Path(quant.path), teacher.num_parameters)
        if distilled is not None and distilled.baseline is not None:
            self._timed("baseline", lambda: self._baseline(pipe, distilled.baseline, made, quant is not None))

        report = self._timed("evaluate", lambda: self._evaluate(pipe, student, distilled, made, quant, teacher_out))
        report["export_check"] = export_check
        self._stage("report", 0, 1)
        self._write_report(report, teacher_path, dataset_path, eval_path, quant)
        self._stage("report", 1, 1)
        return CompressResult(artifacts=self.artifacts, metrics=report)

    def _baseline(self, pipe: CandidatePipeline, module: torch.nn.Module, made: Made, quantize: bool) -> None:
        """The labels-only baseline's graphs, candidates for delivery like the student's."""
        self._stage("export", 0, 1, "exporting the labels-only baseline")
        fp32 = pipe.export(module, self.work / "baseline_fp32.onnx")
        made.add("baseline", "fp32", fp32, count_parameters(module))
        if quantize:
            result = quantize_baseline(pipe, self.spec, fp32, self.work / "baseline_int8.onnx")
            made.add("baseline", "int4" if result.method == "int4" else "int8", Path(result.path),
                     count_parameters(module))

    def _execute_search(self, pipe: CandidatePipeline, teacher_path: Path, dataset_path: Path,
                        eval_path: Path | None) -> CompressResult:
        """A search job (the pipeline per candidate and recipe): the chosen model is the primary artifact,
        every Pareto-front model is downloadable."""
        teacher, train, evald, task = pipe.teacher, pipe.train, pipe.evald, pipe.task
        self._stage("export", 0, 1, "exporting the teacher")
        teacher_onnx = self._teacher_onnx(teacher, teacher_path, pipe.sample)
        self._stage("export", 1, 1)
        result = self._timed("search", lambda: search(
            teacher, train, evald, self.spec, teacher_onnx=teacher_onnx, workdir=self.work / "search", task=task,
            progress=self.progress, cancel=self.cancel, pipeline=pipe))
        chosen, choice = result.chosen, result.choice
        suffix = {"onnx_fp32": "fp32", "onnx_int4": "int4"}.get(chosen.artifact_kind, "int8")
        primary = self.out / f"model_{suffix}.onnx"
        shutil.copyfile(chosen.path, primary)
        verdict = "meets every target" if choice.met_all else f"misses {', '.join(choice.unmet)}"
        self._add(primary.name, chosen.artifact_kind, primary,
                  f"the chosen model: {chosen.candidate} as {chosen.recipe} ({chosen.format}); {verdict}; "
                  f"chosen because it {choice.why}")
        if result.chosen_student is not None:
            self._save_student(result.chosen_student, result.chosen_student.module, teacher)
            self.artifacts[-1].description = (f"the chosen candidate's float student ({chosen.candidate}): "
                                              "config.json + model.safetensors; loadable as a teacher")
        files: dict[str, str] = {chosen.name: primary.name}
        for i, name in enumerate(result.front, 1):
            m = result.by_name(name)
            path = self.out / f"front-{i:02d}-{name}.onnx"
            shutil.copyfile(m.path, path)
            files.setdefault(name, path.name)
            latency = "–" if m.latency_ms is None else f"{m.latency_ms:.4g} ms"
            same = " (the chosen model)" if name == chosen.name else ""
            self._add(path.name, m.artifact_kind, path,
                      f"Pareto-front model {name}{same}: {result.goal.metric} {m.value}, "
                      f"{result.goal.latency_stat} {latency} at batch {result.goal.latency_batch}, {m.size_bytes:,} B")

        self._stage("evaluate", 0, 1, "comparing the chosen model with the teacher")
        teacher_out = pipe.meter.teacher_out
        assert teacher_out is not None  # the search measured the teacher first
        rows = [ModelRow("teacher", result.teacher.metrics, result.teacher.size_bytes, result.teacher.parameters,
                         result.teacher.latency, None, "onnx fp32")]
        outputs = {"teacher": teacher_out}
        twin = None if chosen.twin is None or chosen.candidate == "teacher" else result.by_name(chosen.twin)
        if twin is not None:
            rows.append(ModelRow("student", twin.metrics, twin.size_bytes, twin.parameters, twin.latency, "teacher",
                                 twin.format))
        if chosen is not result.teacher:
            outputs["chosen"] = pipe.meter.outputs(chosen.path)
            rows.append(ModelRow("chosen", chosen.metrics, chosen.size_bytes, chosen.parameters, chosen.latency,
                                 rows[-1].name, chosen.format))
        table = compare_models(rows)
        self._stage("evaluate", 1, 1)
        section = result.to_dict()
        section["files"] = files
        report: dict[str, Any] = {
            "title": f"Compression report: {task}, searched for targets",
            "task": task,
            "method": "search: distillation over a ladder of students × quantization recipes, chosen against targets",
            "primary_metric": result.goal.metric,
            "teacher": teacher.summary(),
            "student": None if result.chosen_student is None else {
                "description": result.chosen_student.description, "how": "search",
                "kind": result.chosen_student.kind, "num_parameters": chosen.parameters,
                "config": result.chosen_student.config},
            "spec": self.spec.model_dump(mode="json"),
            "data": {"train": train.summary(), "eval": evald.summary()},
            "models": table,
            "search": section,
        }
        final_out = outputs.get("chosen")
        if final_out is not None:
            report["disagreements"] = disagreements(task, final_out, teacher_out, self.spec.evaluation.disagreements,
                                                    evald.texts, y=evald.y, classes=evald.classes)
        if task == "classification" and evald.y is not None and evald.classes:
            report["per_class"] = per_class_table(evald.y, {k: v.argmax(-1) for k, v in outputs.items()},
                                                  evald.classes)
        if result.chosen_history:
            report["curves"] = {chosen.candidate: result.chosen_history}
        if not choice.met_all:
            self.warnings.append(f"no model met every target: the chosen {chosen.name} misses "
                                 f"{', '.join(choice.unmet)} ({'; '.join(section['chosen_checks'])})")
        self.warnings.extend(result.notes)
        summary = summary_of(table, result.goal.metric)
        summary.update(search_verdict(result, primary, self.teacher_check, pipe, outputs.get("chosen")))
        shutil.copyfile(primary, self.out / "model.onnx")
        self._add("model.onnx", chosen.artifact_kind, self.out / "model.onnx",
                  f"deploy this: the search's choice ({chosen.name}); verdict {summary['verdict']}")
        summary["search"] = {"chosen": chosen.name, "candidate": chosen.candidate, "recipe": chosen.recipe,
                             "met_all": choice.met_all, "met": choice.met, "unmet": choice.unmet,
                             "targets": result.goal.describe(), "front": result.front,
                             "stopped_by_budget": result.budget["stopped_by_budget"]}
        report["summary"] = summary
        report["delivery"] = {**summary["delivery_section"], "why": choice.why}
        del summary["delivery_section"]
        self._bundle(pipe, _Chosen(self.out / "model.onnx"), report)
        self._stage("report", 0, 1)
        self._write_report(report, teacher_path, dataset_path, eval_path, None)
        self._stage("report", 1, 1)
        return CompressResult(artifacts=self.artifacts, metrics=report)

    def _save_student(self, student: Student, trained: torch.nn.Module, teacher: Teacher) -> None:
        student.module = trained
        folder = save_student(student, self.work / "student", teacher)
        archive = self.out / "student.zip"
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
            for f in sorted(folder.rglob("*")):
                if f.is_file():
                    zf.write(f, f.relative_to(folder).as_posix())
        self._add("student.zip", "student", archive,
                  f"the distilled student ({student.description}): config.json + model.safetensors"
                  + (" + tokenizer" if teacher.tokenizer is not None else "") + "; loadable as a teacher")

    def _teacher_onnx(self, teacher: Teacher, teacher_path: Path, sample: dict[str, torch.Tensor]) -> Path:
        self.teacher_graph = self.teacher_graph or teacher_onnx(teacher, teacher_path, sample, self.work)
        return self.teacher_graph

    def _quantize(self, pipe: CandidatePipeline, fp32: Path, module: torch.nn.Module | None) -> QuantizationResult:
        """The pipeline's quantize stage with the spec's method (``qat`` fine-tunes ``module``)."""
        config = pipe.resolve(self.spec.quantization, fp32)
        name = "model_int4.onnx" if (int4 := isinstance(config, Int4Config)) else "model_int8.onnx"
        result = quantize_measured(pipe, self.spec.quantization, fp32, self.out / name, self.work / "formats") or \
            pipe.quantize(fp32, self.out / name, config, module=module, workdir=self.work / "qat")
        self._add(name, "onnx_int4" if int4 else "onnx_int8", Path(result.path), f"{result.method} ONNX for onnxruntime on CPU")
        if result.met is False:
            self.warnings.append(result.message)
        return result

    def _evaluate(self, pipe: CandidatePipeline, student: Student | None, distilled: DistillResult | None,
                  made: Made, quant: QuantizationResult | None, teacher_out: torch.Tensor) -> dict[str, Any]:
        """Every model measured, the best delivered with the verdict, and the report's tables."""
        task, teacher = pipe.task, pipe.teacher

        def stage(step: int, total: int, message: str) -> None:
            self._stage("evaluate", step, total, message or None)

        teacher_m, measured = measure_all(pipe, made, teacher_out, stage)
        chance = self.teacher_check.chance if self.teacher_check is not None else None
        chosen, delivery, table, outputs = deliver(pipe, self.spec, made, teacher_m, measured, self.out,
                                                   chance=chance, teacher_parameters=teacher.num_parameters)
        self._add("model.onnx", artifact_kind(chosen.precision), self.out / "model.onnx",
                  f"deploy this: {chosen.label}, chosen because {delivery['why']}; "
                  f"verdict {delivery['verdict']}")
        for row in table:
            for flag in row.get("flags", []):
                self.warnings.append(f"{row['name']}: {flag.get('message', flag)}")
        report: dict[str, Any] = {
            "title": f"Compression report: {task}",
            "task": task,
            "primary_metric": pipe.metric,
            "teacher": teacher.summary(),
            "student": None if student is None else {
                "description": student.description, "how": student.how, "kind": student.kind,
                "num_parameters": count_parameters(distilled.student), "config": student.config,
                "chosen_by_speed": pipe.student_timing},
            "spec": self.spec.model_dump(mode="json"),
            "data": {"train": pipe.train.summary(), "eval": pipe.evald.summary()},
            "models": table,
            "delivery": delivery,
            **comparisons(pipe, self.spec, chosen, outputs),
        }
        if distilled is not None:
            d = distilled.to_dict()
            report["distillation"] = d
            report["curves"] = d["history"]
            report["teacher_cache"] = d["teacher_cache"]
            self.warnings.extend(d.get("notes", []))
        if quant is not None:
            q = quant.to_dict()
            report["quantization"] = q
            report["sensitivity"] = q.get("sensitivity") or []
        if field_of(pipe.evald.meta) == "policy" and pipe.evald.meta.get("env"):
            self._policy_returns(pipe, made, chosen.name, delivery)
            report["policy"] = delivery.pop("policy")
        summary = summary_of(table, pipe.metric)
        summary.update({k: delivery[k] for k in ("verdict", "reasons", "headline")})
        row = next((r for r in table if r["name"] == chosen.name), None)
        if row is not None and row.get("vs_teacher"):
            summary["final"], summary["vs_teacher"] = chosen.name, row["vs_teacher"]
        summary["delivered"] = {"name": chosen.name, "file": "model.onnx"}
        report["summary"] = summary
        self._bundle(pipe, chosen, report)
        return report

    def _policy_returns(self, pipe: CandidatePipeline, made: Made, delivered: str, delivery: dict[str, Any]) -> None:
        meta = pipe.evald.meta
        self._stage("evaluate", 0, 1, f"rolling the policies out in {meta['env']}")
        graphs = {"teacher": made.teacher_onnx, **{row_name(role, precision): path for role, by in made.graphs.items()
                                                   for precision, path in by.items()}}
        self._timed("returns", lambda: judge_returns(meta, graphs, delivered, delivery,
                                                     threads=self.spec.evaluation.threads, warnings=self.warnings))

    def _bundle(self, pipe: CandidatePipeline, chosen: Any, report: dict[str, Any]) -> None:
        import onnxruntime as ort  # (already loaded by the meter)

        names = [i.name for i in ort.InferenceSession(str(chosen.path), providers=["CPUExecutionProvider"]).get_inputs()]
        path, pre = bundle_job(self.out, self.out / "model.onnx", pipe.teacher, pipe.evald, pipe.task,
                               self.spec.model_dump(mode="json"), input_names=names,
                               student=pipe.preprocessing.get("student"), class_order=self.class_order,
                               report=report, inputs_sha256=self.inputs_sha256)  # fmt: skip
        report["preprocessing"] = pre
        self._add("bundle.zip", "bundle", path, "what to deploy: model.onnx, preprocessing.json, predict.py (runs it "
                                                "on raw inputs), MODEL_CARD.md" + (", the tokenizer" if pre.get("text") else ""))

    def _write_report(self, report: dict[str, Any], teacher_path: Path, dataset_path: Path,
                      eval_path: Path | None, quant: Any) -> None:
        report["warnings"] = self.warnings
        report["timings"] = self.timings
        if self.teacher_check is not None:
            report["teacher_check"] = self.teacher_check.to_dict()
        if self.class_order is not None:
            report["class_order"] = self.class_order
        json_path, html_path = write_report(self.out, report)
        self._add("report.json", "report_json", json_path, "every number of the run")
        self._add("report.html", "report_html", html_path, "the human-readable report with plots")
        inputs = {"teacher": teacher_path, "dataset": dataset_path}
        if eval_path is not None:
            inputs["eval_dataset"] = eval_path
        manifest = write_manifest(
            self.out,
            inputs={k: v for k, v in inputs.items() if v.is_file()},
            outputs={a.name: a.path for a in self.artifacts},
            spec=self.spec.model_dump(mode="json"),
            seeds={"distillation": self.spec.distillation.seed, "split": self.spec.data.split_seed},
            calibration_ids=None if quant is None else quant.calibration.get("sample_ids"),
        )
        self._add("manifest.json", "manifest", manifest, "sha256 of every input and output, seeds, versions, spec")
