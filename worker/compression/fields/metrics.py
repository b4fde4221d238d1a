"""The fields' metrics (torch, whole eval sets)."""

from __future__ import annotations

from typing import Any

import torch

ZERO_FRACTION = 1e-6
"""MAPE skips targets whose magnitude is below this fraction of the mean magnitude (a percentage of
zero is undefined)."""


def forecast_metrics(pred: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """MAE (the target's units), MAPE and sMAPE (fractions: 0.05 is 5 %) over every forecast value."""
    pred = pred.double().reshape(len(pred), -1)
    y = y.double().reshape(pred.shape)
    err = (pred - y).abs()
    scale = y.abs().mean().item()
    usable = y.abs() > ZERO_FRACTION * max(scale, 1e-300)
    mape = (err[usable] / y.abs()[usable]).mean().item() if usable.any() else None
    denom = pred.abs() + y.abs()
    both_zero = denom == 0
    smape = torch.where(both_zero, torch.zeros_like(err), 2 * err / denom.clamp(min=1e-300)).mean().item()
    return {"mae": err.mean().item(), "mape": mape, "smape": smape}


def action_metrics(outputs: torch.Tensor, teacher: torch.Tensor, *, discrete: bool) -> dict[str, Any]:
    """Agreement with the teacher: the fraction of equal argmax actions (discrete), or the mean absolute
    difference of the actions and the spread of the teacher's (continuous)."""
    outputs, teacher = outputs.double().reshape(len(outputs), -1), teacher.double().reshape(len(teacher), -1)
    if discrete:
        return {"agreement": (outputs.argmax(-1) == teacher.argmax(-1)).double().mean().item()}
    return {"action_mae": (outputs - teacher).abs().mean().item(),
            "action_std": teacher.std(0, unbiased=False).mean().item()}
