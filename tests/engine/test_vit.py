"""Hugging Face ViT image classifiers as teachers: loading, derived students, preprocessing, a whole job
(tiny models trained offline on generated pattern images, `bench.field_vit`)."""

from __future__ import annotations

import json
import shutil
import zipfile

import numpy as np
import onnxruntime as ort
import pytest
import torch
from transformers import ViTForImageClassification

from bench.field_vit import CLASSES, as_inputs, pattern_images, vit_problem
from worker.compression.compress import compress
from worker.compression.errors import ModelFileError, SpecError
from worker.compression.io.datasets import load_for_teacher
from worker.compression.io.hf_folder import load_hf_teacher
from worker.compression.io.teachers import load_teacher
from worker.compression.spec import CompressSpec, DataSpec
from worker.compression.students.factory import make_student, save_student
from worker.compression.students.hf_ladder import hf_ladder
from worker.compression.students.hf_vision import HFVisionEncoder

SIZE = 16
TINY = {"hidden_size": 32, "num_hidden_layers": 4, "intermediate_size": 64}


@pytest.fixture(scope="module")
def problem(tmp_path_factory):
    """A ViT (4 layers, 16×16 images, 4×4 patches) trained for 300 steps on 4 pattern classes (0.77 accuracy
    on images it has not seen)."""
    torch.set_num_threads(1)
    return vit_problem(tmp_path_factory.mktemp("vit"), size=SIZE, per_class=30, steps=300, **TINY)


def _student(teacher, **student):
    return make_student(teacher, CompressSpec.model_validate({"student": student}).student)


