"""Click-through (CTR) data: categorical vocabularies (OOV bucket, cap, hashing), recorded for the bundle."""

from __future__ import annotations

import json
import math
import runpy
import zipfile
import zlib

import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
import torch

from bench.field_ctr import ctr_problem, onnx_click_problem
from worker.compression.compress import compress
from worker.compression.errors import DatasetError, SpecError
from worker.compression.io.data_vocab import encode
from worker.compression.io.datasets import load_dataset, load_for_teacher
from worker.compression.io.teachers import load_teacher
from worker.compression.measure.metrics import click_metrics, paired_drop_noise
from worker.compression.search.ladder import build_ladder
from worker.compression.spec import CompressSpec, DataSpec, SearchStudent
from worker.compression.students import zoo
from worker.compression.students.factory import make_student

ROWS = "site,price,device,label\na,1.0,x,1\nb,2.0,y,0\na,3.0,,1\nc,4,x,0\na,5,x,1\n"


def test_text_columns_become_ids_with_an_oov_bucket(tmp_path):
    path = tmp_path / "clicks.csv"
    path.write_text(ROWS)
    data = load_dataset(path)
    site, device = data.meta["categorical"]
    assert site["tokens"] == ["a", "b", "c"] and site["size"] == 4 and site["index"] == 0
    assert device["tokens"] == ["x", "", "y"]  # most frequent first, ties in string order; empty is a value
    assert data.inputs["x"][:, 0].tolist() == [1, 2, 1, 3, 1]  # ids 1.. for tokens
    assert data.inputs["x"][:, 1].tolist() == [1, 2, 3, 4, 5]  # numeric columns stay numbers
    assert data.meta["field"] == "ctr" and data.meta["categorical_columns"] == "site,device"
    assert encode(["b", "zzz"], site).tolist() == [2, 0]  # unseen: the out-of-vocabulary id 0


def test_cap_keeps_the_most_frequent_and_many_values_are_hashed(tmp_path):
    path = tmp_path / "clicks.csv"
    path.write_text(ROWS)
    data = load_dataset(path, DataSpec(max_categories=1))
    assert data.meta["categorical"][0]["tokens"] == ["a"]
    assert data.inputs["x"][:, 0].tolist() == [1, 0, 1, 0, 1]  # b and c past the cap: OOV
    hashed = load_dataset(path, DataSpec(hash_above=2, hash_buckets=7)).meta["categorical"][0]
    assert hashed["kind"] == "hash" and hashed["size"] == 7 and "tokens" not in hashed
    assert encode(["c"], hashed).tolist() == [zlib.crc32(b"c") % 7]


def test_named_columns_keep_their_text_and_typos_stay_errors(tmp_path):
    path = tmp_path / "clicks.csv"
    path.write_text("zip,price,label\n007,1,0\n7,2,1\n007,3,1\n")
    data = load_dataset(path, DataSpec(categorical_columns=["zip"]))
    assert data.meta["categorical"][0]["tokens"] == ["007", "7"]  # read as written, not as the number 7
    assert "categorical" not in load_dataset(path).meta  # numbers are not categories unless named
    path.write_text("a,b,label\n1,2,0\n3,oops,1\n5,6,0\n")
    with pytest.raises(DatasetError, match="'oops' is not a finite number"):
        load_dataset(path)
    with pytest.raises(DatasetError, match="no categorical column 'nope'"):
        load_dataset(path, DataSpec(categorical_columns=["nope"]))


def test_eval_file_is_read_with_the_training_vocabulary(tmp_path):
    train, held = tmp_path / "train.csv", tmp_path / "eval.csv"
    train.write_text(ROWS)
    held.write_text("site,price,device,label\nc,1,new,0\nq,2,x,1\n")
    vocabs = load_dataset(train).meta["categorical"]
    data = load_dataset(held, vocabularies=vocabs)
    assert data.inputs["x"][:, 0].tolist() == [3, 0] and data.inputs["x"][:, 2].tolist() == [0, 1]
    held.write_text("price,site,device,label\n1,c,x,0\n2,a,x,1\n")
    with pytest.raises(DatasetError, match="column 'site' is feature 1"):
        load_dataset(held, vocabularies=vocabs)


