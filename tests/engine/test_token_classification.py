"""Hugging Face token classification (NER) teachers: loading, word → subword tag alignment, refused tags,
and a whole job whose derived student is judged by entity F1 (a tiny BERT trained offline on generated
sentences, `bench.field_ner`)."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import onnxruntime as ort
import pytest
import torch

from bench.field_ner import TAGS, ner_problem, sentences, tokenizer, write_jsonl
from worker.compression.compress import compress
from worker.compression.errors import DatasetError, SpecError
from worker.compression.io.data_tokens import align_tags, tokenize_words
from worker.compression.io.datasets import load_dataset, load_for_teacher
from worker.compression.io.teachers import load_teacher
from worker.compression.measure.entities import IGNORE, entity_metrics
from worker.compression.measure.teacher_check import (
    TeacherDisagreesError,
    check_teacher,
)
from worker.compression.spec import CompressSpec, DataSpec

JOB = {"student": {"kind": "derived", "num_layers": 2},
       "distillation": {"epochs": 4, "batch_size": 32, "lr": 2e-3},
       "quantization": {"method": "dynamic_int8"},
       "evaluation": {"latency_batch_sizes": [1, 16], "warmup": 1, "repeats": 3}}


@pytest.fixture(scope="module")
def problem(tmp_path_factory):
    """A 4-layer BERT token classifier (hidden 64, 64 positions) trained for 150 steps on 400 generated sentences
    (names from the word lists only, some of them ambiguous); the job's 300 sentences are others."""
    torch.set_num_threads(1)
    return ner_problem(tmp_path_factory.mktemp("ner"), sentences_n=300, steps=150, novel=0.0,
                       max_position_embeddings=64)


def test_tags_go_on_the_first_subword_of_each_word():
    assert align_tags([None, 0, 1, 1, 2, None, None], [3, 5, 0]) == [IGNORE, 3, 5, IGNORE, 0, IGNORE, IGNORE]
    tok = tokenizer()
    words = ["marisol", "visited", "oslo", "."]  # marisol and visited are two WordPieces each: mar ##isol
    inputs, y, lost = tokenize_words(tok, [words, ["lima"]], [[1, 0, 5, 0], [5]], max_length=16)
    ids = inputs["input_ids"][0].tolist()
    assert tok.convert_ids_to_tokens(ids[:7]) == ["[CLS]", "mar", "##isol", "vis", "##ited", "oslo", "."]
    assert y[0].tolist()[:8] == [IGNORE, 1, IGNORE, 0, IGNORE, 5, 0, IGNORE]
    assert y[1].tolist() == [IGNORE, 5, IGNORE] + [IGNORE] * (y.shape[1] - 3)  # padding is ignored too
    assert lost == 0
    _, y_cut, lost = tokenize_words(tok, [words], [[1, 0, 5, 0]], max_length=5)  # [CLS] mar ##isol vis [SEP]
    assert lost == 2 and (y_cut != IGNORE).sum() == 2


def test_a_token_classification_folder_loads_and_its_data_aligns(problem, tmp_path):
    teacher = load_teacher(problem["teacher"])
    assert (teacher.kind, teacher.task, teacher.input_kind) == ("hf", "token_classification", "tokens")
    assert teacher.classes == list(TAGS) and teacher.output_dim == len(TAGS)
    train, evald, order = load_for_teacher(problem["data"], None, DataSpec(), teacher, teacher.task)
    assert order == {"source": "teacher", "classes": list(TAGS)}
    assert train.y.shape == train.inputs["input_ids"].shape and len(evald) == 60
    out = teacher.predict(evald.inputs)
    assert out.shape == (*evald.inputs["input_ids"].shape, len(TAGS))
    scores = entity_metrics(out, evald.y, evald.classes, out)
    assert scores["entity_f1"] > 0.8 and scores["teacher_agreement"] == 1.0

    # ner_tags (Hugging Face datasets' name) with integer tags read the same
    rows = [{"tokens": r["tokens"], "ner_tags": [TAGS.index(t) for t in r["tags"]]} for r in sentences(20, seed=3, novel=0.5)]
    again = load_dataset(write_jsonl(tmp_path / "ints.jsonl", rows), DataSpec(classes=list(TAGS)),
                         tokenizer=teacher.tokenizer, input_kind="tokens", task="token_classification")
    named = load_dataset(write_jsonl(tmp_path / "names.jsonl", sentences(20, seed=3, novel=0.5)), DataSpec(classes=list(TAGS)),
                         tokenizer=teacher.tokenizer, input_kind="tokens", task="token_classification")
    assert torch.equal(again.y, named.y) and torch.equal(again.inputs["input_ids"], named.inputs["input_ids"])

    # upload validation (no tokenizer yet): word-level tags, the tag names, a summary saying per_word
    summary = load_dataset(problem["data"], structure_only=True).summary()
    assert summary["labels"] == "per_word" and summary["labelled"] and set(summary["classes"]) == set(TAGS)


