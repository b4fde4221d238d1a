"""Search: the smallest, fastest model that meets the targets (ladder, halving, twins, budget, front)."""

from __future__ import annotations

import json
import math
import time
import zipfile

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from worker.compression.compress import compress
from worker.compression.deliver import missed_search_targets
from worker.compression.io.teachers import load_teacher, save_zoo_model
from worker.compression.measure.export import export_onnx
from worker.compression.measure.meter import merge_rounds
from worker.compression.measure.pareto import dominates, nondominated_ranks, pareto_front
from worker.compression.pipeline import CandidatePipeline
from worker.compression.search.goal import Goal, choose, front
from worker.compression.search.halving import extrapolate, hopeless, keep_order
from worker.compression.search.ladder import TEACHER, Candidate, build_ladder
from worker.compression.search.run import SearchOptions, search
from worker.compression.spec import CompressSpec, DerivedStudent, SearchStudent, SearchTargets, ZooStudent
from worker.compression.students import zoo
from worker.compression.students.factory import make_student
from worker.compression.types import TensorData

CFG = {"architecture": "mlp", "task": "classification", "input_dim": 16, "hidden": [128, 128], "output_dim": 4}
FAST = SearchOptions(rounds=1, min_timed_s=0.02)


@pytest.fixture(scope="module")
def problem(tmp_path_factory):
    """A learnable 4-class problem, a teacher trained on it, its ONNX graph and the split data."""
    root = tmp_path_factory.mktemp("search")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 16, generator=g)
    y = (x @ torch.randn(16, 4, generator=g)).argmax(1)
    torch.manual_seed(0)
    model = zoo.build(CFG)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(150):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_zoo_model(model.eval(), CFG, root / "teacher")
    np.savez(root / "data.npz", x=x.numpy(), y=y.numpy())
    teacher = load_teacher(root / "teacher")
    train, evald = TensorData({"x": x}, y).split(0.2, 0)
    onnx = export_onnx(teacher.module, {"x": evald.inputs["x"][:8]}, root / "teacher.onnx", task="classification")
    return {"root": root, "teacher": teacher, "train": train, "eval": evald, "onnx": onnx}


def _spec(**targets) -> CompressSpec:
    return CompressSpec.model_validate({
        "student": {"kind": "search"},
        "targets": {"max_drop": 0.05, **targets},
        "distillation": {"epochs": 8, "batch_size": 32, "lr": 3e-3},
        "quantization": {"method": "none"},
        "evaluation": {"latency_batch_sizes": [1], "repeats": 3, "warmup": 1},
    })


def _run(problem, tmp_path, spec, **kw):
    return search(problem["teacher"], problem["train"], problem["eval"], spec, teacher_onnx=problem["onnx"],
                  workdir=tmp_path / "work", options=kw.pop("options", FAST), **kw)


def _candidate(problem, name, architecture=None, **derived):
    teacher = problem["teacher"]
    spec = (ZooStudent(architecture=architecture) if architecture
            else DerivedStudent(**derived))
    n = make_student(teacher, spec).num_parameters
    return Candidate(name, name, n, lambda: make_student(teacher, spec))


# --- spec ---------------------------------------------------------------------------------


def test_targets_make_auto_a_search_and_bad_search_specs_name_the_field():
    assert CompressSpec.model_validate({"targets": {"max_drop": 0.01}}).student.kind == "search"
    assert CompressSpec().targets is None and CompressSpec().student.kind == "auto"
    cases = [
        ({"student": {"kind": "search"}}, ("targets",), "needs targets"),
        ({"targets": {}}, ("targets",), "metric target"),
        ({"student": None, "targets": {"min": 0.9}}, ("targets",), "student search"),
        ({"student": {"kind": "derived", "num_layers": 1}, "targets": {"min": 0.9}}, ("targets",), "fixed"),
        ({"student": {"kind": "search", "num_layers": 1}, "targets": {"min": 0.9}}, ("student", "num_layers"),
         "Extra inputs are not permitted"),
        ({"targets": {"metric": "mse", "min": 0.1}}, ("targets",), "give 'max'"),
        ({"targets": {"max_drop": 2.0, "drop_mode": "relative"}}, ("targets",), "fraction"),
    ]
    for body, loc, words in cases:
        with pytest.raises(ValidationError) as err:
            CompressSpec.model_validate(body)
        (e,) = err.value.errors()
        assert e["loc"] == loc and words in e["msg"], (body, e)


