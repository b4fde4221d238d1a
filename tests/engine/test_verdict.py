"""The verdict's rules on measured candidates (measure.verdict): what it says, and its one-line headline."""

from __future__ import annotations

from pathlib import Path

import torch

from worker.compression.measure.metrics import paired_drop_noise
from worker.compression.measure.verdict import Candidate, verdict


def candidate(name: str, role: str, precision: str, accuracy: float, size: int, p50: float) -> Candidate:
    return Candidate(name, role, precision, Path(name), {"accuracy": accuracy}, size,
                     {"batches": [{"batch": 64, "p50_ms": p50}]})


TEACHER = candidate("teacher", "teacher", "fp32", 0.95, 400_000, 4.0)


def judge(delivered: Candidate) -> dict:
    return verdict(delivered, TEACHER, [delivered], metric="accuracy", tolerance=0.01, batch=64, chance=0.34,
                   labelled=True)


def test_a_good_student_ships_and_the_headline_says_deploy_it() -> None:
    out = judge(candidate("student", "student", "fp32", 0.95, 40_000, 1.0))
    assert out["verdict"] == "ship" and out["reasons"] == []
    assert out["headline"].startswith("deploy the distilled student (fp32), 10.0× smaller, 4.0× faster at batch 64")


def test_a_student_that_must_not_ship_is_never_headlined_as_one_to_deploy() -> None:
    out = judge(candidate("student", "student", "int8", 0.60, 40_000, 1.0))
    assert out["verdict"] == "do_not_ship" and [r["code"] for r in out["reasons"]] == ["metric_drop_large"]
    assert out["headline"].startswith("do not ship: the best is the distilled student (int8)")
    assert "deploy" not in out["headline"]


def test_a_slower_or_larger_student_must_not_ship() -> None:
    out = judge(candidate("student", "student", "fp32", 0.95, 500_000, 5.0))
    assert out["verdict"] == "do_not_ship"
    assert {r["code"] for r in out["reasons"]} == {"slower_than_teacher", "larger_than_teacher"}


def test_a_drop_within_the_noise_of_a_small_eval_split_is_a_caution_not_a_refusal() -> None:
    """One flower in 23 is 4.3 points: past 3× the tolerance, and no evidence of a worse student."""
    y = torch.zeros(23, dtype=torch.long)
    teacher_out = torch.tensor([[1.0, 0.0]] * 23)
    student_out = teacher_out.clone()
    student_out[0] = torch.tensor([0.0, 1.0])
    noise = paired_drop_noise("accuracy", "classification", teacher_out, student_out, y)
    assert noise is not None and 0.04 < noise < 0.05
    one_off = candidate("student", "student", "fp32", 0.95 - 1 / 23, 40_000, 1.0)
    loose = verdict(one_off, TEACHER, [one_off], metric="accuracy", tolerance=0.01, batch=64, chance=0.34,
                    labelled=True, noise=noise, eval_rows=23)
    assert loose["verdict"] == "ship_with_caution"
    [r] = loose["reasons"]
    assert r["code"] == "metric_drop_uncertain" and "23 eval rows" in r["message"] and "larger eval set" in r["message"]
    assert judge(one_off)["verdict"] == "do_not_ship"  # without the noise: the raw drop decides


def test_an_evident_drop_is_refused_and_a_split_from_the_upload_says_the_teacher_may_have_seen_it() -> None:
    n = 400
    y = torch.zeros(n, dtype=torch.long)
    teacher_out = torch.tensor([[1.0, 0.0]] * n)
    student_out = teacher_out.clone()
    student_out[:40] = torch.tensor([0.0, 1.0])  # 10 points down on 400 rows: no noise explains it
    noise = paired_drop_noise("accuracy", "classification", teacher_out, student_out, y)
    worse = candidate("student", "student", "fp32", 0.85, 40_000, 1.0)
    out = verdict(worse, TEACHER, [worse], metric="accuracy", tolerance=0.01, batch=64, chance=0.34, labelled=True,
                  noise=noise, eval_rows=n, eval_given=False)
    assert out["verdict"] == "do_not_ship" and [r["code"] for r in out["reasons"]] == ["metric_drop_large"]
    assert "held out from the uploaded data" in out["reasons"][0]["message"]
    assert "eval dataset" in out["reasons"][0]["message"]


def test_the_paired_noise_of_a_regression_drop_is_relative_to_the_teachers_error() -> None:
    y = torch.zeros(100, 1)
    teacher_out = torch.ones(100, 1)  # every squared error 1
    student_out = torch.ones(100, 1)
    student_out[:50] = 2.0  # errors 4 on half: mean drop 1.5 = 150 % of the teacher's MSE
    noise = paired_drop_noise("mse", "regression", teacher_out, student_out, y)
    assert noise is not None and abs(noise - 3.0 * 0.5025 / 10) < 1e-3  # std of {0, 3} halves / sqrt(100)
    assert paired_drop_noise("macro_f1", "classification", teacher_out, student_out, y) is None
    assert paired_drop_noise("mse", "regression", teacher_out, student_out, None) is None


def test_an_int8_form_that_loses_the_metric_is_named_even_when_fp32_is_delivered() -> None:
    fp32 = candidate("student", "student", "fp32", 0.95, 40_000, 1.0)
    int8 = candidate("int8", "student", "int8", 0.62, 12_000, 0.5)
    out = verdict(fp32, TEACHER, [fp32, int8], metric="accuracy", tolerance=0.01, batch=64, chance=0.34,
                  labelled=True)
    [r] = [r for r in out["reasons"] if r["code"] == "int8_metric_drop"]
    assert r["severity"] == "ship_with_caution" and "0.62" in r["message"] and "fp32 was delivered" in r["message"]


def test_delivery_between_twins_within_timing_noise_takes_the_better_metric() -> None:
    """A labels-only baseline 0.6 points worse than its twin student was delivered for being 2 % faster."""
    from worker.compression.measure.verdict import choose

    student = candidate("student", "student", "fp32", 0.9777, 40_000, 0.0350)
    baseline = candidate("baseline", "baseline", "fp32", 0.9721, 40_000, 0.0342)
    int8 = candidate("int8", "student", "int8", 0.9770, 12_000, 0.0200)
    chosen, why = choose([student, baseline], "accuracy", 0.01, 64)
    assert chosen is student and "tie" in why
    assert choose([student, baseline, int8], "accuracy", 0.01, 64)[0] is int8  # clearly faster still wins
