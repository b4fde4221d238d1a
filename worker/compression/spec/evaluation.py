"""What is measured (`EvaluationSpec`) and what a searched model must meet (`SearchTargets`)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

MAX_LATENCY_BATCH = 4096

from .base import LOWER_IS_BETTER, Metric, SpecModel


class EvaluationSpec(SpecModel):
    latency_batch_sizes: list[Annotated[int, Field(ge=1, le=MAX_LATENCY_BATCH)]] = Field(
        default_factory=lambda: [1, 64], min_length=1, max_length=16)
    """The batch sizes latency is measured at (1 to 16 of them, each at most 4,096): the largest is the
    evaluation batch a job's verdict compares speeds at."""
    threads: int = Field(default=1, ge=1, le=256)
    warmup: int = Field(default=5, ge=0, le=1000)
    repeats: int = Field(default=30, ge=1, le=10_000)
    disagreements: int = Field(default=10, ge=0, le=1000)
    """How many most-disagreeing eval examples (student vs teacher) to list."""


class SearchTargets(SpecModel):
    """What a team needs from the compressed model; a job with targets runs a search.

    The metric target is a floor (``min``; a ceiling ``max`` for ``mse``, lower is better) and/or
    a largest drop against the teacher's metric on the same eval split (``max_drop``, in the
    metric's units, or as a fraction of the teacher's value when ``drop_mode`` is ``relative``).
    Latency is onnxruntime's on the worker's CPU with ``evaluation.threads`` intra-op threads, at
    ``latency_batch_size`` (measured even when it is not among ``evaluation.latency_batch_sizes``);
    size is the ONNX file on disk. ``time_budget_s`` bounds the whole search: when it runs out the
    search returns the best model measured so far and says which targets it meets.
    """

    metric: Metric | None = None
    """Default: the task's primary metric (accuracy, cosine or mse)."""
    min: float | None = None
    """The metric floor (higher-is-better metrics)."""
    max: float | None = None
    """The metric ceiling (``mse``)."""
    max_drop: float | None = Field(default=None, ge=0, le=1e9)
    drop_mode: Literal["absolute", "relative"] = "absolute"
    max_latency_ms: float | None = Field(default=None, gt=0, le=1e9)
    latency_batch_size: int = Field(default=1, ge=1, le=MAX_LATENCY_BATCH)
    """The batch size the latency cap is measured at; the search also ranks candidates by latency here."""
    latency_stat: Literal["p50", "p95"] = "p50"
    max_size_bytes: int | None = Field(default=None, gt=0, le=2**50)
    time_budget_s: float = Field(default=900.0, gt=0, le=7 * 24 * 3600)

    @model_validator(mode="after")
    def _check(self) -> SearchTargets:
        if self.min is None and self.max is None and self.max_drop is None:
            raise ValueError("targets need a metric target: 'min' (a floor; 'max' for mse) and/or 'max_drop'")
        if self.metric is not None and self.metric in LOWER_IS_BETTER and self.min is not None:
            raise ValueError(f"targets.metric {self.metric} is lower-is-better: give 'max', not 'min'")
        if self.metric is not None and self.metric not in LOWER_IS_BETTER and self.max is not None:
            raise ValueError(f"targets.metric {self.metric} is higher-is-better: give 'min', not 'max'")
        if self.min is not None and self.max is not None:
            raise ValueError("give targets.min or targets.max, not both")
        if self.drop_mode == "relative" and self.max_drop is not None and self.max_drop >= 1:
            raise ValueError("a relative targets.max_drop is a fraction of the teacher's metric: below 1")
        return self
