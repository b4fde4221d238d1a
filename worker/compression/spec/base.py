"""What every spec model shares: unknown keys are refused (a misspelt option is an error, not a no-op),
and so are NaN and infinities in number fields."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

Metric = Literal["accuracy", "macro_f1", "cosine", "mse", "mae", "auc", "log_loss", "entity_f1"]
"""What a target names (``mae``: regression and forecasting; ``entity_f1``: token classification, NER). A
policy's agreement with its teacher
(``agreement``, ``action_mae``: `worker.compression.fields`) is reported and delivered by, but measured on
the exported graphs only, so it is no target. ``auc`` and ``log_loss``: binary classification (CTR) with
labels."""
LOWER_IS_BETTER = ("mse", "mae", "action_mae", "log_loss")


class SpecModel(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, use_attribute_docstrings=True)
    """Each field's docstring is its description in the published schema (the portal's help text)."""
