"""Successive halving: rungs train the active candidates (cheapest first) through the pipeline's
distil stage to growing fractions of ``distillation.epochs``; after each rung but the last the
hopeless stop and at most ``ceil(n / eta)`` go on (``halving``). Training time is what the budget
leaves after reserving the measurement of the finalists."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator

import torch

from ..distill.trainer import steps_per_epoch
from ..types import Progress, trim_padding
from .halving import extrapolate, hopeless, keep_order
from .state import Entry, SearchState

QUANT_S = (0.5, 20e6)
"""Time budgeting: quantizing an ONNX graph takes about 0.5 s plus a second per 20 MB."""
EVAL_BATCH = 256
SMALL_STUDENT = 100_000
"""Students with fewer parameters train on one torch thread: their ops are too small to split, and
with two threads on a busy 2-core machine a 16-unit MLP trained at 855 samples/s against 28,600
with one (each tiny op waited for the other thread)."""


@contextlib.contextmanager
def threads_for(parameters: int, device: torch.device) -> Iterator[None]:
    """One torch thread while a small student trains on the CPU (``SMALL_STUDENT``), the caller's after."""
    before = torch.get_num_threads()
    single = device.type == "cpu" and parameters < SMALL_STUDENT and before > 1
    if single:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if single:
            torch.set_num_threads(before)


def measure_estimate(s: SearchState, size: int | None, cost_ms: float | None, timing_s: float, export_s: float,
                     fp32: bool = True) -> float:
    """Seconds to measure one finalist: export, quantize, score and time its graphs (int8 twins only
    when ``fp32`` is False: the teacher's fp32 graph is measured first thing)."""
    n_recipes = len(s.recipes)
    batches = math.ceil(len(s.evald) / s.goal.latency_batch)
    score_s = (cost_ms or 0.0) / 1000 * batches
    time_s = max(timing_s, s.options.min_timed_s) * len(s.pipe.meter.batches) * s.options.rounds
    quant_s = QUANT_S[0] + (size or 0) / QUANT_S[1]
    return export_s + (n_recipes + fp32) * (score_s + time_s) + n_recipes * quant_s


def train_rungs(s: SearchState, entries: list[Entry]) -> None:
    t0 = time.monotonic()
    base = s.spec.distillation
    epochs = base.epochs
    targets = sorted({max(1, round(f * epochs)) for f in s.options.rung_fractions if f > 0} | {epochs})
    targets = [t for t in targets if t <= epochs]
    per_epoch = steps_per_epoch(len(s.train), min(base.batch_size, len(s.train)))
    final_step = per_epoch * epochs
    active = sorted((e for e in entries if e.status == "active"),
                    key=lambda e: (e.cost_ms if e.cost_ms is not None else float("inf"), e.cand.num_parameters))
    done_epochs = 0
    quota_last = max(s.options.min_keep, math.ceil(len(active) / s.options.eta ** (len(targets) - 1)))
    for r, target in enumerate(targets):
        rung_epochs = target - done_epochs
        info = {"rung": r + 1, "epochs": target, "entered": [e.cand.name for e in active], "dropped": []}
        s.rungs.append(info)
        est = sorted((measure_estimate(s, e.fp32_size, e.cost_ms, e.timing_s, e.export_s) for e in active),
                     reverse=True)
        reserve = sum(est[:quota_last]) + s.teacher_estimate
        for i, e in enumerate(active):
            left = s.clock.left() - reserve
            trained_any = any(x.rung >= 0 for x in entries)
            if left <= 0 and (trained_any or i > 0):
                s.stopped = s.stopped or f"training, rung {r + 1}"
                if e.rung < r:
                    e.cut_by_budget = True
                continue
            _train(s, e, r, rung_epochs, max(left, 0.5), i, len(active), len(targets), final_step)
        if s.stopped:
            break
        done_epochs = target
        if r == len(targets) - 1:
            break
        survivors = []
        for e in active:
            if hopeless(e.predicted, s.goal):
                e.status = "dropped"
                e.reason = (f"hopeless after rung {r + 1}: {s.goal.metric} {e.metric:.4f}, at most "
                            f"{e.predicted:.4f} expected after full training, bound {s.goal.bound:.4f}")
                info["dropped"].append(e.cand.name)
            else:
                survivors.append(e)
        quota = max(s.options.min_keep, math.ceil(len(active) / s.options.eta))
        points = [{"metric": e.metric, "cost": e.cost_ms} for e in survivors]
        keep, why = keep_order(points, s.goal, quota)
        kept = [survivors[i] for i in sorted(keep)]
        for i, text in why.items():
            e = survivors[i]
            e.status = "dropped"
            e.reason = (f"after rung {r + 1} ({s.goal.metric} {e.metric:.4f}, fp32 {e.cost_ms:.4g} ms): "
                        f"{text}")
            info["dropped"].append(e.cand.name)
        info["kept"] = [e.cand.name for e in kept]
        active = kept
    for e in entries:
        if e.status == "active":
            e.status = "finalist"
            if e.rung < 0:
                e.status, e.reason = "not trained", "the time budget ran out before its first rung"
            elif e.cut_by_budget or e.rung < len(targets) - 1:
                e.reason = f"training stopped by the time budget after rung {e.rung + 1}"
    s.phase_s["train"] = time.monotonic() - t0


