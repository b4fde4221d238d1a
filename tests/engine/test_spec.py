"""The job spec: student kinds and quantization methods as discriminated unions, each config with only
its own fields; defaults as before; stored specs of the flat models still validate; torch-free."""

from __future__ import annotations

import subprocess
import sys
from typing import get_args

import pytest
from pydantic import ValidationError

from worker.compression.quantize.api import quantize
from worker.compression.quantize.registry import HANDLERS
from worker.compression.spec import (
    AutoQuantizationConfig,
    AutoStudent,
    CompressSpec,
    DerivedStudent,
    DynamicInt8Config,
    HFConfigStudent,
    Int4Config,
    NoQuantizationConfig,
    QatConfig,
    QuantizationMethod,
    SearchStudent,
    StaticInt8Config,
    StudentKind,
    WeightOnlyInt8Config,
    ZooStudent,
)

FLAT_QUANTIZATION = {"method": "auto", "backend": "onnxruntime", "calibration": "percentile", "percentile": 99.99,
                     "calibration_samples": 256, "per_channel": True, "block_size": 32, "max_metric_drop": None,
                     "drop_mode": "absolute", "qat_epochs": 3}
FLAT_STUDENT = {"kind": "auto", "max_params": None, "max_params_ratio": None, "layers": None, "num_layers": None,
                "width_ratio": None, "architecture": None, "hf_config": None}
"""What a job spec stored before the unions holds: the flat models' full dumps."""


def _error(body: dict) -> tuple[tuple, str]:
    with pytest.raises(ValidationError) as err:
        CompressSpec.model_validate(body)
    (e,) = err.value.errors()
    return e["loc"], e["msg"]


def test_defaults_are_what_they_were():
    spec = CompressSpec()
    assert spec.student == AutoStudent() and spec.quantization == AutoQuantizationConfig()
    assert spec.model_dump(mode="json")["quantization"] == {"method": "auto", "backend": "onnxruntime",
                                                            "max_metric_drop": None, "drop_mode": "absolute"}
    assert spec.model_dump(mode="json")["student"] == {"kind": "auto", "max_params": None, "max_params_ratio": None}
    assert CompressSpec.model_validate({"student": None}).student is None  # no distillation
    assert isinstance(CompressSpec.model_validate({"targets": {"max_drop": 0.01}}).student, SearchStudent)
    searched = CompressSpec.model_validate({"student": {"max_params": 5000}, "targets": {"min": 0.9}}).student
    assert searched == SearchStudent(max_params=5000)
    # a config without its tag is the default kind / method, as the flat models had it
    spec = CompressSpec.model_validate({"quantization": {"max_metric_drop": 0.02}, "student": {"max_params": 10}})
    assert spec.quantization == AutoQuantizationConfig(max_metric_drop=0.02)
    assert spec.student == AutoStudent(max_params=10)


@pytest.mark.parametrize(("body", "cls"), [
    ({"method": "none"}, NoQuantizationConfig),
    ({"method": "dynamic_int8", "per_channel": False}, DynamicInt8Config),
    ({"method": "static_int8", "calibration": "entropy", "calibration_samples": 64}, StaticInt8Config),
    ({"method": "weight_only_int8", "block_size": 64}, WeightOnlyInt8Config),
    ({"method": "int4", "block_size": 16, "max_metric_drop": 0.01}, Int4Config),
    ({"method": "qat", "qat_epochs": 2, "per_channel": False}, QatConfig),
])
def test_each_method_is_its_own_config(body, cls):
    q = CompressSpec.model_validate({"quantization": body}).quantization
    assert type(q) is cls and q.model_dump(include=set(body)) == body


@pytest.mark.parametrize(("quantization", "loc", "words"), [
    ({"method": "dynamic_int8", "calibration": "minmax"}, ("quantization", "calibration"),
     "Extra inputs"),
    ({"method": "auto", "calibration_samples": 64}, ("quantization", "calibration_samples"), "Extra inputs"),
    ({"method": "int4", "per_channel": False}, ("quantization", "per_channel"), "Extra inputs"),
    ({"method": "none", "max_metric_drop": 0.1}, ("quantization", "max_metric_drop"), "Extra inputs"),
    ({"method": "qat", "calibration": "percentile"}, ("quantization", "calibration"), "Extra inputs"),
    ({"method": "static_int8", "backend": "torch"}, ("quantization", "backend"), "onnxruntime"),
    ({"method": "int2"}, ("quantization",), "does not match any of the expected tags"),
])
def test_a_method_refuses_fields_it_does_not_have(quantization, loc, words):
    """Locations are paths in the body (the service's JSON pointers): the chosen tag is no segment."""
    got_loc, msg = _error({"quantization": quantization})
    assert got_loc == loc and words in msg


def test_qat_needs_a_student():
    assert _error({"student": None, "quantization": {"method": "qat"}}) == (
        ("quantization",), "Value error, quantization 'qat' trains the student under simulated int8: give a "
                           "'student' or another method")
    assert isinstance(CompressSpec.model_validate({"quantization": {"method": "qat"}}).quantization, QatConfig)


