"""Losses and metrics against hand computations."""

import math

import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score, precision_recall_fscore_support

from worker.compression.distill.losses import (
    FeatureProjector,
    attention_loss,
    default_layer_map,
    embedding_loss,
    hard_ce,
    kd_kl,
    kd_kl_topk,
    regression_loss,
)
from worker.compression.errors import SpecError
from worker.compression.measure.metrics import accuracy, evaluate_outputs, macro_f1, mean_cosine, per_class

S = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
T = [[2.0, 0.0, 1.0], [1.0, 1.0, 1.5]]


def _softmax(row: list[float], temp: float) -> list[float]:
    e = [math.exp(v / temp) for v in row]
    return [v / sum(e) for v in e]


def test_kd_kl_is_batch_mean_kl_times_t_squared() -> None:
    temp = 2.0
    kl = 0.0
    for s_row, t_row in zip(S, T, strict=True):
        p, q = _softmax(t_row, temp), _softmax(s_row, temp)
        kl += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
    expected = kl / len(S) * temp**2
    got = kd_kl(torch.tensor(S), torch.tensor(T), temp).item()
    assert got == pytest.approx(expected, rel=1e-6)
    # the T² factor: the same logits at T=1 give the plain KL, without scaling
    plain = kd_kl(torch.tensor(S), torch.tensor(T), 1.0).item()
    kl1 = sum(
        sum(p * math.log(p / q) for p, q in zip(_softmax(t, 1), _softmax(s, 1), strict=True))
        for s, t in zip(S, T, strict=True)
    )
    assert plain == pytest.approx(kl1 / 2, rel=1e-6)


def test_kd_kl_zero_for_equal_logits() -> None:
    x = torch.randn(4, 5)
    assert kd_kl(x, x.clone(), 3.0).item() == pytest.approx(0.0, abs=1e-6)


def test_topk_kl_equals_full_kl_when_k_is_all_classes() -> None:
    s, t = torch.randn(6, 5), torch.randn(6, 5)
    values, indices = t.topk(5, dim=-1)
    assert kd_kl_topk(s, values, indices, 4.0).item() == pytest.approx(kd_kl(s, t, 4.0).item(), rel=1e-5)


def test_topk_kl_by_hand() -> None:
    temp = 1.0
    s, t = S[0], T[0]  # teacher top-2: classes 0 (2.0) and 2 (1.0)
    p = _softmax([2.0, 1.0], temp)
    log_q = [math.log(v) for v in _softmax(s, temp)]
    expected = p[0] * (math.log(p[0]) - log_q[0]) + p[1] * (math.log(p[1]) - log_q[2])
    values, indices = torch.tensor([t]).topk(2, dim=-1)
    assert kd_kl_topk(torch.tensor([s]), values, indices, temp).item() == pytest.approx(expected, rel=1e-6)


def test_hard_ce_by_hand() -> None:
    y = [1, 2]
    expected = -sum(math.log(_softmax(row, 1.0)[c]) for row, c in zip(S, y, strict=True)) / 2
    assert hard_ce(torch.tensor(S), torch.tensor(y)).item() == pytest.approx(expected, rel=1e-6)


def test_embedding_losses_by_hand() -> None:
    a, b = [[1.0, 0.0], [1.0, 1.0]], [[0.0, 2.0], [2.0, 2.0]]
    cos = [0.0, 1.0]
    got = embedding_loss(torch.tensor(a), torch.tensor(b), "cosine").item()
    assert got == pytest.approx(1 - sum(cos) / 2, abs=1e-6)
    mse = ((1 - 0) ** 2 + (0 - 2) ** 2 + (1 - 2) ** 2 + (1 - 2) ** 2) / 4
    assert embedding_loss(torch.tensor(a), torch.tensor(b), "mse").item() == pytest.approx(mse)
    with pytest.raises(SpecError):
        embedding_loss(torch.tensor(a), torch.tensor(b), "l1")  # type: ignore[arg-type]


def test_regression_loss_matches_column_predictions_to_flat_targets() -> None:
    pred, target = torch.tensor([[1.0], [3.0]]), torch.tensor([2.0, 5.0])
    assert regression_loss(pred, target).item() == pytest.approx((1 + 4) / 2)


def test_default_layer_map_is_evenly_spaced_ending_at_the_last_layer() -> None:
    assert default_layer_map(2, 4) == {0: 1, 1: 3}
    assert default_layer_map(3, 3) == {0: 0, 1: 1, 2: 2}
    assert default_layer_map(4, 2) == {0: 0, 1: 0, 2: 1, 3: 1}
    assert default_layer_map(1, 6) == {0: 5}
    assert default_layer_map(0, 3) == {}


def test_projector_vectors_linear_and_learns() -> None:
    s, t = [torch.randn(4, 8)], [torch.randn(4, 16)]
    proj = FeatureProjector(s, t, {0: 0})
    layer = proj.projections[0]
    assert isinstance(layer, torch.nn.Linear) and (layer.in_features, layer.out_features) == (8, 16)
    expected = F.mse_loss(layer(s[0]), t[0])
    loss = proj(s, t)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


def test_projector_conv_maps_pool_the_larger_map() -> None:
    s, t = [torch.randn(2, 3, 8, 8)], [torch.randn(2, 6, 4, 4)]
    proj = FeatureProjector(s, t, {0: 0}, kind="cosine")
    conv = proj.projections[0]
    assert isinstance(conv, torch.nn.Conv2d) and conv.weight.shape == (6, 3, 1, 1)
    pooled = F.adaptive_avg_pool2d(conv(s[0]), (4, 4))
    expected = 1 - F.cosine_similarity(pooled, t[0], dim=1).mean()
    assert proj(s, t).item() == pytest.approx(expected.item(), rel=1e-5)


