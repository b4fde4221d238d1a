"""The verdict's rules on measured candidates (measure.verdict): what it says, and its one-line headline."""

from __future__ import annotations

from pathlib import Path

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