@pytest.mark.parametrize(("student", "loc", "words"), [
    ({"kind": "zoo"}, ("student", "architecture"), "Field required"),
    ({"kind": "zoo", "architecture": {}}, ("student", "architecture"), "at least 1"),
    ({"kind": "hf_config"}, ("student", "hf_config"), "Field required"),
    ({"kind": "auto", "num_layers": 2}, ("student", "num_layers"), "Extra inputs"),
    ({"kind": "zoo", "architecture": {"architecture": "mlp"}, "width_ratio": 0.5},
     ("student", "width_ratio"), "Extra inputs"),
    ({"kind": "derived", "layers": [0, 1], "num_layers": 3}, ("student",), "disagree"),
    ({"kind": "derived", "max_params": 10, "max_params_ratio": 0.5}, ("student",), "not both"),
    ({"kind": "teacher"}, ("student",), "does not match any of the expected tags"),
])
def test_a_student_kind_refuses_what_it_does_not_take(student, loc, words):
    got_loc, msg = _error({"student": student})
    assert got_loc == loc and words in msg


def test_student_kinds_keep_their_own_fields():
    spec = CompressSpec.model_validate({"student": {"kind": "derived", "layers": [0, 2], "width_ratio": 0.5}})
    assert spec.student == DerivedStudent(layers=[0, 2], width_ratio=0.5)
    zoo = CompressSpec.model_validate({"student": {"kind": "zoo", "architecture": {"architecture": "mlp"},
                                                   "max_params": 100}}).student
    assert zoo == ZooStudent(architecture={"architecture": "mlp"}, max_params=100)
    hf = CompressSpec.model_validate({"student": {"kind": "hf_config", "hf_config": {"num_hidden_layers": 2}}})
    assert isinstance(hf.student, HFConfigStudent)


def test_specs_stored_as_the_flat_models_still_validate():
    stored = {"student": {**FLAT_STUDENT, "kind": "zoo", "architecture": {"architecture": "mlp", "hidden": [8]},
                          "num_layers": 2},  # the flat model ignored num_layers for zoo
              "quantization": {**FLAT_QUANTIZATION, "method": "static_int8", "calibration": "minmax",
                               "calibration_samples": 64}}
    spec = CompressSpec.model_validate(stored)
    assert spec.student == ZooStudent(architecture={"architecture": "mlp", "hidden": [8]})
    assert spec.quantization == StaticInt8Config(calibration="minmax", calibration_samples=64)
    assert CompressSpec.model_validate({"student": FLAT_STUDENT, "quantization": FLAT_QUANTIZATION}) == CompressSpec()
    qat = CompressSpec.model_validate({"quantization": {**FLAT_QUANTIZATION, "method": "qat", "qat_epochs": 5}})
    assert qat.quantization == QatConfig(qat_epochs=5)
    # only a full dump is a stored spec: a client's partial body is held to the method's own fields
    assert _error({"quantization": {"method": "dynamic_int8", "calibration": "minmax"}})[1].startswith("Extra")
    # and every spec dumps to what it validates from
    for spec in (CompressSpec(), qat, CompressSpec.model_validate(stored)):
        assert CompressSpec.model_validate(spec.model_dump(mode="json")) == spec


def test_the_schema_publishes_the_unions_with_their_discriminators():
    schema = CompressSpec.model_json_schema()
    props = schema["properties"]
    quant = props["quantization"]
    assert quant["discriminator"]["propertyName"] == "method"
    assert set(quant["discriminator"]["mapping"]) == {"auto", "none", "dynamic_int8", "static_int8",
                                                      "weight_only_int8", "int4", "qat"}
    student = next(s for s in props["student"]["anyOf"] if "discriminator" in s)
    assert student["discriminator"]["propertyName"] == "kind"
    assert set(student["discriminator"]["mapping"]) == {"auto", "derived", "zoo", "hf_config", "search"}
    static = schema["$defs"]["StaticInt8Config"]["properties"]
    assert {"calibration", "percentile", "calibration_samples", "per_channel"} <= set(static)
    assert "calibration" not in schema["$defs"]["DynamicInt8Config"]["properties"]


def test_every_method_has_exactly_one_handler(tmp_path):
    assert set(HANDLERS) == set(get_args(QuantizationMethod))
    assert {get_args(k.model_fields["kind"].annotation)[0] for k in get_args(StudentKind)} == {
        "auto", "derived", "zoo", "hf_config", "search"}
    assert quantize.__module__ == "worker.compression.quantize.api"


def test_the_spec_imports_without_torch():
    code = ("import sys; import worker.compression.spec as s; s.CompressSpec.model_json_schema(); "
            "bad = [m for m in ('torch', 'onnx', 'onnxruntime', 'transformers') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_a_default_run_trains_a_minimum_of_steps_and_named_epochs_are_kept():
    from worker.compression.distill.distill import with_min_steps

    default = CompressSpec().distillation
    assert default.epochs == 20 and default.min_steps == 2000
    assert with_min_steps(default, 400, "vector").epochs == 200  # 7 steps per epoch: capped at 10x the epochs
    assert with_min_steps(default, 6_400, "vector").epochs == 20  # 100 steps per epoch reach 2,000 in 20
    assert with_min_steps(default.model_copy(update={"batch_size": 32}), 1_600, "image").epochs == 40
    assert with_min_steps(default, 400, "tokens").epochs == 20  # transformers train their epochs
    named = CompressSpec.model_validate({"distillation": {"epochs": 3}}).distillation
    assert named.min_steps is None and with_min_steps(named, 400, "vector").epochs == 3
    both = CompressSpec.model_validate({"distillation": {"epochs": 3, "min_steps": 100}}).distillation
    assert with_min_steps(both, 400, "vector").epochs == 15
    stored = CompressSpec.model_validate(CompressSpec().model_dump(mode="json")).distillation
    assert stored.min_steps == 2000  # a stored spec keeps what it was given
