"""The training loop: schedule, repeatability, resume, cancel, early stops, budget, progress."""

import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from worker.compression.distill.trainer import _clip_grad_norm_, steps_per_epoch, train, warmup_cosine
from worker.compression.errors import Cancelled, SpecError
from worker.compression.spec import DistillSpec, TargetSpec
from worker.compression.students import zoo
from worker.compression.types import Progress, TensorData

CFG = {"architecture": "mlp", "input_dim": 6, "hidden": [16], "dropout": 0.2, "output_dim": 3}


def _data(n: int = 40) -> TensorData:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 6, generator=g)
    return TensorData({"x": x}, x[:, :3].argmax(1))


def _model() -> torch.nn.Module:
    torch.manual_seed(123)
    return zoo.build(CFG)


def _ce(model: torch.nn.Module):
    return lambda inputs, y, idx: F.cross_entropy(model(**inputs), y)


def _spec(**kw) -> DistillSpec:
    return DistillSpec(**{"epochs": 3, "batch_size": 8, "lr": 1e-2, "device": "cpu", **kw})


def _accuracy_eval(model: torch.nn.Module, data: TensorData):
    return lambda: {"accuracy": (model(**data.inputs).argmax(1) == data.y).float().mean().item()}


def test_warmup_then_cosine_values() -> None:
    assert [warmup_cosine(s, 10, 2) for s in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert warmup_cosine(6, 10, 2) == pytest.approx(0.5)
    assert warmup_cosine(10, 10, 2) == pytest.approx(0.0)
    assert warmup_cosine(0, 4, 0) == 1.0


def test_schedule_drives_the_optimizer_lr() -> None:
    model, data = _model(), _data()
    spec = _spec(warmup_ratio=0.2, lr=0.1)
    result = train(model, None, data, _ce(model), spec, stage="t")
    total = steps_per_epoch(40, 8) * 3
    lrs = [h["lr"] for h in result.history]
    assert len(lrs) == total
    # each point logs the LR of the next step
    assert lrs == pytest.approx([0.1 * warmup_cosine(s, total, 3) for s in range(1, total + 1)])


def test_steps_per_epoch_drops_a_lone_last_sample() -> None:
    assert steps_per_epoch(40, 8) == 5
    assert steps_per_epoch(41, 8) == 5
    assert steps_per_epoch(42, 8) == 6
    assert steps_per_epoch(1, 8) == 1


def test_seeded_runs_repeat_exactly() -> None:
    weights = []
    for _ in range(2):
        model = _model()
        train(model, None, _data(), _ce(model), _spec(), stage="t")
        weights.append(model.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_resume_from_checkpoint_equals_uninterrupted_run(tmp_path: Path) -> None:
    data, held_out = _data(), _data(20)
    spec = _spec(checkpoint_every=4, patience=50)

    def run(model, extra, **kw):
        return train(
            model, extra, data, _ce(model), spec, stage="t", evaluate_fn=_accuracy_eval(model, held_out),
            metric="accuracy", **kw,
        )  # fmt: skip

    full_model, full_extra = _model(), torch.nn.Linear(3, 3)  # extra: like the feature projections
    full = run(full_model, full_extra)

    flag = {"cancel": False}
    seen: list[int] = []

    def progress(p: Progress) -> None:
        seen.append(p.step)
        flag["cancel"] = p.step == 6

    with pytest.raises(Cancelled):
        run(
            _model(),
            torch.nn.Linear(3, 3),
            progress=progress,
            cancel=lambda: flag["cancel"],
            checkpoint_dir=tmp_path,
        )
    assert seen[-1] == 6

    model, extra = zoo.build(CFG), torch.nn.Linear(3, 3)  # as in a new process: other initial weights
    resumed = run(model, extra, checkpoint_dir=tmp_path)
    assert resumed.resumed_from_step == 4
    assert len(list(tmp_path.glob("step-*"))) == 1 and not list(tmp_path.glob(".tmp-*"))
    assert resumed.steps == full.steps == 15
    for got, want in ((model, full_model), (extra, full_extra)):
        a, b = got.state_dict(), want.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.best_metric == full.best_metric and resumed.best_step == full.best_step
    assert [h.get("metric") for h in resumed.history] == [h.get("metric") for h in full.history]

    # the finished run left a final checkpoint: a rerun returns at once with the same weights
    again = zoo.build(CFG)
    rerun = run(again, torch.nn.Linear(3, 3), checkpoint_dir=tmp_path)
    assert rerun.resumed_from_step == 15 and rerun.stopped_reason == "completed"
    assert all(torch.equal(again.state_dict()[k], v) for k, v in model.state_dict().items())


def test_checkpoint_of_another_configuration_is_ignored(tmp_path: Path) -> None:
    model = _model()
    train(model, None, _data(), _ce(model), _spec(epochs=1), stage="t", checkpoint_dir=tmp_path)
    model = _model()
    result = train(model, None, _data(), _ce(model), _spec(epochs=2), stage="t", checkpoint_dir=tmp_path)
    assert result.resumed_from_step is None and result.steps == 10


def test_cancel_stops_within_one_step() -> None:
    model = _model()
    flag = {"cancel": False}
    after_cancel: list[int] = []

    def loss_fn(inputs, y, idx):
        return F.cross_entropy(model(**inputs), y)

    def progress(p: Progress) -> None:
        if flag["cancel"]:
            after_cancel.append(p.step)
        if p.step == 3:
            flag["cancel"] = True

    with pytest.raises(Cancelled, match="step 3"):
        train(
            model,
            None,
            _data(),
            loss_fn,
            _spec(),
            stage="t",
            progress=progress,
            cancel=lambda: flag["cancel"],
        )
    assert after_cancel == []


def test_target_reached_stops_early() -> None:
    model, data = _model(), _data(200)
    spec = _spec(epochs=30, eval_every=2, target=TargetSpec(metric="accuracy", min=0.8))
    result = train(
        model,
        None,
        data,
        _ce(model),
        spec,
        stage="t",
        evaluate_fn=_accuracy_eval(model, data),
        metric="accuracy",
    )
    assert result.stopped_reason == "target_reached"
    assert result.steps < steps_per_epoch(200, 8) * 30
    assert result.best_metric is not None and result.best_metric >= 0.8
    assert result.history[-1]["metric"] >= 0.8


def test_target_for_lower_is_better_metric_needs_max() -> None:
    model = _model()
    spec = _spec(target=TargetSpec(metric="mse", min=0.1))
    with pytest.raises(SpecError, match="give 'max'"):
        train(model, None, _data(), _ce(model), spec, stage="t", evaluate_fn=lambda: {"mse": 1.0})


def test_no_improvement_stops_and_restores_best_weights() -> None:
    model, data = _model(), _data()
    scores = iter([0.5, 0.9, 0.4, 0.3, 0.2, 0.1])
    snapshots: list[dict[str, torch.Tensor]] = []

    def evaluate():
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        return {"accuracy": next(scores)}

    spec = _spec(epochs=10, patience=3, eval_every=2)
    result = train(model, None, data, _ce(model), spec, stage="t", evaluate_fn=evaluate, metric="accuracy")
    assert result.stopped_reason == "no_improvement"
    assert result.steps == 10 and result.best_step == 4 and result.best_metric == 0.9
    assert all(torch.equal(model.state_dict()[k], v) for k, v in snapshots[1].items())


def test_time_budget_stops_cleanly() -> None:
    model = _model()

    def slow_loss(inputs, y, idx):
        time.sleep(0.02)
        return F.cross_entropy(model(**inputs), y)

    spec = _spec(epochs=20, time_budget_s=0.15)
    result = train(
        model, None, _data(), slow_loss, spec, stage="t", evaluate_fn=_accuracy_eval(model, _data()),
        metric="accuracy",
    )  # fmt: skip
    assert result.stopped_reason == "time_budget"
    assert 1 <= result.steps < 100
    assert "eval" in result.history[-1] and result.history[-1]["step"] == result.steps


def test_progress_reports_every_step_with_eta_and_loss() -> None:
    model = _model()
    reports: list[Progress] = []
    result = train(model, None, _data(), _ce(model), _spec(), stage="distill", progress=reports.append)
    assert [p.step for p in reports] == list(range(1, 16))
    assert all(p.stage == "distill" and p.total == 15 for p in reports)
    assert all(p.eta_s is not None and p.eta_s >= 0 for p in reports) and reports[-1].eta_s == 0
    assert all(p.loss is not None and p.loss > 0 for p in reports)
    assert result.samples_per_s > 0 and result.stopped_reason == "completed"


def test_gradient_clipping_matches_torch() -> None:
    grads = [torch.randn(5, 3) * 4, torch.randn(7)]
    expected = [g.clone() for g in grads]
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in expected]
    for p, g in zip(params, expected, strict=True):
        p.grad = g
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    _clip_grad_norm_(grads, 1.0)
    assert all(torch.allclose(a, b, rtol=1e-6) for a, b in zip(grads, expected, strict=True))
    assert torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])).item() == pytest.approx(
        1.0, rel=1e-5
    )
    small = [torch.full((3,), 0.1)]
    _clip_grad_norm_(small, 1.0)
    assert torch.equal(small[0], torch.full((3,), 0.1))  # under the limit: untouched