def test_goal_takes_the_stricter_bound_and_relative_drops():
    both = SearchTargets(min=0.9, max_drop=0.02)
    assert Goal.resolve(both, "classification", 0.95, 1).bound == pytest.approx(0.93)
    assert Goal.resolve(both, "classification", 0.90, 1).bound == pytest.approx(0.90)
    rel = Goal.resolve(SearchTargets(max_drop=0.1, drop_mode="relative"), "regression", 2.0, 1)
    assert rel.metric == "mse" and not rel.higher_is_better and rel.bound == pytest.approx(2.2)
    assert rel.metric_ok(2.1) and not rel.metric_ok(2.3)


# --- pure pieces: front, choice, halving ----------------------------------------------------


def test_pareto_front_and_ranks_on_hand_made_points():
    objectives = [("m", True), ("lat", False), ("size", False)]
    pts = [
        {"m": 0.90, "lat": 1.0, "size": 10},   # 0 front: fastest
        {"m": 0.95, "lat": 2.0, "size": 20},   # 1 front
        {"m": 0.94, "lat": 2.5, "size": 30},   # 2 dominated by 1
        {"m": 0.99, "lat": 9.0, "size": 90},   # 3 front: best metric
        {"m": 0.95, "lat": 2.0, "size": 20},   # 4 duplicate of 1: both stay
        {"m": 0.93, "lat": 3.0, "size": 5},    # 5 front: smallest
        {"m": None, "lat": 0.1, "size": 1},    # 6 no metric: never on a front
    ]
    assert pareto_front(pts, objectives) == [0, 1, 3, 4, 5]
    assert dominates(pts[1], pts[2], objectives) and not dominates(pts[1], pts[4], objectives)
    assert nondominated_ranks(pts, objectives) == [0, 0, 1, 0, 0, 0, 2]


def _model(name, value, latency, size, eligible=True, goal=None):
    m = {"name": name, "value": value, "latency_ms": latency, "size_bytes": size, "eligible": eligible}
    m["checks"] = goal.check(value, latency, size)
    return m


def test_choice_fastest_passing_ties_to_smaller_and_closest_when_none_passes():
    goal = Goal.resolve(SearchTargets(min=0.9, max_latency_ms=5.0, max_size_bytes=1000), "classification", 0.95, 1)
    models = [
        _model("a", 0.95, 2.00, 900, goal=goal),
        _model("b", 0.92, 2.05, 400, goal=goal),    # within 5 % of a's latency and smaller: wins the tie
        _model("c", 0.99, 1.00, 500, eligible=False, goal=goal),  # fastest, but an int8 slower than its fp32
        _model("d", 0.85, 0.50, 100, goal=goal),    # fastest eligible, misses the metric
    ]
    choice = choose(models, goal)
    assert choice.name == "b" and choice.met_all and "tied" in choice.why
    assert set(front(models, goal)) == {"a", "b", "d"}
    # nobody passes: fewest unmet targets first, then the smallest relative shortfall
    goal = Goal.resolve(SearchTargets(min=0.97, max_latency_ms=1.0), "classification", None, 1)
    models = [
        _model("slow", 0.98, 2.0, 10, goal=goal),      # misses latency by 100 %
        _model("close", 0.96, 0.9, 10, goal=goal),     # misses the metric by ~1 %
        _model("both", 0.90, 3.0, 10, goal=goal),      # misses both
    ]
    choice = choose(models, goal)
    assert choice.name == "close" and not choice.met_all and choice.unmet == ["metric"]
    assert choice.ranked == ["close", "slow", "both"]


