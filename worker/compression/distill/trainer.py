"""A lean, resumable training loop shared by distillation and the labels-only baseline.

Hot-loop rules: data live on the device as preloaded tensors and batches are index
gathers; the loss is synced to the host only at log points (≈200 per run), evaluation
only at eval points, disk I/O only at checkpoints. Repeatability: the shuffle of each
epoch comes from ``(seed, epoch)`` and checkpoints hold the optimizer, scheduler and RNG
states, so a resumed run ends with the same weights as an uninterrupted one (CPU).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..errors import Cancelled, DatasetError, SpecError
from ..measure.metrics import higher_is_better
from ..spec import DistillSpec, TargetSpec
from ..types import (
    CancelFn,
    Progress,
    ProgressFn,
    TensorData,
    never_cancel,
    no_progress,
)
from .checkpoints import Checkpoints, host_copy, split_prefix

StopReason = Literal["completed", "target_reached", "no_improvement", "time_budget"]
LossFn = Callable[[dict[str, torch.Tensor], "torch.Tensor | None", torch.Tensor], torch.Tensor]
"""``loss_fn(batch_inputs, batch_y, batch_indices) -> scalar loss`` (all on the device)."""
EvaluateFn = Callable[[], "dict[str, Any] | None"]

HISTORY_POINTS = 200
"""About how many loss points a run logs (and syncs the loss for)."""


@dataclass
class TrainResult:
    history: list[dict[str, Any]]
    stopped_reason: StopReason
    best_metric: float | None
    steps: int
    seconds: float
    samples_per_s: float
    metric: str | None = None
    """The monitored eval metric (None without an evaluate function)."""
    best_step: int | None = None
    resumed_from_step: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` → CUDA when available, else CPU."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SpecError("device 'cuda' was asked for but no GPU is available")
    return torch.device(name)


def autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA, nothing on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """LR factor for 0-based ``step``: linear warm-up to 1 over ``warmup`` steps, then cosine to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Full batches plus the partial one, unless it would hold one sample (BatchNorm can't train on it)."""
    full, rest = divmod(n, batch_size)
    return full + (1 if rest > 1 or (rest == 1 and full == 0) else 0)


def target_threshold(target: TargetSpec | None) -> float | None:
    """The early-stop threshold: ``min`` for higher-is-better metrics, ``max`` for ``mse``."""
    if target is None:
        return None
    if higher_is_better(target.metric):
        if target.max is not None and target.min is None:
            raise SpecError(f"target: {target.metric} is higher-is-better; give 'min', not 'max'")
        return target.min
    if target.min is not None and target.max is None:
        raise SpecError(f"target: {target.metric} is lower-is-better; give 'max', not 'min'")
    return target.max


def _clip_grad_norm_(grads: list[torch.Tensor], max_norm: float) -> None:
    """``nn.utils.clip_grad_norm_`` (same formula) without its per-call grouping: 3-4× cheaper
    per step on CPU for small models, where the hot loop is Python-bound. No host sync."""
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    torch._foreach_mul_(grads, (max_norm / (total + 1e-6)).clamp(max=1.0))


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    digest = hashlib.blake2b(f"{seed}:{epoch}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little"))


@dataclass
class _State:
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    last_metric: float | None = None
    elapsed: float = 0.0
    loss_sum: float = 0.0
    loss_count: int = 0
    evaluated_at: int = -1
    samples_per_s: float = 0.0
    stopped: str | None = None


