"""Fields of use layered on the engine's tasks: what a job's data is *for* changes how its models are
judged, not how they are trained.

* ``forecasting`` (`io.data_series`): a regression on windows of a time series; judged by MAE
  (MAPE and sMAPE beside it), the verdict accepting a student whose MAE is within +5 % of the teacher's.
* ``policy`` (`policy`): a classification (discrete actions) or regression (continuous actions) on
  observation vectors; judged by agreement with the teacher (the fraction of argmax matches, or the
  mean absolute action difference), plus the mean return in a classic-control environment.
* ``ctr`` (`io.data_vocab`): a binary classification of clicks on a table (usually with categorical
  columns); judged by AUC (log-loss beside it, both `measure.metrics.click_metrics`), the verdict accepting
  a student whose AUC is within 0.005 of the teacher's; distillation monitors AUC too.

The field rides in the data's ``meta["field"]``, set by the loaders from ``DataSpec.task``; everything
here is a pure function of that meta and tensors, so the meter, the delivery and the report ask the
same questions without knowing about each other.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .metrics import action_metrics, forecast_metrics

FORECAST_TOLERANCE = 0.05
"""The student's MAE may be up to 5 % above the teacher's."""
AGREEMENT_TOLERANCE = 0.02
"""2 points of argmax agreement with the teacher."""
CTR_TOLERANCE = 0.005
"""The student's AUC may be up to 0.005 below the teacher's."""
ACTION_TOLERANCE = 0.10
"""Mean absolute action difference up to 10 % of the spread (std) of the teacher's actions."""


def field_of(meta: Mapping[str, Any]) -> str | None:
    field = meta.get("field")
    return str(field) if field else None


def primary_metric(task: str, meta: Mapping[str, Any], default: str) -> str:
    """The metric a job of this field leads with and delivers by (``default``: the task's)."""
    field = field_of(meta)
    if field == "forecasting":
        return "mae"
    if field == "policy":
        return "agreement" if meta.get("action_space") == "discrete" else "action_mae"
    if field == "ctr":
        return "auc"
    return default


def monitored_metric(task: str, meta: Mapping[str, Any], default: str) -> str:
    """The metric distillation watches (early stop, best checkpoint): the field's when the task's metrics
    include it (a CTR job's AUC), else ``default``."""
    return "auc" if task == "classification" and field_of(meta) == "ctr" else default


def extra_metrics(meta: Mapping[str, Any], outputs: torch.Tensor, y: torch.Tensor | None,
                  teacher: torch.Tensor | None) -> dict[str, Any]:
    """The field's metrics of one model's eval outputs, beside the task's."""
    field = field_of(meta)
    if field == "forecasting" and y is not None:
        return forecast_metrics(outputs, y)
    if field == "policy" and teacher is not None:
        return action_metrics(outputs, teacher, discrete=meta.get("action_space") == "discrete")
    return {}


def tolerance(meta: Mapping[str, Any], metric: str, teacher_metrics: Mapping[str, Any]) -> float | None:
    """The field's default verdict tolerance for ``metric`` (None: the metric's own default)."""
    field = field_of(meta)
    if field == "forecasting" and metric == "mae":
        return FORECAST_TOLERANCE
    if field == "policy" and metric == "agreement":
        return AGREEMENT_TOLERANCE
    if field == "ctr" and metric == "auc":
        return CTR_TOLERANCE
    if field == "policy" and metric == "action_mae":
        spread = teacher_metrics.get("action_std")
        return ACTION_TOLERANCE * float(spread) if isinstance(spread, (int, float)) and spread > 0 else None
    return None


def describe_tolerance(meta: Mapping[str, Any], metric: str, value: float) -> str:
    """The tolerance in words, for the delivery section."""
    if field_of(meta) == "forecasting" and metric == "mae":
        return f"MAE within +{value:.0%} of the teacher's"
    if metric == "agreement":
        return f"agreement with the teacher within {value:.0%} of the best"
    return f"{metric} within {value:.4g} of the best"
