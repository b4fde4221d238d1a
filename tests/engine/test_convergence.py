"""The search's convergence training (``search.converge``): lengths, plateaus, the cheapest-first
order and the ladder's bottom rungs (issue 18)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from worker.compression.distill.trainer import train
from worker.compression.io.teachers import load_teacher, save_zoo_model
from worker.compression.measure.export import export_onnx
from worker.compression.search import converge
from worker.compression.search.converge import (
    gallop_order,
    noise_band,
    planned_epochs,
    settled_metric,
    stalled,
    step_seconds,
    tries_left,
    with_margin,
)
from worker.compression.search.ladder import Candidate, build_ladder
from worker.compression.search.prepare import count_macs
from worker.compression.search.run import SearchOptions, search
from worker.compression.search.state import Entry
from worker.compression.spec import CompressSpec, DistillSpec, SearchStudent
from worker.compression.students import zoo
from worker.compression.types import TensorData


def test_planned_epochs_reach_the_minimum_steps_within_the_cap_and_the_time_share():
    # 10 steps an epoch: MIN_STEPS wants 300 epochs; plenty of time
    assert planned_epochs(10, 1e-4, 1e6, 20) == min(converge.MAX_EPOCHS, converge.MIN_STEPS // 10)
    # a big data set: the spec's epochs are the floor
    assert planned_epochs(10_000, 1e-6, 1e6, 20) == 20
    # a tight share: 1 s at 10 ms a step (×1.5 for evaluations), 10 steps an epoch -> 6 epochs
    assert planned_epochs(10, 0.01, 1.0, 20) == 6
    assert planned_epochs(10, 10.0, 0.1, 20) == 1


def test_early_stop_stops_on_a_plateau_of_the_eval_metric():
    """A run whose eval metric never improves after its first evaluation stops ``patience``
    evaluations later, well before its planned length, and says why."""
    x, y = torch.randn(64, 4), torch.randint(0, 2, (64,))
    model = torch.nn.Linear(4, 2)
    spec = DistillSpec(epochs=100, batch_size=16, eval_every=4, patience=3, baseline=False, device="cpu")
    result = train(model, None, TensorData({"x": x}, y),
                   lambda inputs, by, idx: torch.nn.functional.cross_entropy(model(inputs["x"]), by),
                   spec, stage="student", evaluate_fn=lambda: {"accuracy": 0.5}, metric="accuracy")
    assert result.stopped_reason == "no_improvement"
    assert result.steps == 4 * (1 + 3) < 100 * 4


def test_settled_metric_is_the_plateau_level_not_a_lucky_evaluation():
    history = [{"metric": m} for m in (0.80, 0.99, 0.90, 0.91, 0.95)]
    assert settled_metric(history, True, 0.95) == pytest.approx((0.90 + 0.91 + 0.95) / 3)  # not the 0.99
    assert settled_metric(history, True, 0.90) == 0.90  # never better than the returned weights
    assert settled_metric(history, False, 0.80) == pytest.approx((0.90 + 0.91 + 0.95) / 3)  # mse: never lower
    assert settled_metric([{"loss": 1.0}], True, 0.7) == 0.7


def test_a_run_can_keep_its_last_weights_instead_of_its_best():
    """``keep: last`` returns the weights the run ended with even when an earlier evaluation scored
    higher (the search's convergence runs); ``best`` (the default) restores that evaluation's."""
    x, y = torch.randn(64, 4), torch.randint(0, 2, (64,))
    out = {}
    for keep in ("best", "last"):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        first = {k: v.clone() for k, v in model.state_dict().items()}
        scores = iter([0.9] + [0.5] * 100)
        spec = DistillSpec(epochs=3, batch_size=16, eval_every=1, keep=keep, baseline=False, device="cpu", lr=0.1)
        train(model, None, TensorData({"x": x}, y),
              lambda inputs, by, idx, m=model: torch.nn.functional.cross_entropy(m(inputs["x"]), by),
              spec, stage="student", evaluate_fn=lambda s=scores: {"accuracy": next(s)}, metric="accuracy")
        out[keep] = {k: v.clone() for k, v in model.state_dict().items()}
    assert not torch.equal(out["best"]["weight"], out["last"]["weight"])
    assert not torch.equal(out["last"]["weight"], first["weight"])


def _gallop(n: int, meets_from: int) -> tuple[list[int], list[bool | None]]:
    costs = [float(i + 1) for i in range(n)]
    met: list[bool | None] = [None] * n
    order = []
    while (i := gallop_order(costs, met)) is not None:
        order.append(i)
        met[i] = i >= meets_from
    return order, met


def test_gallop_goes_up_the_ladder_then_back_to_the_cheapest_that_meets():
    order, met = _gallop(7, 3)
    assert order == [0, 1, 3, 2]  # offsets 1, 2: 0 and 1 miss, 3 meets; back: 2 meets
    assert min(i for i, m in enumerate(met) if m) == 3
    assert met[4:] == [None, None, None]  # costlier than one that meets: never trained
    order, met = _gallop(7, 5)
    assert order == [0, 1, 3, 6, 4, 5]  # 0, 1, 3 miss, capped at the last (6); back: 4 misses, 5 meets
    assert _gallop(40, 0)[0] == [0]


def test_gallop_stops_at_the_top_when_nothing_meets():
    order, met = _gallop(9, 99)
    assert order == [0, 1, 3, 7, 8]
    assert all(m is not True for m in met)


def test_step_seconds_leaves_the_weights_alone():
    model = torch.nn.Linear(8, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert step_seconds(model, {"input": torch.randn(16, 8)}) > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_ladder_of_a_large_mlp_teacher_reaches_narrow_shallow_students(tmp_path):
    cfg = {"architecture": "mlp", "task": "classification", "input_dim": 64, "hidden": [700, 700, 300],
           "output_dim": 10}
    save_zoo_model(zoo.build(cfg).eval(), cfg, tmp_path / "t")
    teacher = load_teacher(tmp_path / "t")
    data = TensorData({"x": torch.randn(8, 64)}, torch.zeros(8, dtype=torch.long))
    ladder = build_ladder(teacher, data, SearchStudent())
    names = {c.name for c in ladder}
    assert {"mlp-16", "mlp-32", "mlp-64", "mlp-64-64", "mlp-32-32-32"} <= names  # 700 never halves to 64
    one_layer = [c for c in ladder if c.name.count("-") == 1 and c.name != "teacher"]
    assert any(int(c.name.split("-")[1]) <= 64 for c in one_layer)
    assert all(c.num_parameters < teacher.num_parameters for c in ladder if c.name != "teacher")
    small = next(c for c in ladder if c.name == "mlp-32")
    assert small.build().num_parameters == small.num_parameters


def test_an_accuracy_meets_the_bound_only_by_a_margin_that_shrinks_with_the_eval_split():
    small, large = with_margin(0.97, "accuracy", 270, 1.0), with_margin(0.97, "accuracy", 27_000, 1.0)
    assert small < 0.962 < large < 0.97  # about one standard error: 0.0107 on 270 samples, 0.001 on 27,000
    assert with_margin(1.0, "accuracy", 22, 1.0) < 1.0  # a perfect score on 22 samples is not certain
    assert with_margin(0.97, "accuracy", 270, 0.0) == 0.97
    assert with_margin(0.12, "mse", 200, 1.0) == pytest.approx(0.132)  # an mse gets worse: x (1 + sqrt(2/n))
    assert with_margin(0.12, "mae", 100, 1.0) == 0.12  # other metrics as they are
    assert with_margin(None, "accuracy", 100, 1.0) is None
    assert 1.0 < with_margin(1.01, "accuracy", 100, 1.0) < 1.01  # an unreachable bound keeps a finite margin


def test_count_macs_counts_linear_and_convolution_layers():
    mlp = zoo.build({"architecture": "mlp", "task": "classification", "input_dim": 10, "hidden": [16, 8],
                     "output_dim": 3})
    assert count_macs(mlp, {"x": torch.randn(1, 10)}) == 10 * 16 + 16 * 8 + 8 * 3
    conv = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(4 * 36, 2))
    assert count_macs(conv, {"input": torch.randn(1, 1, 6, 6)}) == 36 * 4 * 9 + 4 * 36 * 2
    assert mlp.training  # left in the mode it was in


def test_lazy_preparation_exports_and_times_only_the_candidates_the_training_reaches(tmp_path):
    """The convergence search builds the whole ladder but exports and times a candidate only when it
    trains it: on an easy problem the cheapest meets at once and the other forty are never exported."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 12, generator=g)
    y = (x[:, 0] > 0).long()
    cfg = {"architecture": "mlp", "task": "classification", "input_dim": 12, "hidden": [256, 256], "output_dim": 2}
    save_zoo_model(zoo.build(cfg).eval(), cfg, tmp_path / "t")
    teacher = load_teacher(tmp_path / "t")
    train_d, eval_d = TensorData({"x": x}, y).split(0.25, 0)
    onnx = export_onnx(teacher.module, {"x": x[:8]}, tmp_path / "t.onnx", task="classification")
    spec = CompressSpec.model_validate({
        "student": {"kind": "search"}, "targets": {"min": 0.5, "time_budget_s": 60},
        "quantization": {"method": "none"}, "evaluation": {"latency_batch_sizes": [1], "repeats": 3, "warmup": 1}})
    result = search(teacher, train_d, eval_d, spec, teacher_onnx=onnx, workdir=tmp_path / "w",
                    options=SearchOptions(rounds=1, min_timed_s=0.02))
    students = [c for c in result.candidates if c["name"] != "teacher"]
    trained = [o["name"] for o in result.rungs[0]["order"]]
    assert len(students) > 10 and trained  # a chance-level bound: the first one trained meets it
    for row in students:
        assert (row["fp32_size_bytes"] is not None) == (row["name"] in trained), row
    macs = sorted((c["macs"], c["num_parameters"], c["name"]) for c in students)
    assert trained[0] == macs[0][2]  # cheapest by multiply-accumulates first
    assert result.chosen.candidate == trained[0] and result.choice.met_all


def test_the_noise_band_holds_the_candidates_within_z_standard_errors_of_the_best_cheapest_first():
    def entry(name, metric, macs):
        e = Entry(Candidate(name, name, macs, None))
        e.metric, e.macs = metric, macs
        return e

    ranked = [entry("large", 0.981, 900_000), entry("mid", 0.975, 9_000), entry("small", 0.973, 300),
              entry("tiny", 0.93, 100)]
    state = SimpleNamespace(goal=SimpleNamespace(metric="accuracy", metric_ok=lambda v: v >= 0.99), evald=[0] * 270,
                            options=SimpleNamespace(confidence_z=1.0))
    assert [e.cand.name for e in noise_band(state, ranked)] == ["small", "mid", "large"]  # SE ≈ 0.008
    state.goal.metric_ok = lambda v: v >= 0.974  # the best meets the bound: only those that do too
    assert [e.cand.name for e in noise_band(state, ranked)] == ["mid", "large"]
    state.options.confidence_z = 0.0
    assert [e.cand.name for e in noise_band(state, ranked)] == ["large"]
    state.goal.metric, state.options.confidence_z = "mae", 1.0  # no error bar for an mae
    assert [e.cand.name for e in noise_band(state, ranked)] == ["large"]


def test_the_training_time_is_shared_by_the_tries_the_gallop_has_left():
    costs = list(range(27))
    met: list[bool | None] = [None] * 27
    assert tries_left(costs, met, 0) == 6  # 0, 1, 3, 7, 15, 26: each gets a sixth, not a third
    met[0] = met[1] = False
    assert tries_left(costs, met, 3) == 4  # 3, 7, 15, 26
    met[3], met[7] = False, True
    assert tries_left(costs, met, 4) == 3  # back down: 4, 5, 6 at most
    met[7] = None
    assert tries_left(costs, met, 26) == 1


def test_the_climb_stalls_when_costlier_candidates_stop_beating_a_best_that_meets_the_bound():
    goal = SimpleNamespace(metric="accuracy", higher_is_better=True, metric_ok=lambda v: v >= 0.925)
    state = SimpleNamespace(goal=goal, evald=[0] * 27, options=SimpleNamespace(confidence_z=1.0))
    assert stalled(state, [0.926, 0.926, 0.926])  # wine: every rung 25/27, at the bound, never by the margin
    assert not stalled(state, [0.926, 0.926])  # two tries are not a trend yet
    assert not stalled(state, [0.926, 0.926, 1.0])  # the last one beats the best by more than the noise
    goal.metric_ok = lambda v: v >= 0.95
    assert not stalled(state, [0.926, 0.926, 0.926])  # the best misses the bound: keep climbing
