"""Fields of use: time series cut into windows in time order, policies judged against their teacher."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from pydantic import ValidationError

from worker.compression.errors import DatasetError
from worker.compression.fields import primary_metric, tolerance
from worker.compression.fields.metrics import action_metrics, forecast_metrics
from worker.compression.fields.policy import return_reason, rollout_returns
from worker.compression.io.data_common import DataLimits
from worker.compression.io.datasets import load_dataset, train_eval_split
from worker.compression.spec import CompressSpec, DataSpec


def _spec(**over) -> DataSpec:
    return DataSpec(**{"task": "forecasting", "target_columns": ["y"], "window": 4, "horizon": 2, **over})


def _csv(tmp_path, df: pd.DataFrame, name: str = "s.csv"):
    path = tmp_path / name
    df.to_csv(path, index=False)
    return path


def test_windows_hold_the_past_and_targets_the_next_steps(tmp_path):
    df = pd.DataFrame({"t": range(20), "y": np.arange(20) * 10.0, "z": np.arange(20) + 0.5})
    data = load_dataset(_csv(tmp_path, df), _spec(time_column="t", feature_columns=["z"]), task="regression")
    assert data.input_kind == "signal" and data.inputs["x"].shape == (15, 2, 4)  # 20 − (4 + 2) + 1 windows
    assert data.inputs["x"][3, 0].tolist() == [30, 40, 50, 60]  # target history first
    assert data.inputs["x"][3, 1].tolist() == [3.5, 4.5, 5.5, 6.5]  # then the covariates
    assert data.y[3].tolist() == [70, 80]
    flat = load_dataset(_csv(tmp_path, df), _spec(feature_columns=["z"]), input_shape=(8,), input_kind="vector")
    assert flat.inputs["x"][3].tolist() == [30, 40, 50, 60, 3.5, 4.5, 5.5, 6.5]  # channel-major
    time_major = load_dataset(_csv(tmp_path, df), _spec(feature_columns=["z"]), input_shape=(4, 2))
    assert time_major.inputs["x"][3, 0].tolist() == [30, 3.5]


def test_unsorted_rows_are_sorted_by_time_and_repeated_stamps_refused(tmp_path):
    df = pd.DataFrame({"ts": pd.date_range("2026-01-01", periods=12, freq="h").astype(str), "y": np.arange(12.0)})
    shuffled = df.sample(frac=1.0, random_state=0)
    data = load_dataset(_csv(tmp_path, shuffled), _spec(time_column="ts"))
    assert data.inputs["x"][0, 0].tolist() == [0, 1, 2, 3] and data.meta["sorted_by_time"] is True
    twice = pd.concat([df.iloc[:6], df.iloc[5:]])
    with pytest.raises(DatasetError, match="appears more than once"):
        load_dataset(_csv(tmp_path, twice), _spec(time_column="ts"))


@pytest.mark.parametrize(("df", "over", "message"), [
    (pd.DataFrame({"y": np.arange(5.0)}), {}, "too short"),
    (pd.DataFrame({"y": np.arange(20.0)}), {"target_columns": ["load"]}, "no column 'load'"),
    (pd.DataFrame({"y": ["a"] * 20}), {}, "not a finite number"),
    (pd.DataFrame({"y": [1.0, None] * 10}), {}, "missing value"),
    (pd.DataFrame({"t": ["x", "y"] * 10, "y": np.arange(20.0)}), {"time_column": "t"}, "neither numbers nor dates"),
])
def test_bad_series_are_refused_with_the_reason(tmp_path, df, over, message):
    with pytest.raises(DatasetError, match=message):
        load_dataset(_csv(tmp_path, df), _spec(**over))


def test_windows_respect_the_memory_cap(tmp_path):
    df = pd.DataFrame({"y": np.arange(2000.0)})
    with pytest.raises(Exception, match="memory limit|over the limit"):
        load_dataset(_csv(tmp_path, df), _spec(window=500), limits=DataLimits(memory_bytes=4 << 20))


def test_the_split_is_chronological_and_no_training_target_reaches_the_evaluation_targets(tmp_path):
    df = pd.DataFrame({"y": np.arange(200.0)})
    spec = _spec(window=10, horizon=5)
    train, evald = train_eval_split(load_dataset(_csv(tmp_path, df), spec), None, spec)
    last_train_target = train.y.max().item()
    first_eval_target = evald.y.min().item()
    assert last_train_target < first_eval_target
    assert evald.y.max().item() == 199  # the evaluation windows are the last ones
    assert train.meta["split"] == "chronological" and evald.meta["gap_windows"] == 4  # horizon − 1 dropped


def test_spec_refuses_half_given_fields():
    with pytest.raises(ValidationError, match="needs window"):
        DataSpec(task="forecasting", target_columns=["y"], horizon=2)
    with pytest.raises(ValidationError, match="only apply to task 'forecasting'"):
        DataSpec(window=3)
    with pytest.raises(ValidationError, match="action_space"):
        DataSpec(task="policy")
    with pytest.raises(ValidationError, match="continuous action space"):
        DataSpec(task="policy", action_space="discrete", env="Pendulum-v1")
    CompressSpec.model_validate({"distillation": {"target": {"metric": "mae", "max": 1.0}}})  # mae is a target


def test_forecast_metrics_guard_zero_targets():
    y = torch.tensor([[0.0, 10.0], [20.0, 0.0]])
    pred = torch.tensor([[1.0, 11.0], [18.0, 0.0]])
    m = forecast_metrics(pred, y)
    assert m["mae"] == pytest.approx(1.0)
    assert m["mape"] == pytest.approx((0.1 + 0.1) / 2)  # the zero targets are left out of MAPE
    assert m["smape"] == pytest.approx((2 + 2 / 21 + 4 / 38 + 0) / 4)  # 0 where both are 0
    assert math.isfinite(m["smape"])


def test_field_metrics_and_tolerances():
    assert primary_metric("regression", {"field": "forecasting"}, "mse") == "mae"
    assert primary_metric("classification", {"field": "policy", "action_space": "discrete"}, "accuracy") == "agreement"
    assert primary_metric("regression", {}, "mse") == "mse"
    assert tolerance({"field": "forecasting"}, "mae", {}) == 0.05
    assert tolerance({"field": "policy", "action_space": "continuous"}, "action_mae", {"action_std": 2.0}) == 0.2
    teacher = torch.tensor([[2.0, 1.0], [0.0, 1.0], [3.0, 0.0], [0.0, 5.0]])
    assert action_metrics(teacher.flip(1), teacher, discrete=True)["agreement"] == 0.0
    assert action_metrics(teacher + 0.1, teacher, discrete=True)["agreement"] == 1.0
    assert action_metrics(teacher + 0.5, teacher, discrete=False)["action_mae"] == pytest.approx(0.5)


def test_logged_actions_are_labels_and_the_rest_observations(tmp_path):
    df = pd.DataFrame({"a": [0.1, 0.2, 0.3, 0.4], "b": [1.0, 2.0, 3.0, 4.0], "act": [0, 1, 1, 0]})
    spec = DataSpec(task="policy", action_space="discrete", action_columns=["act"])
    data = load_dataset(_csv(tmp_path, df), spec)
    assert data.inputs["x"].shape == (4, 2) and data.y.tolist() == [0, 1, 1, 0]
    assert data.meta["field"] == "policy" and data.meta["action_space"] == "discrete"
    cont = DataSpec(task="policy", action_space="continuous", action_columns=["act", "b"])
    data = load_dataset(_csv(tmp_path, df), cont)
    assert data.inputs["x"].shape == (4, 1) and data.y.shape == (4, 2) and data.y.dtype == torch.float32


def test_rollouts_tell_a_balancing_policy_from_a_useless_one(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    def linear(path, weight):  # logits = obs @ W (2 actions)
        w = helper.make_tensor("W", TensorProto.FLOAT, [4, 2], np.asarray(weight, np.float32).ravel().tolist())
        node = helper.make_node("MatMul", ["x", "W"], ["logits"])
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
                                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 2])], [w])
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
        return path

    good = [[-0.1, 0.1], [-0.5, 0.5], [-10, 10], [-2, 2]]  # `bench.field_cases.cartpole_controller`
    section = rollout_returns("CartPole-v1", {"teacher": linear(tmp_path / "t.onnx", good),
                                              "student": linear(tmp_path / "s.onnx", np.zeros((4, 2)))},
                              episodes=3, discrete=True)
    returns = section["returns"]
    assert returns["teacher"]["mean"] == 500.0 and returns["student"]["mean"] < 100
    reason = return_reason(section, "student")
    assert reason is not None and reason["code"] == "return_drop"
    assert return_reason(section, "teacher") is None


def test_a_temporal_cnn_keeps_where_in_the_window_a_feature_is():
    from worker.compression.spec.sizes import zoo_parameters
    from worker.compression.students import zoo
    from worker.compression.students.zoo_init import init_from_teacher

    cfg = {"architecture": "cnn1d", "task": "regression", "in_channels": 2, "input_length": 47, "channels": [8, 8, 8],
           "hidden": 16, "pool": "flatten", "output_dim": 6}
    torch.manual_seed(0)
    net = zoo.build(cfg).eval()
    assert zoo.count_parameters(net) == zoo_parameters(cfg)  # the torch-free count the API checks budgets with
    x = torch.randn(1, 2, 47)
    moved = torch.cat([x[:, :, 20:], x[:, :, :20]], 2)  # same values, other places: mean pooling could not tell
    assert not torch.allclose(net(x=x), net(x=moved))
    narrow = zoo.build({**cfg, "channels": [4, 4, 4]})
    report = init_from_teacher(narrow, net, [0, 1, 2])  # a derived student: the flat head stays fresh
    assert report.partial > 0
    with pytest.raises(Exception, match="flatten"):
        zoo.build({"architecture": "mlp", "input_dim": 3, "output_dim": 1, "pool": "flatten"})


def test_a_continuous_policy_is_judged_by_its_action_difference_and_its_return(tmp_path):
    from worker.compression.compress import compress
    from worker.compression.io.teachers import save_zoo_model
    from worker.compression.students import zoo

    cfg = {"architecture": "mlp", "task": "regression", "input_dim": 3, "hidden": [64], "output_dim": 1}
    torch.manual_seed(0)
    teacher = zoo.build(cfg)
    rng = np.random.default_rng(0)
    obs = np.concatenate([rng.uniform(-1, 1, (600, 2)), rng.uniform(-8, 8, (600, 1))], 1).astype(np.float32)
    torque = np.clip(-2.0 * obs[:, 1:2] - 0.3 * obs[:, 2:3], -2, 2)  # a damping rule (it does not swing up)
    opt = torch.optim.Adam(teacher.parameters(), 1e-2)
    for _ in range(150):
        loss = torch.nn.functional.mse_loss(teacher(torch.from_numpy(obs)), torch.from_numpy(torque))
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_zoo_model(teacher.eval(), cfg, tmp_path / "teacher")
    np.savez(tmp_path / "log.npz", x=obs)
    spec = CompressSpec.model_validate({
        "data": {"task": "policy", "action_space": "continuous", "env": "Pendulum-v1", "episodes": 2},
        "student": {"kind": "auto", "max_params_ratio": 0.5}, "quantization": {"method": "none"},
        "distillation": {"epochs": 5, "batch_size": 64, "lr": 3e-3},
        "evaluation": {"latency_batch_sizes": [1], "repeats": 2, "warmup": 1}})
    report = compress(spec, teacher_path=tmp_path / "teacher", dataset_path=tmp_path / "log.npz",
                      output_dir=tmp_path / "out").metrics
    assert report["primary_metric"] == "action_mae" and report["delivery"]["metric"] == "action_mae"
    rows = {r["name"]: r["metric"] for r in report["models"]}
    assert rows["teacher"]["action_mae"] == 0.0 and rows["student"]["action_mae"] < 0.5 * rows["teacher"]["action_std"]
    assert report["delivery"]["tolerance"] == pytest.approx(0.1 * rows["teacher"]["action_std"])
    returns = report["policy"]["returns"]
    assert set(returns) >= {"teacher", "student"} and report["policy"]["episodes"] == 2
    assert all(-2000 < r["mean"] <= 0 for r in returns.values())  # Pendulum's rewards are costs
    assert "Return in Pendulum-v1 over 2 episodes" in (tmp_path / "out" / "report.html").read_text()


def test_without_gymnasium_the_return_is_not_measured_and_says_why(monkeypatch, tmp_path):
    from worker.compression.fields import policy

    monkeypatch.setattr(policy, "gymnasium_available", lambda: False)
    section = policy.rollout_returns("CartPole-v1", {"teacher": tmp_path / "missing.onnx"}, episodes=3, discrete=True)
    assert section == {"env": "CartPole-v1", "measured": False, "why": "gymnasium is not installed on the worker"}
    assert policy.return_reason(section, "teacher") is None