def test_when_none_passes_metrics_within_the_tolerance_tie_and_the_fastest_wins():
    """A model a few eval samples better is no evidence: within the tolerance (the search passes the
    eval split's standard error) the faster one wins; outside it, the better one still does."""
    goal = Goal.resolve(SearchTargets(min=0.99), "classification", None, 1)
    models = [
        _model("large", 0.981, 2.0, 9000, goal=goal),
        _model("small", 0.975, 0.1, 300, goal=goal),
        _model("poor", 0.90, 0.05, 100, goal=goal),
    ]
    assert choose(models, goal).name == "large"  # no tolerance: the smallest shortfall
    choice = choose(models, goal, tolerance=0.01)
    assert choice.name == "small" and not choice.met_all and "count as ties" in choice.why
    assert choice.ranked[:2] == ["small", "large"]
    assert choose(models, goal, tolerance=0.001).name == "large"  # 0.006 apart: more than the tolerance
    # a model at the bound by less than the tolerance does not pass, but it still beats one below the
    # bound; of two at the bound by less than the tolerance, the faster wins
    goal = Goal.resolve(SearchTargets(min=0.97), "classification", None, 1)
    models = [_model("lucky", 0.972, 2.0, 9000, goal=goal), _model("fast", 0.965, 0.1, 300, goal=goal),
              _model("sure", 0.99, 3.0, 9000, goal=goal)]
    assert choose(models, goal, tolerance=0.01).name == "sure"  # it clears the bound by the tolerance
    models.pop()
    choice = choose(models, goal, tolerance=0.01)
    assert choice.name == "lucky" and "by 0.01 in accuracy" in choice.why
    models.append(_model("quick", 0.971, 0.5, 300, goal=goal))
    assert choose(models, goal, tolerance=0.01).name == "quick"
    # the training's own test of the noise: 0.972 less 0.001 clears 0.97, so "lucky" passes
    assert choose(models, goal, tolerance=0.01, worse=lambda v: v - 0.001).name == "quick"


def test_extrapolation_hopelessness_and_the_keep_order():
    # log-linear: +0.1 per e-fold of steps; twice that, carried one more e-fold
    pred = extrapolate((math.e ** 0 * 10, 0.5), (10 * math.e, 0.6), 10 * math.e ** 2, True, optimism=2.0)
    assert pred == pytest.approx(0.8)
    assert extrapolate((1, 0.9), (50, 0.85), 200, True) == pytest.approx(0.85)  # never below where it is
    goal = Goal.resolve(SearchTargets(min=0.9), "classification", None, 1)
    assert hopeless(0.85, goal) and not hopeless(0.895, goal) and not hopeless(None, goal)
    entries = [
        {"metric": 0.97, "cost": 9.0},   # 0 meets, but two cheaper ones do too
        {"metric": 0.93, "cost": 1.0},   # 1 meets: the cheapest
        {"metric": 0.95, "cost": 3.0},   # 2 meets: the second cheapest
        {"metric": 0.80, "cost": 0.5},   # 3 short, cheaper than any that meets
        {"metric": 0.85, "cost": 0.7},   # 4 short, cheaper, closer to the bound than 3
        {"metric": 0.88, "cost": 2.0},   # 5 short and dearer than one that meets: pointless
        {"metric": 0.84, "cost": 0.8},   # 6 short, dominated by 4
    ]
    kept, why = keep_order(entries, goal, 5)
    assert kept == [1, 2, 4, 3, 6]
    assert set(why) == {0, 5} and "cheaper candidate" in why[0] and "already meets" in why[5]
    kept, why = keep_order(entries, goal, 4)
    assert kept == [1, 2, 4, 3] and why[6].startswith("halved")
    kept, why = keep_order([{"metric": 0.5, "cost": 1.0}, {"metric": 0.6, "cost": 2.0}, {"metric": 0.55, "cost": 3.0}],
                           goal, 1)
    assert kept == [1]  # nobody meets the bound: the closest to it goes on


def test_merge_rounds_takes_medians_per_batch():
    def rnd(p50):
        return {"runtime": "onnxruntime", "threads": 1,
                "batches": [{"batch": 1, "p50_ms": p50, "p95_ms": 2 * p50, "mean_ms": p50, "repeats": 10}]}

    merged = merge_rounds([rnd(1.0), rnd(9.0), rnd(2.0)])
    (b,) = merged["batches"]
    assert b["p50_ms"] == 2.0 and b["p95_ms"] == 4.0 and merged["rounds"] == 3 and b["repeats"] == 30


# --- the ladder ------------------------------------------------------------------------------


def test_ladder_goes_from_the_teacher_down_and_respects_the_parameter_cap(problem):
    teacher = problem["teacher"]
    full = build_ladder(teacher, problem["train"], SearchStudent())
    assert full[0].name == TEACHER and full[0].num_parameters == teacher.num_parameters
    names = [c.name for c in full[1:]]
    assert len(set(names)) == len(names) and "mlp-128-128" not in names  # that one is the teacher
    assert {"mlp-64-64", "mlp-8-8", "mlp-128", "mlp-8"} <= set(names)  # width and depth, down to 8 units
    capped = build_ladder(teacher, problem["train"], SearchStudent(max_params=3000))
    assert capped and all(c.num_parameters <= 3000 for c in capped)
    assert TEACHER not in [c.name for c in capped]
    assert [c.num_parameters for c in capped] == sorted(c.num_parameters for c in capped)
    for c in capped[:2]:
        assert c.build().num_parameters == c.num_parameters


