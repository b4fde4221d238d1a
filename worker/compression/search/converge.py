"""Training the ladder to convergence, cheapest first, until a candidate meets the metric bound.

Why: successive halving trains every candidate to shared fractions of one fixed epoch count, so on a
small data set a narrow student stops after a few hundred steps, short of what it can reach, and
loses to a wider one (issue 18: a 64-512 MLP chosen where a plainly trained 64-64 did as well).
Here each candidate trains to its own plateau:

* **Length from its step cost and the budget.** A probe times a few optimizer steps of the
  student; it may train for ``MIN_STEPS`` optimizer steps at least (and ``distillation.epochs``),
  at most ``MAX_EPOCHS``, and no longer than its share of the training time left.
* **Its own schedule**: warm-up then cosine over that planned length (the trainer's), evaluated
  ``EVALS_PER_RUN`` times; it stops on a plateau (``PATIENCE`` evaluations without a better eval
  metric) and keeps its last weights (``DistillSpec.keep``), judged by its plateau's level
  (``settled_metric``), not by its luckiest evaluation.
* **KD settings tried on the cheapest rung**: temperature, α and the learning rate at ``KD_GRID``
  values (short runs of the cheapest candidate); the best on the eval split is used for every
  candidate.
* **Cheapest first, galloping**: candidates in order of their multiply-accumulates per sample
  (lazy preparation: each is exported and timed only when reached, ``prepare.ready``; one over a
  cap then leaves the ladder), else of their measured fp32 latency at the goal's batch size (then
  parameters). While none meets the bound the search goes up the ladder at
  offsets 1, 2, 4, ...; once one meets, the skipped candidates between the last miss and it are
  tried, cheapest first, until one meets. Candidates costlier than the cheapest that meets
  are not trained (they cannot be chosen over it in fp32; int8 twins are measured for finalists).

A candidate meets the bound when its plateau level reaches it less ``SearchOptions.confidence_z``
standard errors of an accuracy or mse (``with_margin``): on a 22- or 270-sample eval split, a student that
just reaches the bound there often falls short on unseen data.

Finalists: every trained candidate that meets the bound (normally one), else the best by the metric
and the cheapest within ``confidence_z`` standard errors of it (``noise_band``; the choice treats
them as tied and takes the faster); the teacher when it was kept in ``prepare``.
"""

from __future__ import annotations

import copy
import math
import time

import torch
import torch.nn.functional as F

from ..distill.trainer import steps_per_epoch
from ..spec import DistillSpec
from ..types import Progress
from .prepare import ready
from .rungs import measure_estimate, threads_for, torch_metric
from .state import Entry, SearchState

MIN_STEPS = 3000
"""Optimizer steps a candidate may take at least (when the budget allows): a plain KD script's 150
epochs of 1,347 digits at batch 32 are 6,300; plateaus usually come well before."""
MAX_EPOCHS = 400
EVALS_PER_RUN = 40
PATIENCE = 20
"""Evaluations without a better eval metric before a candidate counts as converged."""
KD_GRID: tuple[dict[str, float], ...] = ({}, {"temperature": 2.0}, {"alpha": 0.9}, {"lr_scale": 3.0})
"""Settings tried on the cheapest candidate, each a change to the spec's: temperature, α (the KD
loss's weight) and the learning rate (× ``lr_scale``). Temperature only for classification."""
KD_MIN_SHARE_S = 2.0
"""No KD trials when the cheapest candidate's share of the budget is under this many seconds."""
KD_TRIAL_SHARE = 0.34
"""A KD trial trains for this share of the cheapest candidate's planned steps."""
PROBE_STEPS = 8
COST_BUCKET = 1.1
SETTLE_TOP = 3
STALL_TRIES = 2
"""Climbing stops, none meeting by the margin, after this many costlier candidates in a row that do
not beat the best so far by more than the noise while the best meets the bound itself
(``stalled``): on a 27-sample eval split every rung of a wine ladder scored 25/27, and climbing all
of it cost 16x the plain script's wall time for the same choice."""


