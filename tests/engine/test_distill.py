"""End-to-end distillation on tiny synthetic problems."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from worker.compression.distill.distill import distill
from worker.compression.distill.teacher_cache import TeacherCache
from worker.compression.errors import Cancelled, DatasetError, SpecError
from worker.compression.spec import DistillSpec, TargetSpec
from worker.compression.students import zoo
from worker.compression.types import Progress, Teacher, TensorData, trim_padding

STUDENT = {"architecture": "mlp", "input_dim": 12, "hidden": [24], "output_dim": 4}


def _teacher(
    task: str = "classification", output_dim: int = 4, steps: int = 150
) -> tuple[Teacher, TensorData]:
    """An MLP teacher fitted to a synthetic problem, and the data it was fitted on."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(480, 12, generator=g)
    w = torch.randn(12, output_dim, generator=g)
    target = x @ w
    y = target.argmax(1) if task == "classification" else target
    cfg = {"architecture": "mlp", "task": task, "input_dim": 12, "hidden": [48, 48], "output_dim": output_dim}
    torch.manual_seed(0)
    module = zoo.build(cfg)
    opt = torch.optim.Adam(module.parameters(), lr=1e-2)
    for _ in range(steps):
        out = module(x)
        loss = F.cross_entropy(out, y) if task == "classification" else F.mse_loss(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    teacher = Teacher(
        kind="zoo", task=task, input_kind="vector", input_shape=(12,), output_dim=output_dim, config=cfg,
        module=module.eval(), num_parameters=zoo.count_parameters(module),
    )  # fmt: skip
    return teacher, TensorData({"x": x}, y if task != "embedding" else None)


@pytest.fixture(scope="module")
def classifier() -> tuple[Teacher, TensorData]:
    return _teacher()


def _spec(**kw) -> DistillSpec:
    return DistillSpec(**{"epochs": 8, "batch_size": 32, "lr": 3e-2, "device": "cpu", **kw})


def _student(cfg: dict = STUDENT) -> torch.nn.Module:
    torch.manual_seed(7)
    return zoo.build(cfg)


def test_kd_student_with_labels_matches_teacher_and_reports_everything(classifier, tmp_path: Path) -> None:
    teacher, data = classifier
    train, held_out = data.split(0.25)
    reports: list[Progress] = []
    result = distill(
        teacher, _student(), train, held_out, _spec(), workdir=tmp_path, progress=reports.append,
        make_baseline=_student,
    )  # fmt: skip
    m = result.metrics
    assert m["teacher"]["reference"] == "labels" and m["student"]["reference"] == "labels"
    assert m["student"]["accuracy"] >= m["teacher"]["accuracy"] - 0.1
    assert 0 < m["student"]["macro_f1"] <= 1 and m["baseline"] is not None
    assert {"accuracy", "macro_f1"} <= m["baseline"].keys()
    assert result.parameters["student"] < result.parameters["teacher"] and 0 < result.parameters["ratio"] < 1
    cache = result.teacher_cache
    assert cache["used"] and cache["bytes"] > 0 and cache["build_s"] > 0 and cache["top_k"] is None
    assert cache["saved_s_estimate"] == pytest.approx(7 * cache["build_s"])
    assert {p.stage for p in reports} == {"distill", "baseline"}
    assert result.train["student"]["stopped_reason"] == "completed" and result.train["student"]["steps"] == 96
    assert result.history["student"][-1]["eval"]["accuracy"] == pytest.approx(m["student"]["accuracy"])
    assert len(result.history["baseline"]) > 0
    assert not result.student.training and next(result.student.parameters()).device.type == "cpu"
    json.dumps(result.to_dict())  # the report is JSON as is


def test_unlabelled_data_uses_the_teacher_as_reference(classifier, tmp_path: Path) -> None:
    teacher, data = classifier
    unlabelled = TensorData({"x": data.inputs["x"]})
    train, held_out = unlabelled.split(0.25)
    result = distill(teacher, _student(), train, held_out, _spec(), workdir=tmp_path, make_baseline=_student)
    assert result.metrics["student"]["reference"] == "teacher"
    assert result.metrics["teacher"]["accuracy"] == 1.0
    assert result.metrics["student"]["accuracy"] >= 0.85
    assert result.baseline is None and result.metrics["baseline"] is None
    assert any("no labels" in n for n in result.notes)
    assert result.teacher_cache["used"]


def test_rerun_in_the_same_workdir_reuses_cache_and_checkpoint(classifier, tmp_path: Path) -> None:
    teacher, data = classifier
    train, held_out = data.split(0.25)
    spec = _spec(epochs=2, baseline=False)
    first = distill(teacher, _student(), train, held_out, spec, workdir=tmp_path)
    second = distill(teacher, _student(), train, held_out, spec, workdir=tmp_path)
    assert not first.teacher_cache["reused"] and second.teacher_cache["reused"]
    assert second.train["student"]["resumed_from_step"] == first.train["student"]["steps"]
    a, b = first.student.state_dict(), second.student.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert second.metrics["student"] == first.metrics["student"]


def test_top_k_cache(classifier, tmp_path: Path) -> None:
    teacher, data = classifier
    train, held_out = data.split(0.25)
    result = distill(teacher, _student(), train, held_out, _spec(top_k=2, baseline=False), workdir=tmp_path)
    assert result.teacher_cache["top_k"] == 2
    assert result.metrics["student"]["accuracy"] >= result.metrics["teacher"]["accuracy"] - 0.15


def test_target_stops_distillation_early(classifier, tmp_path: Path) -> None:
    teacher, data = classifier
    train, held_out = data.split(0.25)
    spec = _spec(epochs=50, baseline=False, target=TargetSpec(metric="accuracy", min=0.7))
    result = distill(teacher, _student(), train, held_out, spec, workdir=tmp_path)
    assert result.train["student"]["stopped_reason"] == "target_reached"
    assert result.train["student"]["steps"] < 50 * 12
    assert result.metrics["student"]["accuracy"] >= 0.7


def test_embedding_teacher_cosine_metric(tmp_path: Path) -> None:
    teacher, data = _teacher("embedding", output_dim=8, steps=0)
    train, held_out = data.split(0.25)
    cfg = {**STUDENT, "task": "embedding", "output_dim": 8}
    result = distill(teacher, _student(cfg), train, held_out, _spec(epochs=15), workdir=tmp_path)
    m = result.metrics
    assert m["teacher"]["cosine"] == pytest.approx(1.0) and set(m["student"]) == {
        "reference",
        "cosine",
        "mse",
    }
    untrained = F.cosine_similarity(
        _student(cfg)(held_out.inputs["x"]), teacher.predict(held_out.inputs)
    ).mean()
    assert m["student"]["cosine"] > max(0.8, untrained.item() + 0.3)


def test_regression_mse_metric(tmp_path: Path) -> None:
    teacher, data = _teacher("regression", output_dim=1)
    train, held_out = data.split(0.25)
    cfg = {**STUDENT, "task": "regression", "output_dim": 1}
    result = distill(
        teacher,
        _student(cfg),
        train,
        held_out,
        _spec(),
        workdir=tmp_path,
        make_baseline=lambda: _student(cfg),
    )
    m = result.metrics
    assert m["student"]["reference"] == "labels"
    untrained = F.mse_loss(_student(cfg)(held_out.inputs["x"]), held_out.y).item()
    assert m["student"]["mse"] < untrained / 2 and m["baseline"]["mse"] < untrained / 2


def test_feature_matching_between_widths_lowers_the_loss(classifier, tmp_path: Path) -> None:
    teacher, data = classifier
    train, held_out = data.split(0.25)
    spec = _spec(feature_loss="mse", feature_weight=1.0, baseline=False)
    cfg = {**STUDENT, "hidden": [16, 8]}
    result = distill(teacher, _student(cfg), train, held_out, spec, workdir=tmp_path)
    losses = [h["loss"] for h in result.history["student"]]
    assert losses[-1] < 0.5 * losses[0]
    assert not result.teacher_cache["used"] and "hidden states" in result.teacher_cache["reason"]
    assert result.metrics["student"]["accuracy"] >= result.metrics["teacher"]["accuracy"] - 0.15
    assert not any("projections" in k for k in result.student.state_dict())  # projector dropped


def test_augmentation_runs_the_teacher_per_batch(classifier, tmp_path: Path) -> None:
    teacher, data = classifier
    train, held_out = data.split(0.25)
    spec = _spec(augment_noise=0.1, epochs=3, baseline=False)
    result = distill(teacher, _student(), train, held_out, spec, workdir=tmp_path)
    assert not result.teacher_cache["used"] and "augmentation" in result.teacher_cache["reason"]
    assert result.metrics["student"]["accuracy"] > 0.5


def test_mixup_has_the_teacher_label_mixed_inputs(classifier, tmp_path: Path) -> None:
    torch_teacher, data = classifier
    module = torch_teacher.module
    seen: list[torch.Tensor] = []

    def run_onnx(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        seen.append(inputs["x"])
        with torch.no_grad():
            return module(**inputs)

    teacher = Teacher(kind="onnx", task="classification", input_kind="vector", input_shape=(12,), output_dim=4,
                      config={}, run_onnx=run_onnx, num_parameters=torch_teacher.num_parameters)
    train, held_out = data.split(0.25)
    result = distill(teacher, _student(), train, held_out, _spec(augment_mixup=1.0, epochs=3, baseline=False),
                     workdir=tmp_path)
    assert not result.teacher_cache["used"] and "augmentation" in result.teacher_cache["reason"]
    # the teacher saw inputs that are not rows of the training set: convex mixes of two of them
    rows = train.inputs["x"]
    batch = seen[len(seen) // 2]
    nearest = torch.cdist(batch, rows).min(dim=1).values
    assert (nearest > 1e-3).float().mean() > 0.5
    assert result.metrics["student"]["accuracy"] > 0.5


def test_black_box_teacher_uses_the_cache_and_rejects_feature_matching(classifier, tmp_path: Path) -> None:
    torch_teacher, data = classifier
    module = torch_teacher.module
    assert module is not None
    calls = {"n": 0}

    def run_onnx(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        calls["n"] += 1
        assert all(v.device.type == "cpu" for v in inputs.values())
        with torch.no_grad():
            return module(**inputs)

    teacher = Teacher(
        kind="onnx", task="classification", input_kind="vector", input_shape=(12,), output_dim=4,
        config={}, run_onnx=run_onnx, num_parameters=torch_teacher.num_parameters,
    )  # fmt: skip
    train, held_out = data.split(0.25)
    result = distill(teacher, _student(), train, held_out, _spec(baseline=False), workdir=tmp_path)
    assert result.teacher_cache["used"]
    # two probes, the cache (2 batches) and the eval set (1 batch): never once per training step
    assert calls["n"] <= 5 and result.train["student"]["steps"] == 96
    assert result.metrics["student"]["accuracy"] >= result.metrics["teacher"]["accuracy"] - 0.1
    with pytest.raises(SpecError, match="PyTorch teacher"):
        distill(teacher, _student(), train, held_out, _spec(feature_loss="mse"), workdir=tmp_path / "f")


def test_transformer_attention_and_hidden_matching(tmp_path: Path) -> None:
    base = {"architecture": "transformer", "vocab_size": 30, "max_len": 8, "num_heads": 2, "output_dim": 3}
    torch.manual_seed(0)
    t_module = zoo.build({**base, "dim": 16, "num_layers": 2}).eval()
    teacher = Teacher(
        kind="zoo", task="classification", input_kind="tokens", input_shape=(8,), output_dim=3, config=base,
        module=t_module,
    )  # fmt: skip
    ids = torch.randint(0, 30, (64, 8), generator=torch.Generator().manual_seed(0))
    data = TensorData({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, input_kind="tokens")
    train, held_out = data.split(0.25)
    student = _student({**base, "dim": 8, "num_layers": 1, "num_heads": 1})
    spec = _spec(epochs=3, feature_loss="cosine", attention_weight=1.0, baseline=False)
    result = distill(teacher, student, train, held_out, spec, workdir=tmp_path)
    losses = [h["loss"] for h in result.history["student"]]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert result.metrics["student"]["reference"] == "teacher"


def test_bad_inputs_raise_typed_errors(classifier, tmp_path: Path) -> None:
    teacher, data = classifier
    train, held_out = data.split(0.25)
    bad = TensorData({"x": train.inputs["x"]}, train.y.clone())
    bad.y[5] = 9
    with pytest.raises(DatasetError, match="row 5: train label 9"):
        distill(teacher, _student(), bad, held_out, _spec(), workdir=tmp_path)
    with pytest.raises(SpecError, match="'cosine' is not measured for classification"):
        distill(
            teacher,
            _student(),
            train,
            held_out,
            _spec(target=TargetSpec(metric="cosine", min=0.9)),
            workdir=tmp_path,
        )
    wrong = {**STUDENT, "output_dim": 5}
    with pytest.raises(SpecError, match="student outputs 5"):
        distill(teacher, _student(wrong), train, held_out, _spec(), workdir=tmp_path)


def test_teacher_cache_keeps_top_k_for_wide_outputs_and_rebuilds_for_another_teacher(tmp_path: Path) -> None:
    cfg = {"architecture": "mlp", "input_dim": 12, "hidden": [], "output_dim": 1100}
    data = TensorData({"x": torch.randn(10, 12)})

    def make_teacher(seed: int) -> Teacher:
        torch.manual_seed(seed)
        module = zoo.build(cfg).eval()
        return Teacher(kind="zoo", task="classification", input_kind="vector", input_shape=(12,),
                       output_dim=1100, config=cfg, module=module)  # fmt: skip

    teacher = make_teacher(0)
    path = tmp_path / "cache.safetensors"
    cache = TeacherCache.build(teacher, data, batch_size=4, top_k=None, path=path)
    assert cache.top_k == 64 and cache.bytes == path.stat().st_size and not cache.reused
    values, indices = cache.targets(torch.tensor([1, 7]))
    expected = teacher.predict({"x": data.inputs["x"][[1, 7]]}).topk(64, dim=-1)
    assert torch.allclose(values, expected.values) and torch.equal(indices, expected.indices)
    assert TeacherCache.build(teacher, data, batch_size=4, top_k=None, path=path).reused
    other = TeacherCache.build(make_teacher(1), data, batch_size=4, top_k=None, path=path)
    assert not other.reused and not torch.equal(other.topk_values, cache.topk_values)
    with pytest.raises(Cancelled):
        TeacherCache.build(teacher, data, batch_size=4, top_k=8, path=path, cancel=lambda: True)


def test_token_batches_are_cut_after_their_last_real_token(tmp_path: Path) -> None:
    ids = torch.randint(1, 30, (48, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros_like(ids)
    for i in range(len(ids)):
        mask[i, : 2 + i % 4] = 1  # 2..5 real tokens, right-padded to 8
    trimmed = trim_padding({"input_ids": ids[:4], "attention_mask": mask[:4]})
    assert torch.equal(trimmed["input_ids"], ids[:4, :5])
    assert torch.equal(trimmed["attention_mask"], mask[:4, :5])
    left = mask[:4].flip(1)  # left padding: nothing to cut
    assert trim_padding({"input_ids": ids[:4], "attention_mask": left})["input_ids"].shape == (4, 8)

    base = {"architecture": "transformer", "vocab_size": 30, "max_len": 8, "num_heads": 2, "output_dim": 3}
    torch.manual_seed(0)
    t_module = zoo.build({**base, "dim": 16, "num_layers": 2}).eval()
    torch.testing.assert_close(t_module(**trimmed), t_module(input_ids=ids[:4], attention_mask=mask[:4]))
    teacher = Teacher(
        kind="zoo", task="classification", input_kind="tokens", input_shape=(8,), output_dim=3, config=base,
        module=t_module,
    )  # fmt: skip
    train, held_out = TensorData({"input_ids": ids, "attention_mask": mask}, input_kind="tokens").split(0.25)
    student = _student({**base, "dim": 8, "num_layers": 1, "num_heads": 1})
    lengths: list[int] = []
    student.register_forward_pre_hook(
        lambda _m, _a, kw: lengths.append(kw["input_ids"].shape[1]), with_kwargs=True
    )
    distill(teacher, student, train, held_out, _spec(epochs=1, baseline=False), workdir=tmp_path)
    assert lengths and max(lengths) == 5


def test_freeze_embeddings_keeps_the_tables_and_trains_the_rest(tmp_path: Path) -> None:
    base = {"architecture": "transformer", "vocab_size": 30, "max_len": 8, "num_heads": 2, "output_dim": 3}
    torch.manual_seed(0)
    teacher = Teacher(
        kind="zoo", task="classification", input_kind="tokens", input_shape=(8,), output_dim=3, config=base,
        module=zoo.build({**base, "dim": 16, "num_layers": 2}).eval(),
    )  # fmt: skip
    ids = torch.randint(0, 30, (48, 8), generator=torch.Generator().manual_seed(0))
    tokens = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    train, held_out = TensorData(tokens, input_kind="tokens").split(0.25)
    student = _student({**base, "dim": 8, "num_layers": 1, "num_heads": 1})
    tables = {
        n: m.weight.detach().clone() for n, m in student.named_modules() if isinstance(m, torch.nn.Embedding)
    }
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    spec = _spec(epochs=2, baseline=False, freeze_embeddings=True)
    distill(teacher, student, train, held_out, spec, workdir=tmp_path)
    modules = dict(student.named_modules())
    assert tables and all(torch.equal(modules[n].weight, w) for n, w in tables.items())
    assert all(modules[n].weight.requires_grad for n in tables)  # trainable again after the run
    changed = [n for n, p in student.named_parameters() if not torch.equal(p, before[n])]
    assert changed and not any(n.removesuffix(".weight") in tables for n in changed)