def test_size_cap_prunes_candidates_before_training(problem, tmp_path):
    cap = 2500
    result = _run(problem, tmp_path, _spec(max_size_bytes=cap).model_copy(
        update={"quantization": CompressSpec().quantization}))  # auto: int8 may bring a candidate under the cap
    rows = {c["name"]: c for c in result.candidates}
    for row in rows.values():
        over = row["fp32_size_bytes"] is not None and row["fp32_size_bytes"] * 0.25 > cap
        assert (row["status"] == "pruned") == over, row
        if over:
            assert row["epochs"] == 0 and "size cap" in row["reason"]
    assert rows[TEACHER]["status"] == "pruned"
    assert any(r["status"] != "pruned" for r in rows.values())
    if result.choice.met_all:
        assert result.chosen.size_bytes <= cap


# --- halving, twins, budget ------------------------------------------------------------------


def test_successive_halving_drops_a_hopeless_candidate(problem, tmp_path):
    good = _candidate(problem, "mlp-64-64", layers=[0, 1], width_ratio=0.5)
    bad = _candidate(problem, "mlp-1", architecture={"architecture": "mlp", "hidden": [1]})
    result = _run(problem, tmp_path, _spec(), candidates=[good, bad],
                  options=SearchOptions(training="halving", rounds=1, min_timed_s=0.02))
    rows = {c["name"]: c for c in result.candidates}
    assert rows["mlp-1"]["status"] == "dropped" and rows["mlp-1"]["reason"].startswith("hopeless after rung 1")
    assert rows["mlp-1"]["epochs"] == 2  # a quarter of the 8 epochs, then it stopped
    assert rows["mlp-64-64"]["status"] == "measured" and rows["mlp-64-64"]["epochs"] == 8
    assert {m.candidate for m in result.measured} == {"mlp-64-64"}
    assert result.rungs[0]["dropped"] == ["mlp-1"]
    assert result.choice.name == "mlp-64-64-fp32" and result.choice.met_all


def test_the_search_keeps_the_cheapest_candidate_that_meets_and_never_trains_costlier_ones(problem, tmp_path):
    """Convergence training (the default): cheapest first, each to its own plateau, galloping up the
    ladder: a one-unit MLP misses (when its timing puts it first), the narrow one-layer student meets
    and is chosen, and the costlier ones are never trained."""
    bad = _candidate(problem, "mlp-1", architecture={"architecture": "mlp", "hidden": [1]})
    good = _candidate(problem, "mlp-32", layers=[0], width_ratio=0.25)
    wide = _candidate(problem, "mlp-256x3", architecture={"architecture": "mlp", "hidden": [256, 256, 256]})
    huge = _candidate(problem, "mlp-1024x3", architecture={"architecture": "mlp", "hidden": [1024, 1024, 1024]})
    result = _run(problem, tmp_path, _spec(time_budget_s=30), candidates=[huge, wide, good, bad])
    rows = {c["name"]: c for c in result.candidates}
    order = [o["name"] for o in result.rungs[0]["order"]]
    assert set(order[:2]) <= {"mlp-1", "mlp-32"} and "mlp-32" in order
    assert "mlp-256x3" not in order and "mlp-1024x3" not in order
    if "mlp-1" in order:
        assert rows["mlp-1"]["status"] == "dropped" and "missed" in rows["mlp-1"]["reason"]
    assert rows["mlp-32"]["status"] == "measured" and rows["mlp-32"]["epochs"] > 8  # past the spec's 8 epochs
    for costly in ("mlp-256x3", "mlp-1024x3"):
        assert rows[costly]["epochs"] == 0 and "not trained" in rows[costly]["reason"]
    assert result.choice.met_all and result.chosen.candidate == "mlp-32"
    kd = result.rungs[0]["kd"]
    assert kd["chosen"] is not None and len(kd) >= 3  # settings tried on the cheapest, one chosen