def step_seconds(module: torch.nn.Module, batch: dict[str, torch.Tensor], out_dim: int | None = None) -> float:
    """Seconds of one optimizer step (forward, backward, AdamW) of ``module`` on ``batch``, measured
    on a copy so the candidate's weights are untouched."""
    probe = copy.deepcopy(module).train()
    opt = torch.optim.AdamW(probe.parameters(), lr=1e-6)
    times = []
    for i in range(PROBE_STEPS + 1):
        t0 = time.perf_counter()
        out = probe(**batch)
        out = out if isinstance(out, torch.Tensor) else out[0]
        loss = F.mse_loss(out.float(), torch.zeros_like(out, dtype=torch.float32))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i:  # the first step pays for allocation
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def planned_epochs(per_epoch: int, step_s: float, share_s: float, base_epochs: int) -> int:
    """Epochs for one candidate: enough for ``MIN_STEPS`` steps (at least ``base_epochs``), at most
    ``MAX_EPOCHS``, and within ``share_s`` seconds at ``step_s`` per step (x1.5 for evaluations)."""
    want = max(base_epochs, math.ceil(MIN_STEPS / max(1, per_epoch)))
    fits = int(share_s / max(step_s * 1.5 * per_epoch, 1e-9))
    return max(1, min(want, MAX_EPOCHS, fits))


def gallop_order(costs: list[float], met: list[bool | None]) -> int | None:
    """The index of the next candidate to train (``costs`` ascending; ``met[i]``: None untried, else
    whether it met the bound), or None when the search is done (module doc): up the ladder at
    offsets 1, 2, 4, ... from the cheapest while nothing meets (by position, not by the measured
    cost: sub-0.1 ms timings are too noisy to jump by), capped at the last; then back down, cheapest
    first, through the untried candidates between the last miss and the cheapest that meets."""
    tried = [i for i, m in enumerate(met) if m is not None]
    meeting = [i for i in tried if met[i]]
    if meeting:
        first = min(meeting)
        misses = [i for i in tried if not met[i] and i < first]
        lo = max(misses) if misses else -1
        between = [i for i in range(lo + 1, first) if met[i] is None and costs[i] <= costs[first]]
        return between[0] if between else None
    if not tried:
        return 0 if met else None
    last = max(tried)
    if last >= len(met) - 1:
        return None
    return min(len(met) - 1, last + 2 ** (len(tried) - 1))


def stalled(s: SearchState, values: list[float | None]) -> bool:
    """Whether the climb has stalled (``STALL_TRIES``): ``values`` are the metrics of the candidates
    trained so far, in training order, none meeting the bound by the margin."""
    if len(values) <= STALL_TRIES or any(v is None for v in values):
        return False
    sign = 1.0 if s.goal.higher_is_better else -1.0
    known = [float(v) for v in values if v is not None]
    head, tail = known[:-STALL_TRIES], known[-STALL_TRIES:]
    best = max(head, key=lambda v: sign * v)
    noise = tolerance(s, best)
    return s.goal.metric_ok(best) and all(sign * (v - best) <= noise for v in tail)


def tries_left(costs: list[float], met: list[bool | None], i: int) -> int:
    """How many candidates the gallop trains from ``i`` on (``i`` included) if every one misses: the
    training time left is shared by them. While none has met that is every offset up to the top of
    the ladder: an even share, not a third of what is left each, or the wide students near the top,
    the likeliest to meet, got a few percent of the budget and the rest went unused (issue 18).
    Going back down, at most 3 (the first usually meets)."""
    trial = list(met)
    trial[i] = False
    n = 1
    while (j := gallop_order(costs, trial)) is not None:
        trial[j] = False
        n += 1
    return n if not any(met) else min(3, n)


def cost_key(e: Entry) -> tuple[float, int]:
    """Cheapest first: multiply-accumulates per sample when counted (lazy preparation), else fp32
    latency in ``COST_BUCKET`` steps (sub-0.1 ms timings of tiny graphs differ by noise); then
    parameters."""
    if e.macs is not None:
        return float(e.macs), e.cand.num_parameters
    if e.cost_ms is None or e.cost_ms <= 0:
        return float("inf"), e.cand.num_parameters
    return float(math.floor(math.log(e.cost_ms) / math.log(COST_BUCKET))), e.cand.num_parameters


