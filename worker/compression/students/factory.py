"""The student factory: a smaller model for a teacher, derived from it, named, or sized to a budget.

The student config's kind (``spec.student``) picks the way:

* ``derived``: the teacher's own architecture with fewer layers (``layers`` = which teacher
  layers to keep, or ``num_layers`` picked evenly, first and last included) and/or narrower
  (``width_ratio``), initialised from the teacher (``zoo_init``). Hugging Face teachers go to ``hf_derive``.
* ``zoo``: a zoo architecture; input dims, task and output_dim are filled from the teacher.
* ``hf_config``: a transformers config for a Hugging Face teacher (``hf_derive``).
* ``auto``: the budget is ``max_params``, else ``max_params_ratio`` (default 0.25) of the
  teacher's parameters. Zoo teachers get the same architecture, narrowed (and, when deep,
  shortened) to fit; Hugging Face teachers half their layers, then a narrower feed-forward;
  black-box (ONNX) teachers a fresh MLP / CNN / 1-D CNN / transformer for their input kind.
  Students are saved with ``save_student``; a saved zoo transformer also gets the teacher's
  tokenizer, so the folder is self-contained.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ..errors import SpecError
from ..io.hf_folder import save_hf_model
from ..io.hf_vision_io import PREPROCESSOR_FILE
from ..io.teachers import save_zoo_model
from ..spec import AutoStudent, DerivedStudent, HFConfigStudent, StudentKind, ZooStudent
from ..types import Teacher
from . import zoo
from .auto import auto_student
from .derive import (
    derive_zoo_student,
    fit_to_teacher,
    hf_student,
    kept_hf_layers,
    student_budget,
)
from .hf_derive import derive_hf_student, hf_student_from_config
from .student import Student
from .zoo_layers import describe_config, kept_layers

# --- public API ---------------------------------------------------------------------------


def make_student(teacher: Teacher, spec: StudentKind, *, seed: int = 0, budget: int | None = None) -> Student:
    """Build the student ``spec`` asks for; fresh weights are seeded by ``seed`` (global RNG untouched).
    ``budget`` replaces an auto student's parameter budget (``students.speed_fit`` shrinks it)."""
    build = BUILDERS.get(type(spec))
    if budget is not None:
        if not isinstance(spec, AutoStudent):
            raise ValueError(f"a budget replaces only an auto student's, not a {spec.kind!r} one's")
        build = partial(_auto, budget=budget)
    if build is None:
        raise SpecError(f"student kind {spec.kind!r} is a search over many students: run it through compress() "
                        "(worker.compression.search), not make_student")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student = build(teacher, spec)
    if not isinstance(spec, AutoStudent) and (spec.max_params is not None or spec.max_params_ratio is not None):
        budget = student_budget(teacher, spec.max_params, spec.max_params_ratio)
        if student.num_parameters > budget:
            raise SpecError(f"the {spec.kind} student has {student.num_parameters:,} parameters, "
                            f"over the budget of {budget:,}")
    check_outputs(teacher, student)
    return student


def save_student(student: Student, folder: Path, teacher: Teacher) -> Path:
    """Write the student as config.json + model.safetensors (+ tokenizer or image preprocessor config),
    loadable by ``load_teacher``."""
    folder = Path(folder)
    if student.kind == "hf":
        save_hf_model(student.module, folder, teacher.tokenizer)
        processor = teacher.source_dir / PREPROCESSOR_FILE if teacher.source_dir is not None else None
        if processor is not None and processor.is_file():  # a ViT's image preprocessing, the same for the student
            shutil.copyfile(processor, folder / PREPROCESSOR_FILE)
        return folder
    save_zoo_model(student.module, student.config, folder)
    if teacher.input_kind == "tokens" and hasattr(teacher.tokenizer, "save_pretrained"):
        teacher.tokenizer.save_pretrained(folder)
    return folder


# --- the four ways ------------------------------------------------------------------------


def _auto(teacher: Teacher, spec: AutoStudent, budget: int | None = None) -> Student:
    if budget is None:
        budget = student_budget(teacher, spec.max_params, spec.max_params_ratio)
    return auto_student(teacher, budget, strict=spec.max_params is not None or spec.max_params_ratio is not None)


def _derived(teacher: Teacher, spec: DerivedStudent) -> Student:
    if teacher.kind == "hf":
        module, layer_map = derive_hf_student(
            teacher, layers=spec.layers, num_layers=spec.num_layers, width_ratio=spec.width_ratio)
        return hf_student(module, layer_map, "derived",
                           f"derived from teacher layers {kept_hf_layers(layer_map)}, initialised from teacher")
    if teacher.kind != "zoo" or teacher.module is None:
        raise SpecError("student.kind 'derived' needs a zoo or Hugging Face teacher; "
                        "an ONNX teacher is a black box: use 'auto' or 'zoo'")
    cfg = zoo.validate_config(teacher.config)
    kept = kept_layers(cfg, spec.layers, spec.num_layers)
    return derive_zoo_student(teacher, kept, spec.width_ratio or 1.0, "derived")


def _zoo_student(teacher: Teacher, spec: ZooStudent) -> Student:
    cfg = fit_to_teacher(teacher, spec.architecture)
    module = zoo.build(cfg)
    return Student(module, "zoo", cfg, None, f"zoo {describe_config(cfg)}, fresh weights",
                   zoo.count_parameters(module), "zoo")


def _hf_config_student(teacher: Teacher, spec: HFConfigStudent) -> Student:
    if teacher.kind != "hf":
        raise SpecError(f"student.kind 'hf_config' needs a Hugging Face teacher, not a {teacher.kind} one; "
                        "use 'zoo', 'derived' or 'auto'")
    module, layer_map = hf_student_from_config(teacher, spec.hf_config)
    return hf_student(module, layer_map, "hf_config", "from the given transformers config")


BUILDERS: dict[type, Callable[[Teacher, Any], Student]] = {
    AutoStudent: _auto,
    DerivedStudent: _derived,
    ZooStudent: _zoo_student,
    HFConfigStudent: _hf_config_student,
}
"""Student kind config -> how to build it (``search`` is no single student: `search.run`)."""


def check_outputs(teacher: Teacher, student: Student) -> None:
    """One dummy batch through the student: it must produce the teacher's output width."""
    shape = tuple(max(1, int(d)) for d in teacher.input_shape)
    if teacher.input_kind == "tokens":
        inputs = {"input_ids": torch.zeros((2, *shape), dtype=torch.long),
                  "attention_mask": torch.ones((2, *shape), dtype=torch.long)}
    else:
        inputs = {"x": torch.zeros((2, *shape))}
    was_training = student.module.training
    student.module.eval()
    with torch.no_grad():
        out = student.module(**inputs)
    student.module.train(was_training)
    want = (2, *shape, teacher.output_dim) if teacher.task == "token_classification" else (2, teacher.output_dim)
    if tuple(out.shape) != want:  # a token classifier: one row of tag logits per token
        raise SpecError(f"the student outputs shape {tuple(out.shape[1:])} per sample; "
                        f"the teacher outputs {want[1:]}")