def test_a_tag_the_teacher_does_not_know_is_refused_by_name(problem, tmp_path):
    teacher = load_teacher(problem["teacher"])
    rows = sentences(5)
    rows[3] = {"tokens": ["ada", "met", "zeus"], "tags": ["B-PER", "O", "B-MISC"]}
    path = write_jsonl(tmp_path / "misc.jsonl", rows)
    with pytest.raises(DatasetError, match=r"unknown tag 'B-MISC'.*B-PER") as err:
        load_for_teacher(path, None, DataSpec(), teacher, teacher.task)
    assert err.value.row == 4
    rows[3] = {"tokens": ["ada", "met"], "tags": ["B-PER"]}
    with pytest.raises(DatasetError, match="2 words but 1 tags"):
        load_for_teacher(write_jsonl(tmp_path / "short.jsonl", rows), None, DataSpec(), teacher, teacher.task)


def test_a_derived_student_is_distilled_per_token_and_judged_by_entity_f1(problem, tmp_path):
    spec = CompressSpec.model_validate(JOB)
    result = compress(spec, teacher_path=problem["teacher"], dataset_path=problem["data"], output_dir=tmp_path)
    report = result.metrics
    assert report["task"] == "token_classification" and report["primary_metric"] == "entity_f1"
    models = {m["name"]: m for m in report["models"]}
    teacher_f1, student_f1 = models["teacher"]["metric"]["entity_f1"], models["student"]["metric"]["entity_f1"]
    assert teacher_f1 > 0.8 and student_f1 >= teacher_f1 - 0.1, (teacher_f1, student_f1)
    for key in ("entity_precision", "entity_recall", "token_accuracy", "teacher_agreement"):
        assert 0.0 <= models["int8"]["metric"][key] <= 1.0
    assert report["student"]["config"]["num_hidden_layers"] == 2
    summary = report["summary"]
    assert summary["metric"] == "entity_f1" and "entity_f1" in summary["headline"]
    assert summary["verdict"] in ("ship", "ship_with_caution")
    assert report["quantization"]["method"] == "dynamic_int8"

    # the delivered graph tags tokens of any sentence length: (N, T, tags)
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    tok = tokenizer()
    for text in (["ada", "works"], ["the", "acme", "office", "in", "new", "delhi", "hired", "marisol", "."]):
        enc = tok(text, is_split_into_words=True, return_tensors="np")
        feeds = {i.name: enc[i.name].astype(np.int64) for i in session.get_inputs()}
        assert session.run(None, feeds)[0].shape == (1, enc["input_ids"].shape[1], len(TAGS))
    with zipfile.ZipFile(tmp_path / "bundle.zip") as zf:
        pre = json.loads(zf.read("preprocessing.json"))
    assert pre["task"] == "token_classification" and pre["classes"] == list(TAGS)
    assert pre["text"]["max_length"] == 64  # the teacher's position limit, not the spec's default 128