def test_an_int8_twin_slower_than_fp32_is_reported_and_fp32_kept(problem, tmp_path):
    """A 16-8-4 MLP at batch 1 is all overhead: dynamic int8 adds quantize / integer-matmul / cast /
    rescale nodes to every layer, so its graph is measurably slower than the two fp32 Gemms."""
    tiny = _candidate(problem, "mlp-8", layers=[0], width_ratio=1 / 16)
    spec = _spec(max_drop=0.5).model_copy(update={"quantization": CompressSpec.model_validate(
        {"quantization": {"method": "dynamic_int8"}}).quantization})
    result = _run(problem, tmp_path, spec, candidates=[tiny], options=SearchOptions(rounds=3, min_timed_s=0.1))
    fp32 = result.by_name("mlp-8-fp32")
    twins = [m for m in result.measured if m is not fp32]
    assert {m.recipe for m in twins} == {"dynamic_int8", "dynamic_int8_per_tensor"}
    for int8 in twins:
        assert int8.twin == fp32.name and int8.latency_ms > fp32.latency_ms
        assert not int8.eligible and "fp32 kept" in int8.notes and "slower than its fp32 twin" in int8.notes[0]
        assert int8.name not in result.front
    assert result.chosen is fp32


def test_a_tiny_time_budget_returns_the_best_so_far_and_names_unmet_targets(problem, tmp_path):
    small = _candidate(problem, "mlp-2", architecture={"architecture": "mlp", "hidden": [2]})
    big = _candidate(problem, "mlp-64-64", layers=[0, 1], width_ratio=0.5)
    # unreachable: however fast the machine, "metric" stays unmet; 0.5 s: convergence runs stop on a
    # plateau so soon on this tiny problem that two candidates could both finish within 1 s
    spec = _spec(min=1.01, time_budget_s=0.5)
    spec = spec.model_copy(update={"distillation": spec.distillation.model_copy(update={"epochs": 400})})
    t0 = time.monotonic()
    result = _run(problem, tmp_path, spec, candidates=[small, big])
    wall = time.monotonic() - t0
    assert result.budget["stopped_by_budget"] and result.budget["used_s"] <= wall + 0.01
    assert wall < 1.0 + 10  # the budget, plus at most one short training and one measurement
    assert result.chosen.candidate in ("mlp-2", "mlp-64-64")
    assert not result.choice.met_all and "metric" in result.choice.unmet
    assert any("time budget" in n for n in result.notes)
    statuses = {c["name"]: c["status"] for c in result.candidates}
    cut = [c for c in result.candidates if "time budget" in c["reason"]]  # convergence: shares cut short
    assert "not trained" in statuses.values() or "not measured" in statuses.values() or cut
    assert any("NOT met" in line for line in result.to_dict()["chosen_checks"])
    [missed] = [m for m in missed_search_targets(result) if m.startswith("accuracy")]
    assert "short of ≥ 1.01" in missed  # the verdict's target_missed says by how much


def test_qat_method_adds_a_quantization_aware_twin(problem, tmp_path, monkeypatch):
    calls = []  # every twin comes from the candidate pipeline's quantize stage, as in a single run
    original = CandidatePipeline.quantize
    monkeypatch.setattr(CandidatePipeline, "quantize", lambda self, fp32, out, config, **kw: calls.append(
        (config.method, getattr(config, "per_channel", None), kw.get("module") is not None)) or original(
        self, fp32, out, config, **kw))
    cand = _candidate(problem, "mlp-32-32", layers=[0, 1], width_ratio=0.25)
    spec = _spec(max_drop=0.5)
    spec = spec.model_copy(update={
        "distillation": spec.distillation.model_copy(update={"epochs": 2}),
        "quantization": CompressSpec.model_validate({"quantization": {"method": "qat", "qat_epochs": 1}}).quantization})
    result = _run(problem, tmp_path, spec, candidates=[cand])
    recipes = {m.recipe for m in result.measured}
    assert recipes == {"fp32", "static_int8", "static_int8_per_tensor", "qat_int8"}
    qat = result.by_name("mlp-32-32-qat_int8")
    assert qat.twin == "mlp-32-32-fp32" and qat.value is not None and qat.latency_ms > 0
    assert any("quantization-aware" in n for n in qat.notes)
    assert calls == [("static_int8", True, False), ("static_int8", False, False), ("qat", True, True)]


# --- compress() --------------------------------------------------------------------------------


