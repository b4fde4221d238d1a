"""What every spec model shares: unknown keys are refused (a misspelt option is an error, not a no-op),
and so are NaN and infinities in number fields."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

Metric = Literal["accuracy", "macro_f1", "cosine", "mse", "mae", "agreement", "action_mae"]
"""``mae``: regression and forecasting; ``agreement`` / ``action_mae``: a policy's agreement with its teacher
(discrete: the fraction of equal argmax actions; continuous: the mean absolute action difference)."""
LOWER_IS_BETTER = ("mse", "mae", "action_mae")


class SpecModel(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