def settled_metric(history: list[dict], higher: bool, final: float | None) -> float | None:
    """The level a run settled at: the mean of its last ``SETTLE_TOP`` evaluations (the final weights'
    among them), never better than ``final``. The best single evaluation of forty on a small eval
    split is an optimistic pick; the plateau's level is what the returned weights can be relied on
    to reach."""
    values = [float(h["metric"]) for h in history if isinstance(h.get("metric"), (int, float))][-SETTLE_TOP:]
    if not values or final is None:
        return final
    mean = sum(values) / len(values)
    return min(mean, final) if higher else max(mean, final)


def with_margin(value: float | None, metric: str, n: int, z: float) -> float | None:
    """``value`` made worse by ``z`` standard errors of its estimate on ``n`` samples: an accuracy (a
    proportion, add-one smoothed so a perfect score still has an error bar) less them, an mse
    plus them (``mse·sqrt(2/n)``, the mean of n squared Gaussian errors); other metrics as they are.
    A candidate "meets" the bound only by this margin: on a 270-sample eval split a digits student
    at exactly the bound scored 1.5 points lower on unseen data, and trying many candidates makes a
    lucky pass likelier still (a friedman1 mse 5 % under the bound on 300 samples was 9 % over it
    on unseen data)."""
    if value is None or n <= 0 or z <= 0:
        return value
    if metric == "mse":
        return value + z * abs(value) * math.sqrt(2.0 / n)
    if metric != "accuracy":
        return value
    p = (min(max(value, 0.0), 1.0) * n + 1) / (n + 2)  # a bound may be out of range (min 1.01: unreachable)
    return value - z * math.sqrt(p * (1 - p) / n)


def tolerance(s: SearchState, value: float | None) -> float:
    """``confidence_z`` standard errors of an accuracy or mse near ``value`` on the eval split (0 for
    other metrics): differences within it are noise."""
    worse = with_margin(value, s.goal.metric, len(s.evald), s.options.confidence_z)
    return 0.0 if value is None or worse is None else abs(value - worse)


def noise_band(s: SearchState, ranked: list[Entry]) -> list[Entry]:
    """Of ``ranked`` (trained, best metric first), those within ``tolerance`` of the best, cheapest first;
    only those that meet the bound (without the margin) when the best does."""
    if not ranked or ranked[0].metric is None:
        return []
    best = ranked[0].metric
    tol = tolerance(s, best)
    close = [e for e in ranked if e.metric is not None and abs(e.metric - best) <= tol
             and (s.goal.metric_ok(e.metric) or not s.goal.metric_ok(best))]
    return sorted(close, key=cost_key)