def test_ctr_task_needs_binary_click_labels(tmp_path):
    path = tmp_path / "clicks.csv"
    path.write_text("site,price,label\na,1,0\nb,2,1\nc,3,2\n")
    with pytest.raises(DatasetError, match="task 'ctr' needs click labels of two classes"):
        load_dataset(path, DataSpec(task="ctr"))
    assert "field" not in load_dataset(path).meta  # three classes: a plain classification


# --- the zoo ctr family, distilled ----------------------------------------------------------


@pytest.fixture(scope="module")
def clicks(tmp_path_factory):
    """Click logs from a known ground truth (`bench.field_ctr`), a zoo ctr teacher trained on them (AUC ≈ 0.80)."""
    torch.set_num_threads(1)
    return ctr_problem(tmp_path_factory.mktemp("ctr"), rows=6000, epochs=3)


def test_a_ctr_teacher_carries_its_vocabularies_and_exports(clicks, tmp_path):
    teacher = load_teacher(clicks["teacher"])
    assert (teacher.kind, teacher.input_kind, teacher.output_dim) == ("zoo", "vector", 2)
    assert [v["column"] for v in teacher.config["categorical"]] == ["site", "app", "hour", "user"]
    assert teacher.config["categorical"][3]["kind"] == "hash"  # 20,000 users past hash_above
    train, _, _ = load_for_teacher(clicks["data"], None, DataSpec(**clicks["spec"]), teacher, "classification")
    assert train.meta["categorical"] == teacher.config["categorical"]
    teacher_auc = click_metrics(teacher.predict(clicks["eval"].inputs), clicks["eval"].y)["auc"]
    assert 0.75 < teacher_auc < 0.9
    dot = zoo.build({**teacher.config, "interaction": "dot"})
    x = clicks["eval"].inputs["x"][:5].clone()
    x[0, 0] = 10**6  # an id past its table reads the last row, not an error
    assert dot(x).shape == (5, 2)
    student = make_student(teacher, CompressSpec.model_validate({"student": {"kind": "auto"}}).student)
    assert student.config["embedding_dim"] < 16 and student.num_parameters < teacher.num_parameters


def test_distilled_ctr_student_keeps_auc_and_the_bundle_maps_raw_strings(clicks, tmp_path):
    spec = CompressSpec.model_validate({
        "data": clicks["spec"], "student": {"kind": "auto"},
        "distillation": {"epochs": 6, "batch_size": 64, "lr": 3e-3},
        "evaluation": {"latency_batch_sizes": [1, 64], "repeats": 5, "warmup": 1}})
    result = compress(spec, teacher_path=clicks["teacher"], dataset_path=clicks["data"], output_dir=tmp_path)
    delivery = result.metrics["delivery"]
    assert delivery["metric"] == "auc" and delivery["tolerance"] == 0.005
    teacher_auc = result.metrics["summary"]["models"]["teacher"]["auc"]
    chosen = next(c for c in delivery["candidates"] if c["name"] == delivery["chosen"])
    assert chosen["auc"] >= teacher_auc - 0.005, (chosen, teacher_auc)  # the verdict's tolerance
    assert "metric_drop" not in {r["code"] for r in delivery["reasons"]}
    assert result.metrics["teacher_check"]["metric"] == "auc"
    sizes = {c["name"]: c["size_bytes"] for c in delivery["candidates"]}
    assert sizes["int8"] < 0.6 * sizes["student"]  # dynamic int8 quantizes the embedding tables (Gather) too

    with zipfile.ZipFile(tmp_path / "bundle.zip") as zf:
        zf.extractall(tmp_path / "bundle")
    pre = json.loads((tmp_path / "bundle" / "preprocessing.json").read_text())
    assert [v["column"] for v in pre["tabular"]["categorical"]] == ["site", "app", "hour", "user"]
    rows = tmp_path / "rows.csv"
    rows.write_text("site,price,app,hour,age_days,user,position\ns0,0.1,app_3,h07,1.0,u5,-0.5\n"
                    "never-seen,0.1,app_3,h07,1.0,u5,-0.5\n")
    bundle = runpy.run_path(str(tmp_path / "bundle" / "predict.py"))["Bundle"](tmp_path / "bundle")
    answers = bundle.predict_files([rows])
    assert len(answers) == 2 and answers[0]["probability"] != answers[1]["probability"]
    x = load_dataset(rows, DataSpec(**{**clicks["spec"], "label_column": None, "task": None}),
                     vocabularies=pre["tabular"]["categorical"]).inputs["x"].numpy()
    ids = bundle.table(rows)[bundle.inputs[0]]
    assert np.array_equal(ids, x)  # the bundle maps raw strings exactly as the job read them


