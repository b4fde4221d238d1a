"""Pareto dominance over measured models (pure Python: no torch, no numpy).

A point is a mapping of objective values; ``objectives`` lists ``(key, higher_is_better)``.
``a`` dominates ``b`` when it is at least as good on every objective and strictly better on
one. Points missing an objective value (None) are never on a front and never dominate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

Objectives = Sequence[tuple[str, bool]]


def _values(point: Mapping[str, Any], objectives: Objectives) -> list[float] | None:
    out = []
    for key, _ in objectives:
        v = point.get(key)
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            return None
        out.append(float(v))
    return out


def dominates(a: Mapping[str, Any], b: Mapping[str, Any], objectives: Objectives) -> bool:
    va, vb = _values(a, objectives), _values(b, objectives)
    if va is None or vb is None:
        return False
    better = False
    for (_, higher), x, y in zip(objectives, va, vb, strict=True):
        if (x < y) if higher else (x > y):
            return False
        better |= (x > y) if higher else (x < y)
    return better


def pareto_front(points: Sequence[Mapping[str, Any]], objectives: Objectives) -> list[int]:
    """Indices of the non-dominated points, in input order. Exact duplicates all stay."""
    valid = [i for i, p in enumerate(points) if _values(p, objectives) is not None]
    return [i for i in valid if not any(dominates(points[j], points[i], objectives) for j in valid if j != i)]


def nondominated_ranks(points: Sequence[Mapping[str, Any]], objectives: Objectives) -> list[int]:
    """Rank 0 for the front, 1 for the front of the rest, ...; points missing a value get the last rank."""
    n = len(points)
    ranks = [-1] * n
    left = [i for i in range(n) if _values(points[i], objectives) is not None]
    rank = 0
    while left:
        front = [i for i in left if not any(dominates(points[j], points[i], objectives) for j in left if j != i)]
        for i in front:
            ranks[i] = rank
        left = [i for i in left if ranks[i] < 0]
        rank += 1
    return [r if r >= 0 else rank for r in ranks]