def _train(s: SearchState, e: Entry, r: int, rung_epochs: int, budget_s: float, i: int, n: int, n_rungs: int,
           final_step: int) -> None:
    assert e.student is not None
    base = s.spec.distillation
    per_epoch = steps_per_epoch(len(s.train), min(base.batch_size, len(s.train)))
    dspec = base.model_copy(update={
        "epochs": rung_epochs, "baseline": False, "target": None, "patience": None, "checkpoint_every": None,
        "time_budget_s": min(budget_s, base.time_budget_s or budget_s)})
    label = f"rung {r + 1}/{n_rungs}: training {e.cand.name} ({i + 1}/{n})"

    def inner(p: Progress) -> None:
        s.tick(i, n, f"{label}, step {p.step}/{p.total}", loss=p.loss, metric=p.metric)

    s.tick(i, n, label)
    if r == 0:
        e.initial_metric = torch_metric(s, e.student.module)
        e.curve.append({"rung": 0, "epochs": 0.0, "metric": e.initial_metric})
    before = (max(e.steps, 1), e.initial_metric if r == 0 else e.metric)
    t0 = time.monotonic()
    with threads_for(e.cand.num_parameters, s.device):
        result = s.pipe.distil(e.student.module, spec=dspec,
                               workdir=s.work / "candidates" / e.cand.name / f"rung{r + 1}", progress=inner,
                               teacher_cache=s.cache, teacher_eval=s.teacher_eval, checkpoints=False)
    e.train_s += time.monotonic() - t0
    run = result.train["student"]
    history = result.history["student"] or []
    for h in history:
        h = dict(h)
        h["step"] = e.steps + h["step"]
        e.history.append(h)
    e.steps += int(run["steps"])
    e.epochs = e.steps / per_epoch
    e.rung = r
    e.metric = (result.metrics["student"] or {}).get(s.goal.metric)
    e.predicted = extrapolate(before, (e.steps, e.metric), final_step, s.goal.higher_is_better)
    e.curve.append({"rung": r + 1, "epochs": round(e.epochs, 3), "metric": e.metric, "predicted": e.predicted,
                    "train_s": round(e.train_s, 3), "stopped": run["stopped_reason"]})
    if run["stopped_reason"] == "time_budget":  # the budget cut this rung: no time for more training
        e.cut_by_budget = True
        s.stopped = s.stopped or f"training, rung {r + 1}"


@torch.no_grad()
def torch_metric(s: SearchState, module: torch.nn.Module) -> float | None:
    """The goal metric of a torch model on the eval split (the untrained student, before rung 1)."""
    was_training = module.training
    module.eval()
    tokens = s.evald.input_kind == "tokens"
    n = len(s.evald)
    outs = []
    for lo in range(0, n, EVAL_BATCH):
        batch = {k: v[lo:lo + EVAL_BATCH] for k, v in s.evald.inputs.items()}
        outs.append(module(**(trim_padding(batch) if tokens else batch)).float().cpu())
    module.train(was_training)
    return s.pipe.meter.score(torch.cat(outs)).get(s.goal.metric)
