"""Engine specs as pydantic models. Torch-free: the HTTP service validates job specs with them.

A job is a `CompressSpec`. Its ``student`` and ``quantization`` are discriminated unions: one config
class per student kind (keyed by ``kind``) and per quantization method (keyed by ``method``), each
with only its own fields, published as such in the OpenAPI document.
"""

from .base import LOWER_IS_BETTER, Metric, SpecModel
from .data import DataSpec
from .evaluation import EvaluationSpec, SearchTargets
from .job import CompressSpec
from .quantization import (
    AutoQuantizationConfig,
    DynamicInt8Config,
    Int4Config,
    NoQuantizationConfig,
    QatConfig,
    QuantizationConfig,
    QuantizationMethod,
    QuantizationSpec,
    StaticInt8Config,
    WeightOnlyInt8Config,
)
from .student import (
    AutoStudent,
    DerivedStudent,
    HFConfigStudent,
    SearchStudent,
    StudentConfig,
    StudentKind,
    StudentSpec,
    ZooStudent,
)
from .training import DistillSpec, TargetSpec

__all__ = [
    "LOWER_IS_BETTER",
    "AutoQuantizationConfig",
    "AutoStudent",
    "CompressSpec",
    "DataSpec",
    "DerivedStudent",
    "DistillSpec",
    "DynamicInt8Config",
    "EvaluationSpec",
    "HFConfigStudent",
    "Int4Config",
    "Metric",
    "NoQuantizationConfig",
    "QatConfig",
    "QuantizationConfig",
    "QuantizationMethod",
    "QuantizationSpec",
    "SearchStudent",
    "SearchTargets",
    "SpecModel",
    "StaticInt8Config",
    "StudentConfig",
    "StudentKind",
    "StudentSpec",
    "TargetSpec",
    "WeightOnlyInt8Config",
    "ZooStudent",
]