def test_a_search_over_ner_students_is_refused_by_name(problem, tmp_path):
    spec = CompressSpec.model_validate({"student": {"kind": "search"}, "targets": {"metric": "entity_f1",
                                                                                 "max_drop": 0.02}})
    with pytest.raises(SpecError, match="search over token classification"):
        compress(spec, teacher_path=problem["teacher"], dataset_path=problem["data"], output_dir=tmp_path)


def test_texts_with_sentence_labels_are_no_data_for_a_token_classifier(problem, tmp_path):
    teacher = load_teacher(problem["teacher"])
    path = write_jsonl(tmp_path / "texts.jsonl", [{"text": "ada works", "label": "x"}] * 4)
    with pytest.raises(DatasetError, match="tagged words"):
        load_for_teacher(path, None, DataSpec(), teacher, teacher.task)


def test_hidden_state_and_attention_kd_run_per_token(problem, tmp_path):
    """The teacher runs on every (trimmed) batch for its hidden states: its per-token logits and the tags
    still line up with the student's."""
    spec = CompressSpec.model_validate({
        **JOB, "student": {"kind": "derived", "num_layers": 2, "width_ratio": 0.5},
        "distillation": {"epochs": 2, "batch_size": 32, "lr": 2e-3, "feature_loss": "mse", "attention_weight": 1.0,
                         "baseline": False, "target": {"metric": "entity_f1", "min": 0.999}},
        "quantization": {"method": "none"}})
    report = compress(spec, teacher_path=problem["teacher"], dataset_path=problem["data"],
                      output_dir=tmp_path).metrics
    assert report["distillation"]["teacher_cache"]["used"] is False
    student = next(m for m in report["models"] if m["name"] == "student")
    assert 0.0 <= student["metric"]["entity_f1"] <= 1.0


def test_a_separate_eval_file_of_longer_sentences_is_padded_with_ignored_tags(problem, tmp_path):
    teacher = load_teacher(problem["teacher"])
    longer = [{"tokens": r["tokens"] * 3, "tags": r["tags"] * 3} for r in sentences(10, seed=7)]
    train, evald, _ = load_for_teacher(problem["data"], write_jsonl(tmp_path / "eval.jsonl", longer), DataSpec(),
                                       teacher, teacher.task)
    assert train.inputs["input_ids"].shape[1] == evald.inputs["input_ids"].shape[1] == train.y.shape[1]
    padding = train.inputs["attention_mask"] == 0
    assert padding.any() and (train.y[padding] == IGNORE).all()
    lost = evald.meta["truncated_words"]  # 64 positions: the longest sentences lose their last words
    assert lost > 0 and (evald.y != IGNORE).sum() + lost == sum(len(r["tokens"]) for r in longer)


def test_a_teacher_that_does_not_predict_the_tags_is_stopped_before_training(problem):
    teacher = load_teacher(problem["teacher"])
    train, evald, _ = load_for_teacher(problem["data"], None, DataSpec(), teacher, teacher.task)
    check, _, _ = check_teacher(teacher, train, evald, teacher.task)
    assert check.metric == "token_accuracy" and check.passed and check.value > check.chance > 0.5  # mostly O
    wrong = DataSpec(classes=list(reversed(TAGS)))  # the tags numbered in another order than id2label's
    train, evald, _ = load_for_teacher(problem["data"], None, wrong, teacher, teacher.task)
    with pytest.raises(TeacherDisagreesError, match="token accuracy .* tagged evaluation words.* commonest tag"):
        check_teacher(teacher, train, evald, teacher.task)


def test_quantization_aware_training_runs_per_token(problem, tmp_path):
    spec = CompressSpec.model_validate({
        **JOB, "distillation": {"epochs": 2, "batch_size": 32, "lr": 2e-3, "baseline": False},
        "quantization": {"method": "qat", "qat_epochs": 1}})
    report = compress(spec, teacher_path=problem["teacher"], dataset_path=problem["data"],
                      output_dir=tmp_path).metrics
    assert report["quantization"]["method"] == "qat"
    int8 = next(m for m in report["models"] if m["name"] == "int8")
    assert int8["metric"]["entity_f1"] > 0.5
