"""Successive-halving rules of the search (pure functions): who is hopeless, who goes on."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ..measure.pareto import nondominated_ranks
from .goal import Goal

MEET_KEEP = 2
"""After a rung, at most this many of the candidates already meeting the bound go on (the cheapest)."""
HOPELESS_MARGIN = 0.01
"""Relative slack below the metric bound before a candidate counts as hopeless (eval-set noise)."""
OPTIMISM = 2.0


def extrapolate(before: tuple[float, float | None], after: tuple[float, float | None], final_step: float,
                higher: bool, optimism: float = OPTIMISM) -> float | None:
    """The metric a candidate might reach at ``final_step``: ``optimism`` × the log-linear trend from
    ``before`` to ``after`` ((cumulative step, metric): the ends of two rungs, or step 1 for the
    untrained student and the end of the first rung), carried on from ``after``; never worse than it."""
    (s1, m1), (s2, m2) = before, after
    if m2 is None or not math.isfinite(m2):
        return None
    if m1 is None or not math.isfinite(m1) or s2 <= max(s1, 1.0) or final_step <= s2:
        return m2
    slope = (m2 - m1) / math.log(s2 / max(s1, 1.0))
    gain = max(0.0, slope if higher else -slope) * math.log(final_step / s2) * optimism
    return m2 + gain if higher else m2 - gain


def hopeless(predicted: float | None, goal: Goal) -> bool:
    if predicted is None:
        return False
    margin = HOPELESS_MARGIN * max(abs(goal.bound), 1e-12)
    return predicted < goal.bound - margin if goal.higher_is_better else predicted > goal.bound + margin


def keep_order(entries: Sequence[dict[str, Any]], goal: Goal, quota: int, meet_keep: int = MEET_KEEP
               ) -> tuple[list[int], dict[int, str]]:
    """Which of ``entries`` (dicts with metric and cost) go on to the next rung: (indices in keep
    order, {index: why} for the others).

    * of the candidates that already meet the metric bound, the ``meet_keep`` cheapest (a more
      expensive one cannot be chosen over them);
    * no candidate that does not meet it yet and costs at least as much as one that does;
    * the rest by non-dominated rank on (metric, cost), then closest to the bound first;
      ``quota`` in all.
    """
    def cost(i: int) -> float:
        c = entries[i].get("cost")
        return float("inf") if c is None else float(c)

    meeting = sorted((i for i, e in enumerate(entries) if goal.metric_ok(e.get("metric"))), key=cost)
    cheapest = cost(meeting[0]) if meeting else float("inf")
    kept = meeting[:meet_keep]
    why = {i: f"meets the bound, but {len(kept)} cheaper candidate(s) already do" for i in meeting[meet_keep:]}
    rest = [i for i in range(len(entries)) if i not in meeting]
    for i in rest:
        if cost(i) >= cheapest:
            why[i] = "a cheaper candidate already meets the bound"
    rest = [i for i in rest if i not in why]
    ranks = nondominated_ranks(entries, [("metric", goal.higher_is_better), ("cost", False)])
    sign = -1.0 if goal.higher_is_better else 1.0

    def key(i: int) -> tuple[int, float]:
        m = entries[i].get("metric")
        return ranks[i], float("inf") if m is None else sign * float(m)

    order = sorted(rest, key=key)
    room = max(0, quota - len(kept))
    kept += order[:room]
    for i in order[room:]:
        why[i] = f"halved: {len(kept)} better placed candidates went on"
    return kept, why