def test_bad_ctr_configs_and_vocabularies_are_named(clicks, tmp_path):
    cfg = json.loads((clicks["teacher"] / "config.json").read_text())
    for bad, message in [({"categorical": []}, "categorical must list"),
                         ({"categorical": [{"index": 9, "size": 3}]}, "categorical index 9 must be"),
                         ({"interaction": "cross"}, "interaction must be one of")]:
        with pytest.raises(SpecError, match=message):
            zoo.validate_config({**cfg, **bad})
    with pytest.raises(DatasetError, match="tokens must be a list of strings"):
        load_dataset(clicks["data"], DataSpec(**clicks["spec"]),
                     vocabularies=[{**cfg["categorical"][0], "tokens": "s0,s1"}])


def test_parquet_string_columns_and_the_search_ladder(clicks, tmp_path):
    path = tmp_path / "clicks.parquet"
    pd.read_csv(clicks["data"], dtype={"site": str}).to_parquet(path)
    data = load_dataset(path, DataSpec(**clicks["spec"]))
    assert data.meta["categorical_columns"] == "site,app,hour,user"
    assert torch.equal(data.inputs["x"], load_dataset(clicks["data"], DataSpec(**clicks["spec"])).inputs["x"])
    teacher = load_teacher(clicks["teacher"])
    names = [c.name for c in build_ladder(teacher, clicks["train"], SearchStudent())]
    assert names[0] == "teacher" and all(n.startswith("ctr-concat-e") for n in names[1:]), names


def test_auc_targets_need_binary_labels(tmp_path):
    from service.api.jobcheck import check_job

    spec = CompressSpec.model_validate({"student": {"kind": "auto"}, "targets": {"metric": "auc", "min": 0.7}})
    teacher = {"task": "classification", "input_kind": "vector"}
    errors = check_job(spec, teacher, {"num_classes": 3, "input_kind": "vector"})
    assert [e.pointer for e in errors] == ["#/targets/metric"] and "binary" in errors[0].detail
    assert check_job(spec, teacher, {"num_classes": 2, "input_kind": "vector"}) == []
    metrics = click_metrics(torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 2.0]]), torch.tensor([1, 0, 1]))
    assert metrics["auc"] == 1.0 and metrics["log_loss"] == pytest.approx((2 * math.log1p(math.exp(-1)) + math.log1p(math.exp(-2))) / 3)
    assert click_metrics(torch.zeros(3, 3), torch.tensor([0, 1, 2])) == {}  # three classes: no AUC
    teacher_out, y = torch.tensor([[0.0, 1.0], [1.0, 0.0]] * 50), torch.tensor([1, 0] * 50)
    noise = paired_drop_noise("log_loss", "classification", teacher_out, teacher_out * 0.5, y)
    assert noise is not None and noise == pytest.approx(0.0, abs=1e-9)  # the same drop on every row: no noise
    assert paired_drop_noise("auc", "classification", teacher_out, teacher_out, y) is None


# --- multi-input ONNX click teachers (`io.onnx_inputs`) ---------------------------------------


