"""One whole compression run (`CompressSpec`): which student, how to distil, quantize and measure it,
how to read the data, and the targets a search must meet."""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import (
    Field,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails

from .base import SpecModel
from .data import DataSpec
from .evaluation import EvaluationSpec, SearchTargets
from .quantization import (
    AutoQuantizationConfig,
    NoQuantizationConfig,
    QatConfig,
    QuantizationMethod,
    QuantizationSpec,
)
from .student import AutoStudent, SearchStudent, StudentKind, StudentSpec
from .training import DistillSpec

FLAT_QUANTIZATION_KEYS = frozenset({"method", "backend", "calibration", "percentile", "calibration_samples",
                                    "per_channel", "block_size", "max_metric_drop", "drop_mode", "qat_epochs"})
FLAT_STUDENT_KEYS = frozenset({"kind", "max_params", "max_params_ratio", "layers", "num_layers", "width_ratio",
                               "architecture", "hf_config"})
"""Every key of the flat ``quantization`` / ``student`` models that the unions replaced. Job specs
stored before are full dumps of them (every key present); they still validate (`with_tag`)."""


def _by_tag(union: Any, tag: str) -> dict[str, type[SpecModel]]:
    return {get_args(m.model_fields[tag].annotation)[0]: m for m in get_args(union)}


_QUANTIZATION_BY_METHOD = _by_tag(QuantizationMethod, "method")
_STUDENT_BY_KIND = _by_tag(StudentKind, "kind")


def with_tag(data: Any, tag: str, default: str, flat_keys: frozenset[str], members: dict[str, type[SpecModel]]) -> Any:
    """What the union validates: ``data`` with its ``tag`` defaulted (the flat models defaulted it too:
    ``{"max_metric_drop": 0.01}`` is an ``auto`` quantization), and a stored dump of the flat model
    (exactly its keys) without the keys its tag does not have (the engine never read them)."""
    if not isinstance(data, dict):
        return data
    if tag not in data:
        data = {tag: default, **data}
    if set(data) == flat_keys and data[tag] in members:
        fields = members[data[tag]].model_fields
        data = {k: v for k, v in data.items() if k in fields}
    return data


def validate_tagged(data: Any, handler: ValidatorFunctionWrapHandler, tag: str, default: str,
                    flat_keys: frozenset[str], members: dict[str, type[SpecModel]]) -> Any:
    """Validate one of the unions; an error's location names fields of the body, as a JSON pointer
    must (pydantic puts the chosen tag in it: ``student.zoo.architecture`` is ``student.architecture``)."""
    data = with_tag(data, tag, default, flat_keys, members)
    try:
        return handler(data)
    except ValidationError as exc:
        chosen = data.get(tag) if isinstance(data, dict) else None
        errors = [InitErrorDetails(type=e["type"], loc=e["loc"][1:] if e["loc"][:1] == (chosen,) else e["loc"],
                                   input=e["input"], ctx=e.get("ctx", {})) for e in exc.errors()]
        raise ValidationError.from_exception_data(exc.title, errors) from None


class CompressSpec(SpecModel):
    """One whole compression run. Each stage is optional: no ``student`` means no
    distillation (the teacher itself is quantized); ``quantization.method == "none"``
    means no quantization."""

    task: Literal["classification", "regression", "embedding"] | None = None
    """Default: what the teacher says it is."""
    student: StudentSpec | None = Field(default_factory=AutoStudent)
    distillation: DistillSpec = Field(default_factory=DistillSpec)
    quantization: QuantizationSpec = Field(default_factory=AutoQuantizationConfig)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    targets: SearchTargets | None = Field(default=None, validate_default=True)
    """What the result must meet; runs a search (student ``auto`` becomes ``search``)."""

    @field_validator("student", mode="wrap")
    @classmethod
    def _student(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        return validate_tagged(value, handler, "kind", "auto", FLAT_STUDENT_KEYS, _STUDENT_BY_KIND)

    @field_validator("quantization", mode="wrap")
    @classmethod
    def _quantization(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        return validate_tagged(value, handler, "method", "auto", FLAT_QUANTIZATION_KEYS, _QUANTIZATION_BY_METHOD)

    @field_validator("quantization")
    @classmethod
    def _qat_needs_a_student(cls, quantization: QuantizationMethod, info: ValidationInfo) -> QuantizationMethod:
        no_student = "student" in info.data and info.data["student"] is None
        if isinstance(quantization, QatConfig) and no_student:
            raise ValueError("quantization 'qat' trains the student under simulated int8: give a 'student' "
                             "or another method")
        if isinstance(quantization, NoQuantizationConfig) and no_student:
            raise ValueError("with no student and no quantization there is nothing to do: give a 'student' "
                             "or a quantization method")
        return quantization

    @field_validator("targets")
    @classmethod
    def _targets_fit_student(cls, targets: SearchTargets | None, info: ValidationInfo) -> SearchTargets | None:
        if "student" not in info.data:  # the student itself is invalid: reported there
            return targets
        student = info.data["student"]
        kind = None if student is None else student.kind
        if targets is not None and kind is None:
            raise ValueError("targets drive a student search: give student {'kind': 'search'} (or 'auto')")
        if targets is not None and kind not in ("auto", "search"):
            raise ValueError(f"targets drive a student search, but a {kind!r} student is fixed: "
                             "use student kind 'search' (or 'auto'), or drop the targets")
        if targets is None and kind == "search":
            raise ValueError("student.kind 'search' needs targets (what the model must meet)")
        return targets

    @model_validator(mode="after")
    def _auto_searches(self) -> CompressSpec:
        """``auto`` with targets is a search; the stored spec says so."""
        if self.targets is not None and isinstance(self.student, AutoStudent):
            self.student = SearchStudent(**self.student.model_dump(exclude={"kind"}))
        return self