def train_converge(s: SearchState, entries: list[Entry]) -> None:
    t0 = time.monotonic()
    base = s.spec.distillation
    batch = min(base.batch_size, len(s.train))
    per_epoch = steps_per_epoch(len(s.train), batch)
    active = sorted((e for e in entries if e.status == "active"), key=cost_key)
    sample = {k: v[:batch] for k, v in s.train.inputs.items()}
    info: dict = {"rung": 1, "epochs": None, "entered": [e.cand.name for e in active], "dropped": [],
                  "order": [], "kd": {}}
    s.rungs.append(info)
    kd: dict[str, float] = {}
    met: list[bool | None] = [None] * len(active)
    costs = [cost_key(e)[0] for e in active]
    k = 0
    while True:
        i = gallop_order(costs, met)
        if i is None:
            break
        e = active[i]
        reserve = _reserve(s, [x for x, m in zip(active, met) if m is not None] + [e])
        left = s.clock.left() - reserve
        if left <= 0 and any(m is not None for m in met):
            s.stopped = s.stopped or "training"
            break
        if e.cost_ms is None and e.fp32_size is None and not ready(s, e):  # lazily prepared: over a cap
            info["dropped"].append(e.cand.name)
            del active[i], met[i], costs[i]
            continue
        k += 1
        share = max(left, 0.5) / tries_left(costs, met, i)
        assert e.student is not None
        with threads_for(e.cand.num_parameters, s.device):
            step_s = step_seconds(e.student.module, sample)
        epochs = planned_epochs(per_epoch, step_s, share, base.epochs)
        if k == 1 and share >= KD_MIN_SHARE_S:  # trials only when the budget leaves room for them
            kd = _pick_kd(s, e, epochs, per_epoch, share * KD_TRIAL_SHARE, info)
        _fit(s, e, epochs, per_epoch, share, kd, k)
        settled = settled_metric(e.history, s.goal.higher_is_better, e.metric)
        met[i] = s.goal.metric_ok(with_margin(settled, s.goal.metric, len(s.evald), s.options.confidence_z))
        info["order"].append({"name": e.cand.name, "epochs": round(e.epochs, 2), "planned_epochs": epochs,
                              "metric": e.metric, "met": met[i], "step_ms": round(step_s * 1000, 4),
                              "train_s": round(e.train_s, 3)})
        if not any(met) and stalled(s, [o["metric"] for o in info["order"]]):
            info["stalled"] = True
            break
    trained = [e for e, m in zip(active, met) if m is not None]
    if trained and s.clock.left() - _reserve(s, trained) <= 0:
        s.stopped = s.stopped or "training"  # the training time the budget allows is used up
    meeting = [e for e, m in zip(active, met) if m]
    if meeting:
        finalists = meeting[:s.options.min_keep]
    else:
        sign = -1.0 if s.goal.higher_is_better else 1.0
        finalists = sorted((e for e in trained if e.metric is not None), key=lambda e: sign * e.metric)
        band = noise_band(s, finalists)
        finalists = finalists[:s.options.min_keep] if len(band) < 2 else [band[0], finalists[0]]
    cheapest_meeting = meeting[0] if meeting else None
    for e, m in zip(active, met):
        if e in finalists:
            e.status = "finalist"
            if e.cut_by_budget:
                e.reason = "training stopped by the time budget"
        elif m is None:
            e.status = "dropped" if cheapest_meeting is not None else "not trained"
            e.reason = (f"not trained: {cheapest_meeting.cand.name}, no costlier, meets the bound"
                        if cheapest_meeting is not None and cost_key(e) >= cost_key(cheapest_meeting)
                        else "not trained: skipped by the cheapest-first search")
            info["dropped"].append(e.cand.name)
        else:
            e.status = "dropped"
            e.reason = (f"trained to convergence: {s.goal.metric} {e.metric:.4f}, bound {s.goal.bound:.4f}"
                        + ("" if m else " (missed)") + ("; a cheaper candidate meets it" if m else ""))
            info["dropped"].append(e.cand.name)
    info["kept"] = [e.cand.name for e in finalists]
    s.phase_s["train"] = time.monotonic() - t0


def _reserve(s: SearchState, entries: list[Entry]) -> float:
    """Seconds to keep for measuring the finalists: the ``min_keep`` costliest to measure of ``entries``
    (those trained and the one about to be; the finalists come from them, not from the untrained
    top of the ladder, whose estimates held back a quarter of a 20 s budget) and the teacher's twins."""
    est = sorted((_estimate(s, e) for e in entries), reverse=True)
    return sum(est[:s.options.min_keep]) + s.teacher_estimate


def _estimate(s: SearchState, e: Entry) -> float:
    """Seconds to measure ``e`` as a finalist; before it is exported (lazy preparation) its fp32 graph
    is taken as 4 bytes a parameter, timed in the minimum time."""
    size = e.fp32_size if e.fp32_size is not None else 4 * e.cand.num_parameters
    return measure_estimate(s, size, e.cost_ms, e.timing_s, e.export_s)