def test_a_vit_folder_or_zip_loads_as_an_image_classifier(problem, tmp_path):
    teacher = load_teacher(problem["teacher"])
    assert (teacher.kind, teacher.task, teacher.input_kind) == ("hf", "classification", "image")
    assert teacher.input_shape == (3, SIZE, SIZE) and teacher.output_dim == 4
    assert teacher.classes == list(CLASSES) and teacher.tokenizer is None
    assert isinstance(teacher.module, HFVisionEncoder)
    reference = ViTForImageClassification.from_pretrained(problem["teacher"]).eval()
    x = as_inputs(pattern_images(3, SIZE, seed=5)[0])
    with torch.no_grad():
        expected = reference(pixel_values=x).logits
    assert torch.allclose(teacher.predict({"x": x}), expected, atol=1e-5)

    archive = shutil.make_archive(str(tmp_path / "vit"), "zip", problem["teacher"])
    again = load_teacher(archive)
    assert again.input_shape == teacher.input_shape
    assert torch.allclose(again.predict({"x": x}), expected, atol=1e-5)

    features = teacher.features({"x": x})
    assert len(features.hidden) == 5 and features.hidden[0].shape == (12, 1 + (SIZE // 4) ** 2, 32)
    assert len(features.attentions) == 4 and features.attentions[0].shape == (12, 4, 17, 17)


def test_the_preprocessor_config_sets_mean_and_std_unless_the_job_does(problem, tmp_path):
    teacher = load_teacher(problem["teacher"])
    assert teacher.preprocessing["image_mean"] == [0.5] * 3 and teacher.preprocessing["image_std"] == [0.5] * 3
    train, _, _ = load_for_teacher(problem["data"], None, DataSpec(), teacher, "classification")
    assert train.meta["image_scale"] == "teacher (preprocessor_config.json)"
    assert -1.0 <= float(train.inputs["x"].min()) < -0.5 and 0.5 < float(train.inputs["x"].max()) <= 1.0
    own, _, _ = load_for_teacher(problem["data"], None, DataSpec(image_scale="0-1"), teacher, "classification")
    assert float(own.inputs["x"].min()) >= 0.0 and own.meta["image_scale"] == "0-1"

    folder = tmp_path / "raw"
    shutil.copytree(problem["teacher"], folder)
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    # pixels kept in 0..255, ImageNet-like numbers on that scale: restated for pixels in [0, 1]
    processor.update(do_rescale=False, image_mean=[127.5, 127.5, 127.5], image_std=[63.75, 63.75, 63.75])
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    pre = load_hf_teacher(folder).preprocessing
    assert pre["image_mean"] == pytest.approx([0.5] * 3) and pre["image_std"] == pytest.approx([0.25] * 3)

    processor["size"] = {"height": 224, "width": 224}
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    with pytest.raises(ModelFileError, match="224x224 but config.json's image_size is 16x16"):
        load_hf_teacher(folder)
    (folder / "preprocessor_config.json").unlink()
    assert load_hf_teacher(folder).preprocessing is None


def test_derived_students_keep_evenly_spaced_layers_initialised_from_the_teacher(problem):
    teacher = load_teacher(problem["teacher"])
    x = as_inputs(pattern_images(2, SIZE, seed=7)[0])
    whole = _student(teacher, kind="derived", num_layers=4)
    with torch.no_grad():
        assert torch.allclose(whole.module(x=x), teacher.predict({"x": x}), atol=1e-5)

    two = _student(teacher, kind="derived", num_layers=2, width_ratio=0.5)
    assert two.layer_map == {0: 0, 1: 1, 2: 4} and two.module.config.num_hidden_layers == 2
    assert two.module.config.intermediate_size == 32 and two.num_parameters < teacher.num_parameters / 2
    src, dst = teacher.module.backbone.state_dict(), two.module.backbone.state_dict()
    for key in ("vit.embeddings.patch_embeddings.projection.weight", "vit.embeddings.position_embeddings",
                "vit.embeddings.cls_token", "classifier.weight"):
        assert torch.equal(src[key], dst[key]), key
    assert torch.equal(dst["vit.layers.1.attention.q_proj.weight"], src["vit.layers.3.attention.q_proj.weight"])
    assert not torch.equal(dst["vit.layers.1.attention.q_proj.weight"], src["vit.layers.1.attention.q_proj.weight"])
    assert two.module(x=x).shape == (len(x), 4)

    auto = _student(teacher, kind="auto")
    assert auto.how == "auto" and auto.num_parameters <= teacher.num_parameters // 4 + 1
    assert isinstance(auto.module, HFVisionEncoder)


def test_a_grayscale_vit_reads_rgb_pngs_as_one_channel(problem, tmp_path):
    """A 1-channel ViT whose processor repeats ViT's default mean and std for three channels."""
    from bench.field_vit import vit_config

    folder = tmp_path / "gray"
    ViTForImageClassification(vit_config(SIZE, num_channels=1, **TINY)).eval().save_pretrained(folder)
    shutil.copyfile(problem["teacher"] / "preprocessor_config.json", folder / "preprocessor_config.json")
    teacher = load_teacher(folder)
    assert teacher.input_shape == (1, SIZE, SIZE) and teacher.preprocessing["image_mean"] == [0.5]
    train, _, _ = load_for_teacher(problem["data"], None, DataSpec(), teacher, "classification")
    assert tuple(train.inputs["x"].shape[1:]) == (1, SIZE, SIZE) and float(train.inputs["x"].min()) < 0


def test_a_vit_backbone_without_a_classifier_is_refused(tmp_path):
    from transformers import ViTModel

    from bench.field_vit import vit_config
    from worker.compression.errors import MissingTensorError

    ViTModel(vit_config(SIZE, **TINY)).save_pretrained(tmp_path / "bare")
    with pytest.raises(MissingTensorError, match="no classification head; use a ViTForImageClassification"):
        load_teacher(tmp_path / "bare")


def test_what_vision_teachers_do_not_support_is_refused_by_name(problem):
    teacher = load_teacher(problem["teacher"])
    with pytest.raises(ModelFileError, match="embedding"):
        load_hf_teacher(problem["teacher"], task="embedding")
    with pytest.raises(SpecError, match="search over vit students is not supported"):
        hf_ladder(teacher, None)


def test_a_compression_job_distils_exports_quantizes_and_delivers(problem, tmp_path):
    spec = CompressSpec.model_validate({
        "student": {"kind": "derived", "num_layers": 2},  # hidden-state and attention KD on the layer map, too
        "distillation": {"epochs": 2, "batch_size": 16, "lr": 1e-3, "feature_loss": "mse", "attention_weight": 0.5},
        "quantization": {"method": "static_int8", "calibration_samples": 32},
        "evaluation": {"latency_batch_sizes": [1, 16], "repeats": 2, "warmup": 1}})
    res = compress(spec, teacher_path=problem["teacher"], dataset_path=problem["data"], output_dir=tmp_path / "out")
    report = res.metrics
    rows = {r["name"]: r for r in report["models"]}
    assert {"teacher", "student", "int8"} <= set(rows)
    assert report["teacher_check"]["passed"] and "image_scale" not in report["teacher_check"]
    assert rows["teacher"]["metric"]["accuracy"] > 0.5  # a trained teacher, checked against the labels
    assert 0.0 <= rows["student"]["metric"]["accuracy"] <= 1.0
    assert report["quantization"]["method"] == "static_int8"
    assert report["summary"]["verdict"] in ("ship", "ship_with_caution", "do_not_ship")
    assert report["preprocessing"]["image"]["mean"] == [0.5] * 3
    assert report["preprocessing"]["image"]["scale"] == "teacher (preprocessor_config.json)"

    kinds = {a.name: a.path for a in res.artifacts}
    fp32, int8 = kinds["model_fp32.onnx"], kinds["model_int8.onnx"]
    assert [i.name for i in ort.InferenceSession(str(fp32)).get_inputs()] == ["x"]
    assert int8.stat().st_size < fp32.stat().st_size
    with zipfile.ZipFile(kinds["student.zip"]) as zf:
        zf.extractall(tmp_path / "student")
    student = load_teacher(tmp_path / "student")
    assert student.input_kind == "image" and student.module.config.num_hidden_layers == 2
    assert student.preprocessing == load_teacher(problem["teacher"]).preprocessing
    x = as_inputs(pattern_images(2, SIZE, seed=9)[0])
    onnx_out = ort.InferenceSession(str(fp32)).run(None, {"x": x.numpy()})[0]
    assert np.allclose(onnx_out, student.predict({"x": x}).numpy(), atol=1e-4)


def test_an_auto_student_quantized_auto_is_dynamic_int8(problem, tmp_path):
    """``auto`` quantization: a ViT graph has attention, so dynamic int8 (as for text transformers)."""
    spec = CompressSpec.model_validate({
        "student": {"kind": "auto"}, "distillation": {"epochs": 1, "batch_size": 16, "lr": 1e-3},
        "evaluation": {"latency_batch_sizes": [1], "repeats": 2, "warmup": 1}})
    res = compress(spec, teacher_path=problem["teacher"], dataset_path=problem["data"], output_dir=tmp_path / "o")
    report = res.metrics
    assert report["quantization"]["method"] == "dynamic_int8"
    tried = {t["format"]: t for t in report["quantization"]["tried"]}  # measured with and without fusion
    assert set(tried) == {"dynamic_int8", "dynamic_int8_fused"} and sum(t["chosen"] for t in tried.values()) == 1
    assert tried["dynamic_int8_fused"]["fused_ops"]["SkipLayerNormalization"] == 2  # residual adds + LayerNorm
    assert tried["dynamic_int8"]["fused_ops"] is None
    assert report["student"]["how"] == "auto" and report["student"]["kind"] == "hf"
    assert report["student"]["num_parameters"] <= load_teacher(problem["teacher"]).num_parameters // 4 + 1
    assert report["summary"]["verdict"] in ("ship", "ship_with_caution", "do_not_ship")
    saved = save_student(make_student(load_teacher(problem["teacher"]), spec.student), tmp_path / "s",
                         load_teacher(problem["teacher"]))
    assert (saved / "preprocessor_config.json").is_file()