def test_a_multi_input_onnx_click_teacher_runs_as_one_x(clicks, tmp_path):
    made = onnx_click_problem(tmp_path / "onnx", clicks, epochs=2)
    teacher = load_teacher(made["teacher"])
    assert (teacher.kind, teacher.input_kind, teacher.input_shape, teacher.input_names) == ("onnx", "vector", (7,), ("x",))
    layout = teacher.config["ids_layout"]
    assert [s["name"] for s in layout["ids"]] == ["site", "app", "hour", "user"]
    assert [s["size"] for s in layout["ids"]] == [v["size"] for v in clicks["config"]["categorical"]]  # from Gather
    train, _, _ = load_for_teacher(made["data"], None, DataSpec(**made["spec"]), teacher, "classification")
    assert train.meta["columns"] == ["site", "app", "hour", "user", "price", "age_days", "position"]  # ids first
    x = train.inputs["x"][:16]
    session = ort.InferenceSession(str(made["teacher"]), providers=["CPUExecutionProvider"])
    direct = session.run(None, {"dense": x[:, 4:].numpy(), **{n: x[:, j].long().numpy()
                                                              for j, n in enumerate(["site", "app", "hour", "user"])}})[0]
    assert np.allclose(teacher.predict({"x": x}).numpy(), direct, atol=1e-6)  # the wrapped graph is the same model

    student = make_student(teacher, CompressSpec.model_validate({"student": {"kind": "auto"}}).student)
    assert student.config["architecture"] == "ctr" and [c["size"] for c in student.config["categorical"]] == \
        [s["size"] for s in layout["ids"]]

    text = tmp_path / "text.csv"
    text.write_text(clicks["data"].read_text())  # site as "s12": not the ids the teacher was trained on
    with pytest.raises(DatasetError, match="column 'app' feeds the ONNX teacher's id input"):
        load_for_teacher(text, None, DataSpec(task="ctr", label_column="click"), teacher, "classification")


def test_a_multi_input_onnx_click_job_delivers_a_ctr_student(clicks, tmp_path):
    made = onnx_click_problem(tmp_path / "onnx", clicks, epochs=2)
    spec = CompressSpec.model_validate({
        "data": made["spec"], "student": {"kind": "auto", "max_params_ratio": 0.5},
        "distillation": {"epochs": 3, "batch_size": 64, "lr": 3e-3},
        "evaluation": {"latency_batch_sizes": [1, 64], "repeats": 3, "warmup": 1}})
    result = compress(spec, teacher_path=made["teacher"], dataset_path=made["data"], output_dir=tmp_path / "out")
    assert result.metrics["student"]["config"]["architecture"] == "ctr"
    assert result.metrics["delivery"]["metric"] == "auc"
    assert result.metrics["summary"]["models"]["student"]["auc"] > 0.65
    with zipfile.ZipFile(tmp_path / "out" / "bundle.zip") as zf:
        zf.extractall(tmp_path / "bundle")
    bundle = runpy.run_path(str(tmp_path / "bundle" / "predict.py"))["Bundle"](tmp_path / "bundle")
    assert len(bundle.predict_files([made["data"]])) == len(clicks["train"]) + len(clicks["eval"])


def test_text_columns_for_a_teacher_of_numbers_are_refused_unless_named(tmp_path):
    """An MLP trained on numbers has no vocabulary: ids the job invented would be inputs it never saw."""
    cfg = {"architecture": "mlp", "task": "classification", "input_dim": 2, "hidden": [8], "output_dim": 2}
    from worker.compression.io.teachers import save_zoo_model

    save_zoo_model(zoo.build(cfg).eval(), cfg, tmp_path / "teacher")
    teacher = load_teacher(tmp_path / "teacher")
    path = tmp_path / "rows.csv"
    path.write_text("colour,size,label\n" + "".join(f"{c},{i},{i % 2}\n" for i, c in enumerate("rgbrgbrgbrgb")))
    with pytest.raises(DatasetError, match=r"'colour' hold text.*categorical_columns"):
        load_for_teacher(path, None, DataSpec(label_column="label"), teacher, "classification")
    train, _, _ = load_for_teacher(path, None, DataSpec(label_column="label", categorical_columns=["colour"]), teacher,
                                   "classification")
    assert train.inputs["x"].shape[1] == 2