def _dspec(s: SearchState, epochs: int, per_epoch: int, budget_s: float, kd: dict[str, float]) -> DistillSpec:
    base = s.spec.distillation
    total = epochs * per_epoch
    return base.model_copy(update={
        "epochs": epochs, "baseline": False, "target": None, "checkpoint_every": None,
        "eval_every": max(1, total // EVALS_PER_RUN), "patience": PATIENCE, "keep": "last",
        "time_budget_s": min(budget_s, base.time_budget_s or budget_s), **kd})


def _grid(s: SearchState) -> list[dict[str, float]]:
    """The ``KD_GRID`` settings that matter for this job, as updates to the distillation spec."""
    base = s.spec.distillation
    out: list[dict[str, float]] = []
    for change in KD_GRID:
        if "temperature" in change and s.task != "classification":
            continue
        if "alpha" in change and s.train.y is None:
            continue  # no labels: the KD loss is all there is
        update = {k: v for k, v in change.items() if k != "lr_scale"}
        if "lr_scale" in change:
            update["lr"] = min(base.lr * change["lr_scale"], 1.0)
        if update not in out:
            out.append(update)
    return out


def _pick_kd(s: SearchState, e: Entry, epochs: int, per_epoch: int, budget_s: float, info: dict) -> dict:
    """Short runs of the cheapest candidate at each ``KD_GRID`` setting; the best settled eval metric
    wins (ties keep the spec's)."""
    assert e.student is not None
    grid = _grid(s)
    if len(grid) < 2:
        return {}
    trial_epochs = max(1, round(epochs * KD_TRIAL_SHARE))
    best, best_kd = None, grid[0]
    for kd in grid:
        label = ", ".join(f"{k}={v:g}" for k, v in kd.items()) or "the spec's settings"
        module = copy.deepcopy(e.student.module)
        s.tick(0, 1, f"rung 1: KD setting {label} on {e.cand.name}")
        t0 = time.monotonic()
        with threads_for(e.cand.num_parameters, s.device):
            result = s.pipe.distil(module, spec=_dspec(s, trial_epochs, per_epoch, budget_s / len(grid), kd),
                                   workdir=s.work / "candidates" / e.cand.name / "kd", teacher_cache=s.cache,
                                   teacher_eval=s.teacher_eval, checkpoints=False)
        e.train_s += time.monotonic() - t0
        value = settled_metric(result.history["student"] or [], s.goal.higher_is_better,
                               (result.metrics["student"] or {}).get(s.goal.metric))
        info["kd"][label] = value
        if value is not None and (best is None or (value > best if s.goal.higher_is_better else value < best)):
            best, best_kd = value, kd
    info["kd"]["chosen"] = best_kd
    return best_kd


def _fit(s: SearchState, e: Entry, epochs: int, per_epoch: int, budget_s: float, kd: dict, k: int) -> None:
    assert e.student is not None
    label = f"rung {k}: training {e.cand.name} to convergence (≤ {epochs} epochs)"

    def inner(p: Progress) -> None:
        s.tick(0, 1, f"{label}, step {p.step}/{p.total}", loss=p.loss, metric=p.metric)

    s.tick(0, 1, label)
    e.initial_metric = torch_metric(s, e.student.module)
    e.curve.append({"rung": 0, "epochs": 0.0, "metric": e.initial_metric})
    t0 = time.monotonic()
    with threads_for(e.cand.num_parameters, s.device):
        result = s.pipe.distil(e.student.module, spec=_dspec(s, epochs, per_epoch, budget_s, kd),
                               workdir=s.work / "candidates" / e.cand.name / "converge", progress=inner,
                               teacher_cache=s.cache, teacher_eval=s.teacher_eval, checkpoints=False)
    e.train_s += time.monotonic() - t0
    run = result.train["student"]
    e.history.extend(dict(h) for h in (result.history["student"] or []))
    e.steps = int(run["steps"])
    e.epochs = e.steps / per_epoch
    e.rung = 0
    e.metric = (result.metrics["student"] or {}).get(s.goal.metric)
    e.predicted = e.metric
    e.curve.append({"rung": 1, "epochs": round(e.epochs, 3), "metric": e.metric, "train_s": round(e.train_s, 3),
                    "stopped": run["stopped_reason"], "planned_epochs": epochs, **kd})
    if run["stopped_reason"] == "time_budget":  # its share of the budget ran out before a plateau
        e.cut_by_budget = True
        s.stopped = s.stopped or f"training {e.cand.name}"
