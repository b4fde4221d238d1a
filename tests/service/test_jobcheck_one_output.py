"""Job checks at submission for a teacher with one output."""

from __future__ import annotations

from service.api.jobcheck import check_job
from worker.compression.spec import CompressSpec

TEACHER = {"kind": "zoo", "task": "classification", "input_kind": "vector", "output_dim": 3}
DATASET = {"samples": 100, "input_kind": "vector", "classes": ["a", "b", "c"]}


def test_a_one_logit_teacher_with_class_names_is_refused_at_submission_with_the_two_output_hint() -> None:
    """Stranger trial: a sigmoid binary classifier was accepted, then the job failed "label 'benign' is not a
    number (regression needs numbers)", never saying the one-output teacher was taken as a regression."""
    one = {**TEACHER, "task": "regression", "task_source": "output", "output_dim": 1}
    names = {**DATASET, "classes": ["benign", "malignant"]}
    [error] = check_job(CompressSpec.model_validate({}), one, names)
    assert error.pointer == "#/dataset_id" and "'benign'" in error.detail and "torch.cat([-z, z]" in error.detail
    errors = {e.pointer: e.detail for e in check_job(CompressSpec.model_validate({"task": "classification"}), one, names)}
    assert "cannot classify" in errors["#/task"] and "torch.cat([-z, z]" in errors["#/task"]
    assert check_job(CompressSpec.model_validate({}), one, {**DATASET, "classes": ["0", "1"]}) == []  # numbers