def test_compress_with_targets_returns_the_chosen_model_the_front_and_a_report(problem, tmp_path):
    spec = CompressSpec.model_validate({
        "student": {"kind": "auto", "max_params": 6000},   # auto + targets = search; the cap trims the ladder
        "targets": {"max_drop": 0.05, "max_size_bytes": 40_000, "latency_batch_size": 4, "time_budget_s": 120},
        "distillation": {"epochs": 8, "batch_size": 32, "lr": 3e-3},
        "quantization": {"method": "static_int8", "calibration_samples": 64},
        "evaluation": {"latency_batch_sizes": [1], "repeats": 3, "warmup": 1},
    })
    seen = []
    res = compress(spec, teacher_path=problem["root"] / "teacher", dataset_path=problem["root"] / "data.npz",
                   output_dir=tmp_path / "out", progress=seen.append)
    report = res.metrics
    search_part = report["search"]
    chosen = search_part["chosen"]
    arts = {a.name: a for a in res.artifacts}

    primary = res.artifacts[0]
    assert primary.name == ("model_fp32.onnx" if chosen["recipe"] == "fp32" else "model_int8.onnx")
    assert primary.description.startswith(f"the chosen model: {chosen['candidate']} as {chosen['recipe']}")
    assert "chosen because" in primary.description and primary.path.stat().st_size == chosen["size_bytes"]
    front_files = sorted(n for n in arts if n.startswith("front-"))
    assert len(front_files) == len(search_part["front"]) >= 1
    for i, name in enumerate(search_part["front"], 1):
        art = arts[f"front-{i:02d}-{name}.onnx"]
        assert art.kind in ("onnx_fp32", "onnx_int8") and "Pareto-front model" in art.description
    assert {"student.zip", "report.json", "report.html", "manifest.json"} <= set(arts)
    with zipfile.ZipFile(arts["student.zip"].path) as zf:
        assert {"config.json", "model.safetensors"} <= set(zf.namelist())

    # the report: every measured model with its numbers and training time, the ladder, the choice
    assert chosen["met_all"] and chosen["name"] in [m["name"] for m in search_part["measured"]]
    for m in search_part["measured"]:
        assert m["size_bytes"] > 0 and m["latency_ms"] > 0 and "train_s" in m
        assert {b["batch"] for b in m["latency"]["batches"]} == {1, 4}  # the goal's batch is measured too
    assert all(c["num_parameters"] <= 6000 for c in search_part["candidates"])
    assert report["summary"]["search"]["chosen"] == chosen["name"]
    assert json.loads(arts["report.json"].path.read_text())["search"]["front"] == search_part["front"]
    html = arts["report.html"].path.read_text()
    for heading in ("Search: the chosen model", "Pareto front", "Every measured model", "Candidates (the ladder)",
                    "Successive halving"):
        assert heading in html
    assert html.count("data:image/png;base64") >= 2
    manifest = json.loads(arts["manifest.json"].path.read_text())
    assert set(front_files) <= set(manifest["outputs"])

    # progress went through the callback, under stage "search", with candidate counts
    search_events = [p for p in seen if p.stage == "search"]
    assert search_events and all(p.total >= 1 and 0 <= p.step <= p.total for p in search_events)
    assert any("rung 1" in (p.message or "") for p in search_events)


def test_a_black_box_onnx_teacher_searches_over_fresh_students(problem, tmp_path):
    spec = CompressSpec.model_validate({
        "student": {"kind": "search", "max_params": 2000},
        "targets": {"max_drop": 0.3, "time_budget_s": 60},
        "distillation": {"epochs": 4, "batch_size": 32, "lr": 3e-3},
        "quantization": {"method": "none"},
        "evaluation": {"latency_batch_sizes": [1], "repeats": 3, "warmup": 1},
    })
    res = compress(spec, teacher_path=problem["onnx"], dataset_path=problem["root"] / "data.npz",
                   output_dir=tmp_path / "out")
    search_part = res.metrics["search"]
    students = [c for c in search_part["candidates"] if c["name"] != TEACHER]
    assert students and all(c["description"].startswith("fresh zoo student for a black-box teacher")
                            for c in students)
    assert {c["name"] for c in students} >= {"mlp-8", "mlp-8-8"}
    assert all(c["num_parameters"] <= 2000 for c in search_part["candidates"])
    assert res.artifacts[0].name == "model_fp32.onnx" and search_part["chosen"]["met_all"]