def test_projector_signals_use_conv1d_and_square_maps_start_as_identity() -> None:
    h = torch.randn(2, 4, 10)
    proj = FeatureProjector([h], [h.clone()], {0: 0})
    assert isinstance(proj.projections[0], torch.nn.Conv1d)
    assert proj([h], [h.clone()]).item() == pytest.approx(0.0, abs=1e-10)


def test_projector_token_states_and_lengths() -> None:
    s, t = [torch.randn(2, 6, 8)], [torch.randn(2, 3, 12)]
    proj = FeatureProjector(s, t, {0: 0}, tokens=True)
    lin = proj.projections[0]
    assert isinstance(lin, torch.nn.Linear) and lin.weight.shape == (12, 8)
    pooled = F.adaptive_avg_pool1d(lin(s[0]).transpose(1, 2), 3)
    assert proj(s, t).item() == pytest.approx(F.mse_loss(pooled, t[0].transpose(1, 2)).item(), rel=1e-5)


def test_projector_mixed_ranks_average_spatial_dims() -> None:
    s, t = [torch.randn(2, 16)], [torch.randn(2, 6, 4, 4)]
    proj = FeatureProjector(s, t, {0: 0})
    lin = proj.projections[0]
    assert lin.weight.shape == (6, 16)
    expected = F.mse_loss(lin(s[0]), t[0].mean((2, 3)))
    assert proj(s, t).item() == pytest.approx(expected.item(), rel=1e-5)


def test_projector_several_pairs_and_negative_indices() -> None:
    s = [torch.randn(2, 4), torch.randn(2, 5)]
    t = [torch.randn(2, 7), torch.randn(2, 8), torch.randn(2, 9)]
    proj = FeatureProjector(s, t, {0: 1, -1: -1})
    assert proj.pairs == [(0, 1), (1, 2)]
    assert [p.out_features for p in proj.projections] == [8, 9]


def test_projector_rejects_bad_maps() -> None:
    s, t = [torch.randn(2, 4)], [torch.randn(2, 4)]
    with pytest.raises(SpecError, match="teacher hidden index 3"):
        FeatureProjector(s, t, {0: 3})
    with pytest.raises(SpecError, match="empty"):
        FeatureProjector(s, t, {})


def test_attention_loss_zero_for_identical_maps_and_kl_otherwise() -> None:
    a = torch.softmax(torch.randn(2, 4, 5, 5), -1)
    assert attention_loss([a], [a.clone()], {0: 0}).item() == 0.0
    b = torch.softmax(torch.randn(2, 4, 5, 5), -1)
    expected = (b * (b.log() - a.log())).sum(-1).mean()
    assert attention_loss([a], [b], {0: 0}).item() == pytest.approx(expected.item(), rel=1e-5)


def test_attention_loss_averages_heads_when_counts_differ() -> None:
    s = torch.softmax(torch.randn(2, 2, 5, 5), -1)
    t = torch.softmax(torch.randn(2, 4, 5, 5), -1)
    sm, tm = s.mean(1), t.mean(1)
    expected = (tm * (tm.log() - sm.log())).sum(-1).mean()
    assert attention_loss([s], [t], {0: 0}).item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(SpecError, match="sequence lengths"):
        attention_loss([s], [torch.softmax(torch.randn(2, 4, 6, 6), -1)], {0: 0})


def test_classification_metrics_match_sklearn() -> None:
    y = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3])
    pred = torch.tensor([0, 1, 1, 1, 2, 0, 2, 1])
    assert accuracy(pred, y) == pytest.approx(5 / 8)
    assert macro_f1(pred, y) == pytest.approx(f1_score(y.numpy(), pred.numpy(), average="macro"))
    p, r, f, sup = precision_recall_fscore_support(
        y.numpy(), pred.numpy(), labels=[0, 1, 2, 3], zero_division=0
    )
    rows = per_class(pred, y, 4, classes=["a", "b", "c", "d"])
    assert [row["class"] for row in rows] == ["a", "b", "c", "d"]
    assert [row["precision"] for row in rows] == pytest.approx(list(p))
    assert [row["recall"] for row in rows] == pytest.approx(list(r))
    assert [row["f1"] for row in rows] == pytest.approx(list(f))
    assert [row["support"] for row in rows] == list(sup)


def test_evaluate_outputs_references() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]])
    teacher = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    labelled = evaluate_outputs("classification", logits, torch.tensor([0, 1, 1]), teacher)
    assert labelled["reference"] == "labels" and labelled["accuracy"] == pytest.approx(2 / 3)
    assert labelled["teacher_agreement"] == pytest.approx(2 / 3)
    unlabelled = evaluate_outputs("classification", logits, None, teacher)
    assert unlabelled["reference"] == "teacher" and unlabelled["accuracy"] == pytest.approx(2 / 3)
    emb = evaluate_outputs("embedding", torch.tensor([[1.0, 0.0]]), None, torch.tensor([[0.0, 3.0]]))
    assert emb["cosine"] == pytest.approx(0.0) and emb["mse"] == pytest.approx(5.0)
    assert mean_cosine(torch.tensor([[1.0, 1.0]]), torch.tensor([[2.0, 2.0]])) == pytest.approx(1.0)
    reg = evaluate_outputs("regression", torch.tensor([[1.0], [2.0]]), torch.tensor([1.0, 4.0]), None)
    assert reg == {"reference": "labels", "mse": pytest.approx(2.0), "mae": pytest.approx(1.0),
                   "r2": pytest.approx(1 / 9)}