class _Loop:
    def __init__(
        self,
        model: nn.Module,
        extra: nn.Module | None,
        data: TensorData,
        loss_fn: LossFn,
        spec: DistillSpec,
        stage: str,
        evaluate_fn: EvaluateFn | None,
        metric: str | None,
        progress: ProgressFn,
        cancel: CancelFn,
        checkpoint_dir: Path | None,
        device: torch.device,
    ) -> None:
        n = len(data)
        if n == 0:
            raise DatasetError(f"{stage}: the training data has no samples")
        self.model, self.extra, self.loss_fn, self.spec, self.stage = model, extra, loss_fn, spec, stage
        self.evaluate_fn, self.progress, self.cancel, self.device = evaluate_fn, progress, cancel, device
        self.metric = (spec.target.metric if spec.target else metric) if evaluate_fn else None
        self.threshold = target_threshold(spec.target) if evaluate_fn else None
        self.n, self.batch_size = n, min(spec.batch_size, n)
        self.per_epoch = steps_per_epoch(n, self.batch_size)
        self.total = self.per_epoch * spec.epochs
        self.eval_every = spec.eval_every or self.per_epoch
        self.checkpoint_every = spec.checkpoint_every or self.per_epoch
        self.log_every = max(1, self.total // HISTORY_POINTS, 10 if device.type == "cuda" else 1)

        model.to(device)
        if extra is not None:
            extra.to(device)
        self.params = [p for p in model.parameters() if p.requires_grad]
        if extra is not None:
            self.params += [p for p in extra.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(
            self.params, lr=spec.lr, weight_decay=spec.weight_decay, fused=device.type == "cuda" or None
        )
        warmup = int(round(spec.warmup_ratio * self.total))
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: warmup_cosine(s, self.total, warmup)
        )
        self.inputs = {k: v.to(device) for k, v in data.inputs.items()}
        self.y = None if data.y is None else data.y.to(device)
        self.state = _State()
        self.start = time.monotonic()
        self.best_weights: dict[str, torch.Tensor] | None = None
        fingerprint = {
            "stage": stage, "samples": n, "parameters": sum(p.numel() for p in self.params),
            "spec": spec.model_dump(exclude={"device", "time_budget_s", "checkpoint_every", "baseline"}),
        }  # fmt: skip
        self.checkpoints = Checkpoints(checkpoint_dir, fingerprint) if checkpoint_dir is not None else None

    # --- checkpoints -----------------------------------------------------------------

    def _save(self) -> None:
        assert self.checkpoints is not None
        s = self.state
        tensors = host_copy(self.model.state_dict(), "model.")
        if self.extra is not None:
            tensors |= host_copy(self.extra.state_dict(), "extra.")
        if self.best_weights is not None and s.best_step != s.step:
            tensors |= host_copy(self.best_weights, "best.")
        state = {
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            "loop": asdict(s) | {"elapsed": self._elapsed()},
        }
        self.checkpoints.save(s.step, tensors, state)

    def _resume(self) -> bool:
        """Load the last checkpoint if there is one; True when it found one."""
        if self.checkpoints is None or (saved := self.checkpoints.load()) is None:
            return False
        tensors, state = saved
        self.model.load_state_dict(split_prefix(tensors, "model."))
        if self.extra is not None:
            self.extra.load_state_dict(split_prefix(tensors, "extra."))
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng_cpu"])
        if state["rng_cuda"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng_cuda"], self.device)
        self.state = _State(**state["loop"])
        best = split_prefix(tensors, "best.")
        if self.state.best_step is not None:
            self.best_weights = (
                {k: v.to(self.device) for k, v in best.items()} if best else self._clone_weights()
            )
        return True

    def _clone_weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    # --- evaluation ------------------------------------------------------------------

    def _evaluate(self, loss: float | None) -> None:
        assert self.evaluate_fn is not None
        s = self.state
        self.model.eval()
        with torch.no_grad(), autocast(self.device):
            metrics = self.evaluate_fn() or {}
        self.model.train()
        last = s.history[-1] if s.history else None
        if last is not None and last["step"] == s.step and "eval" not in last:
            entry = last  # the loss point logged at this same step
        else:
            entry = {
                "step": s.step,
                "epoch": s.step / self.per_epoch,
                "loss": loss,
                "lr": self.sched.get_last_lr()[0],
            }
            s.history.append(entry)
        entry["eval"] = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        s.evaluated_at = s.step
        if self.metric is None:
            return
        if not isinstance(metrics.get(self.metric), (int, float)):
            raise SpecError(f"the eval metric {self.metric!r} is not measured for this task")
        value = float(metrics[self.metric])
        entry["metric"] = s.last_metric = value
        better = higher_is_better(self.metric)
        if s.best is None or (value > s.best if better else value < s.best):
            s.best, s.best_step, s.bad_evals = value, s.step, 0
            self.best_weights = self._clone_weights()
        else:
            s.bad_evals += 1
        if s.stopped is not None:  # the final evaluation after a stop
            return
        if self.threshold is not None and (value >= self.threshold if better else value <= self.threshold):
            s.stopped = "target_reached"
        elif self.spec.patience is not None and s.bad_evals >= self.spec.patience:
            s.stopped = "no_improvement"

    def _log(self, loss_sum: torch.Tensor | None) -> float | None:
        """Sync the running loss (the only per-log host sync) and append a history point."""
        s = self.state
        if loss_sum is not None:
            s.loss_sum += float(loss_sum.item())
        if s.loss_count == 0:
            return None
        mean = s.loss_sum / s.loss_count
        s.history.append(
            {
                "step": s.step,
                "epoch": s.step / self.per_epoch,
                "loss": mean,
                "lr": self.sched.get_last_lr()[0],
            }
        )
        s.loss_sum, s.loss_count = 0.0, 0
        return mean

    # --- the loop --------------------------------------------------------------------

    def _elapsed(self) -> float:
        """Wall-clock seconds of this run, earlier attempts included."""
        return self.state.elapsed + time.monotonic() - self.start

    def run(self) -> TrainResult:
        resumed = self._resume()
        s = self.state
        resumed_from = s.step if resumed else None
        if not resumed:
            torch.manual_seed(self.spec.seed)
        if s.stopped is not None:  # the checkpoint of a finished run
            return self._result(resumed_from)

        self.start, start_step, overhead = time.monotonic(), s.step, 0.0
        budget = self.spec.time_budget_s
        loss_sum: torch.Tensor | None = None
        last_loss: float | None = None
        self.model.train()
        if self.extra is not None:
            self.extra.train()
        epoch0, batch0 = divmod(s.step, self.per_epoch)
        for epoch in range(epoch0, self.spec.epochs):
            perm = torch.randperm(self.n, generator=_epoch_generator(self.spec.seed, epoch)).to(self.device)
            for b in range(batch0 if epoch == epoch0 else 0, self.per_epoch):
                if self.cancel():
                    raise Cancelled(f"{self.stage} cancelled at step {s.step}")
                if budget is not None and self._elapsed() >= budget:
                    s.stopped = "time_budget"
                    break
                idx = perm[b * self.batch_size : (b + 1) * self.batch_size]
                batch = {k: v[idx] for k, v in self.inputs.items()}
                with autocast(self.device):
                    loss = self.loss_fn(batch, None if self.y is None else self.y[idx], idx)
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                if self.spec.grad_clip is not None:
                    _clip_grad_norm_([p.grad for p in self.params if p.grad is not None], self.spec.grad_clip)
                self.opt.step()
                self.sched.step()
                s.step += 1
                loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
                s.loss_count += 1
                at_eval = self.evaluate_fn is not None and (
                    s.step % self.eval_every == 0 or s.step == self.total
                )
                if at_eval or s.step % self.log_every == 0 or s.step == self.total:
                    last_loss, loss_sum = self._log(loss_sum), None
                t_io = time.monotonic()
                if at_eval:
                    self._evaluate(last_loss)
                if (
                    self.checkpoints is not None
                    and s.step % self.checkpoint_every == 0
                    and s.stopped is None
                    and s.step < self.total  # the final checkpoint follows the loop
                ):
                    if loss_sum is not None:  # fold the running loss into the saved state
                        s.loss_sum, loss_sum = s.loss_sum + float(loss_sum.item()), None
                    self._save()
                overhead += time.monotonic() - t_io
                eta = (time.monotonic() - self.start) / (s.step - start_step) * (self.total - s.step)
                if budget is not None:
                    eta = min(eta, max(0.0, budget - self._elapsed()))
                self.progress(Progress(self.stage, s.step, self.total, last_loss, s.last_metric, eta))
                if s.stopped is not None:
                    break
            if s.stopped is not None:
                break

        if s.loss_count:
            self._log(loss_sum)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        train_seconds = time.monotonic() - self.start - overhead
        s.samples_per_s = (
            (s.step - start_step) * self.batch_size / train_seconds if train_seconds > 0 else 0.0
        )
        if s.stopped is None:
            s.stopped = "completed"
        if self.evaluate_fn is not None and s.evaluated_at != s.step:
            self._evaluate(None)
        if self.best_weights is not None and s.best_step != s.step and self.spec.keep == "best":
            self.model.load_state_dict(self.best_weights)
        if self.checkpoints is not None:  # a finished checkpoint: a rerun returns at once
            self._save()
        s.elapsed = self._elapsed()
        return self._result(resumed_from)

    def _result(self, resumed_from: int | None) -> TrainResult:
        s = self.state
        return TrainResult(
            history=s.history,
            stopped_reason=s.stopped,  # type: ignore[arg-type]
            best_metric=s.best,
            steps=s.step,
            seconds=s.elapsed,
            samples_per_s=s.samples_per_s,
            metric=self.metric,
            best_step=s.best_step,
            resumed_from_step=resumed_from,
        )


def train(
    model: nn.Module,
    extra: nn.Module | None,
    data: TensorData,
    loss_fn: LossFn,
    spec: DistillSpec,
    *,
    stage: str,
    evaluate_fn: EvaluateFn | None = None,
    metric: str | None = None,
    progress: ProgressFn = no_progress,
    cancel: CancelFn = never_cancel,
    checkpoint_dir: Path | None = None,
    device: str | torch.device | None = None,
) -> TrainResult:
    """Train ``model`` (and the auxiliary ``extra`` module, e.g. feature projections) on ``data``.

    AdamW, warm-up then cosine LR, optional gradient clipping. ``evaluate_fn`` (called in
    eval mode under no_grad every epoch or ``spec.eval_every`` steps) returns metrics;
    ``metric`` (or ``spec.target.metric``) is monitored for the target, patience and the
    best weights, which the model holds on return. ``cancel`` is checked before every step
    (raises :class:`Cancelled`); ``checkpoint_dir`` makes the run resumable.
    """
    dev = resolve_device(device if device is not None else spec.device)
    loop = _Loop(
        model, extra, data, loss_fn, spec, stage, evaluate_fn, metric, progress, cancel, checkpoint_dir, dev
    )
    return loop.run()
