"""How to distil: the losses, the schedule, the early-stop target, the teacher cache, augmentation."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .base import Metric, SpecModel


class TargetSpec(SpecModel):
    metric: Metric = "accuracy"
    min: float | None = None
    """Stop early once the eval metric reaches this (for ``mse``: falls to ``max``)."""
    max: float | None = None


class DistillSpec(SpecModel):
    temperature: float = Field(default=4.0, gt=0, le=100)
    alpha: float = Field(default=0.5, ge=0, le=1)
    """Weight of the distillation (KD) loss; ``1 - alpha`` weighs the hard-label loss."""
    epochs: int = Field(default=20, ge=1, le=10_000)
    min_steps: int | None = Field(default=2000, ge=1, le=10**8)
    """Optimizer steps a student of vectors, images or signals trains at least: on a small data set
    ``epochs`` is raised to reach them (at most 10× ``epochs``; the best evaluation's weights are
    kept). 20 epochs of 400 rows are 140 steps, far short of what a small student reaches. Left
    unset while ``epochs`` is given, it is null: exactly ``epochs``. Transformers train ``epochs``."""
    batch_size: int = Field(default=64, ge=1, le=65_536)
    lr: float = Field(default=1e-3, gt=0, le=10)
    weight_decay: float = Field(default=0.01, ge=0, le=10)
    warmup_ratio: float = Field(default=0.1, ge=0, lt=1)
    grad_clip: float | None = Field(default=1.0, gt=0, le=1e6)
    seed: int = Field(default=0, ge=0, le=2**32 - 1)

    feature_loss: Literal["none", "mse", "cosine"] = "none"
    feature_weight: float = Field(default=1.0, ge=0, le=1000)
    layer_map: dict[int, int] | None = None
    """Student hidden-state index -> teacher hidden-state index; defaults from the student."""
    attention_weight: float = Field(default=0.0, ge=0, le=1000)
    embedding_loss: Literal["cosine", "mse"] = "cosine"
    regression_loss: Literal["mse"] = "mse"

    target: TargetSpec | None = None
    patience: int | None = Field(default=None, ge=1, le=100_000)
    """Early stop after this many evaluations without improvement."""
    keep: Literal["best", "last"] = "best"
    """The weights a run returns: its best evaluation's, or its last ones. On a small eval split the
    best of many evaluations is often an early, lucky checkpoint that generalises worse than the
    weights the run ended with (digits: best at step 272 of 5,100, 0.951 on unseen data against
    0.969 for the last); the search's convergence runs keep the last."""
    time_budget_s: float | None = Field(default=None, gt=0, le=7 * 24 * 3600)
    eval_every: int | None = Field(default=None, ge=1, le=10**9)
    """Evaluate every N steps (default: once per epoch)."""
    checkpoint_every: int | None = Field(default=None, ge=1, le=10**9)
    """Checkpoint every N steps (default: once per epoch)."""

    cache_teacher: bool = True
    top_k: int | None = Field(default=None, ge=1, le=1_000_000)
    """Cache only the teacher's top-k logits (large output spaces); None: all when ≤ 1024."""
    augment_noise: float = Field(default=0.0, ge=0, le=100)
    """Gaussian input noise (vector/signal/image inputs); disables the teacher cache."""
    augment_mixup: float = Field(default=0.0, ge=0, le=100)
    """Mixup of input pairs with λ ~ Beta(a, a), the teacher labelling each mixed input
    ("function matching": the teacher's knowledge between the samples); 0 = off. Float inputs
    only; disables the teacher cache. The labels-only baseline is trained without it."""
    freeze_embeddings: bool = False
    """Keep the student's embedding tables (``nn.Embedding``: word, position, token type) fixed
    while distilling. A derived transformer starts with the teacher's, and the word table is
    most of a small student's weights (MiniLM: 11.7M of 17.2M): freezing it skips their dense
    AdamW updates."""
    baseline: bool = True
    """Also train the same student on labels alone (needs labels)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @model_validator(mode="after")
    def _explicit_epochs(self) -> DistillSpec:
        """A spec that names its epochs trains exactly those, unless it names ``min_steps`` too."""
        if "epochs" in self.model_fields_set and "min_steps" not in self.model_fields_set:
            self.min_steps = None
        return self
