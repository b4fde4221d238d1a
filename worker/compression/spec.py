"""Engine specs as pydantic models. Torch-free: the HTTP service validates job specs with them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StudentSpec(_Spec):
    """How to make the student.

    * ``auto``: a sensible student for the teacher under ``max_params`` or
      ``max_params_ratio`` (default ratio 0.25).
    * ``derived``: from the teacher itself: fewer layers (``layers`` picks which teacher
      layers to copy, or ``num_layers`` picks them evenly) and optionally narrower
      (``width_ratio`` < 1); initialised from the teacher where shapes allow.
    * ``zoo``: a zoo architecture given by ``architecture`` (a zoo config dict).
    * ``hf_config``: a transformers config dict given by ``hf_config`` (BERT family).
    * ``search``: the smallest, fastest student that meets ``CompressSpec.targets``, found by
      training and measuring a ladder of candidates (``search.py``); ``max_params`` /
      ``max_params_ratio`` cap the ladder. ``auto`` becomes ``search`` when targets are given.
    """

    kind: Literal["auto", "derived", "zoo", "hf_config", "search"] = "auto"
    max_params: int | None = Field(default=None, gt=0)
    max_params_ratio: float | None = Field(default=None, gt=0, le=1)
    layers: list[int] | None = None
    num_layers: int | None = Field(default=None, ge=1)
    width_ratio: float | None = Field(default=None, gt=0, le=1)
    architecture: dict[str, Any] | None = None
    hf_config: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _check(self) -> "StudentSpec":
        if self.kind == "zoo" and not self.architecture:
            raise ValueError("student.kind 'zoo' needs 'architecture'")
        if self.kind == "hf_config" and not self.hf_config:
            raise ValueError("student.kind 'hf_config' needs 'hf_config'")
        if self.layers is not None and self.num_layers is not None and len(self.layers) != self.num_layers:
            raise ValueError("student.layers and student.num_layers disagree")
        if self.max_params is not None and self.max_params_ratio is not None:
            raise ValueError("give student.max_params or student.max_params_ratio, not both")
        if self.kind == "search":
            fixed = [k for k in ("layers", "num_layers", "width_ratio", "architecture", "hf_config")
                     if getattr(self, k) is not None]
            if fixed:
                raise ValueError(f"student.kind 'search' picks the architecture itself; drop {', '.join(fixed)} "
                                 "(max_params / max_params_ratio cap its candidates)")
        return self


class TargetSpec(_Spec):
    metric: Literal["accuracy", "macro_f1", "cosine", "mse"] = "accuracy"
    min: float | None = None
    """Stop early once the eval metric reaches this (for ``mse``: falls to ``max``)."""
    max: float | None = None


class DistillSpec(_Spec):
    temperature: float = Field(default=4.0, gt=0)
    alpha: float = Field(default=0.5, ge=0, le=1)
    """Weight of the distillation (KD) loss; ``1 - alpha`` weighs the hard-label loss."""
    epochs: int = Field(default=20, ge=1, le=10_000)
    batch_size: int = Field(default=64, ge=1, le=65_536)
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.01, ge=0)
    warmup_ratio: float = Field(default=0.1, ge=0, lt=1)
    grad_clip: float | None = Field(default=1.0, gt=0)
    seed: int = 0

    feature_loss: Literal["none", "mse", "cosine"] = "none"
    feature_weight: float = Field(default=1.0, ge=0)
    layer_map: dict[int, int] | None = None
    """Student hidden-state index -> teacher hidden-state index; defaults from the student."""
    attention_weight: float = Field(default=0.0, ge=0)
    embedding_loss: Literal["cosine", "mse"] = "cosine"
    regression_loss: Literal["mse"] = "mse"

    target: TargetSpec | None = None
    patience: int | None = Field(default=None, ge=1)
    """Early stop after this many evaluations without improvement."""
    time_budget_s: float | None = Field(default=None, gt=0)
    eval_every: int | None = Field(default=None, ge=1)
    """Evaluate every N steps (default: once per epoch)."""
    checkpoint_every: int | None = Field(default=None, ge=1)
    """Checkpoint every N steps (default: once per epoch)."""

    cache_teacher: bool = True
    top_k: int | None = Field(default=None, ge=1)
    """Cache only the teacher's top-k logits (large output spaces); None: all when ≤ 1024."""
    augment_noise: float = Field(default=0.0, ge=0)
    """Gaussian input noise (vector/signal/image inputs); disables the teacher cache."""
    augment_mixup: float = Field(default=0.0, ge=0)
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


class DataSpec(_Spec):
    """How to read a dataset file."""

    format: Literal["auto", "npz", "safetensors", "csv", "parquet", "jsonl", "text_csv", "image_zip"] = "auto"
    label_column: str | None = None
    text_column: str = "text"
    text_pair_column: str = "text_pair"
    max_length: int = Field(default=128, ge=4, le=4096)
    image_size: tuple[int, int] | None = None
    """(height, width) to resize images to; default: the teacher's input size."""
    image_mean: list[float] | None = None
    image_std: list[float] | None = None
    grayscale: bool | None = None
    eval_fraction: float = Field(default=0.2, gt=0, lt=1)
    split_seed: int = 0


class QuantizationSpec(_Spec):
    """How to quantize the (student or teacher) model for deployment."""

    method: Literal["auto", "none", "dynamic_int8", "static_int8", "weight_only_int8", "int4", "qat"] = "auto"
    """``auto``: dynamic int8 for token (transformer) models, whose activations static calibration
    handles badly (MiniLM: cosine 0.81 static vs 0.99 dynamic), static int8 for everything else."""
    backend: Literal["onnxruntime", "torch"] = "onnxruntime"
    calibration: Literal["minmax", "percentile", "entropy"] = "percentile"
    percentile: float = Field(default=99.99, gt=90, le=100)
    calibration_samples: int = Field(default=256, ge=1, le=100_000)
    per_channel: bool = True
    block_size: int = Field(default=32, ge=16)
    """Block size for int4 weight-only quantization."""
    max_metric_drop: float | None = Field(default=None, ge=0)
    """Accuracy-aware mode: keep the costliest layers in float until the drop is within this."""
    drop_mode: Literal["absolute", "relative"] = "absolute"
    qat_epochs: int = Field(default=3, ge=1, le=1000)


class EvaluationSpec(_Spec):
    latency_batch_sizes: list[int] = Field(default_factory=lambda: [1, 64])
    threads: int = Field(default=1, ge=1, le=256)
    warmup: int = Field(default=5, ge=0, le=1000)
    repeats: int = Field(default=30, ge=1, le=10_000)
    disagreements: int = Field(default=10, ge=0, le=1000)
    """How many most-disagreeing eval examples (student vs teacher) to list."""


LOWER_IS_BETTER = ("mse",)


class SearchTargets(_Spec):
    """What a team needs from the compressed model; a job with targets runs a search.

    The metric target is a floor (``min``; a ceiling ``max`` for ``mse``, lower is better) and/or
    a largest drop against the teacher's metric on the same eval split (``max_drop``, in the
    metric's units, or as a fraction of the teacher's value when ``drop_mode`` is ``relative``).
    Latency is onnxruntime's on the worker's CPU with ``evaluation.threads`` intra-op threads, at
    ``latency_batch_size`` (measured even when it is not among ``evaluation.latency_batch_sizes``);
    size is the ONNX file on disk. ``time_budget_s`` bounds the whole search: when it runs out the
    search returns the best model measured so far and says which targets it meets.
    """

    metric: Literal["accuracy", "macro_f1", "cosine", "mse"] | None = None
    """Default: the task's primary metric (accuracy, cosine or mse)."""
    min: float | None = None
    """The metric floor (higher-is-better metrics)."""
    max: float | None = None
    """The metric ceiling (``mse``)."""
    max_drop: float | None = Field(default=None, ge=0)
    drop_mode: Literal["absolute", "relative"] = "absolute"
    max_latency_ms: float | None = Field(default=None, gt=0)
    latency_batch_size: int = Field(default=1, ge=1, le=65_536)
    """The batch size the latency cap is measured at; the search also ranks candidates by latency here."""
    latency_stat: Literal["p50", "p95"] = "p50"
    max_size_bytes: int | None = Field(default=None, gt=0)
    time_budget_s: float = Field(default=900.0, gt=0, le=7 * 24 * 3600)

    @model_validator(mode="after")
    def _check(self) -> "SearchTargets":
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


class CompressSpec(_Spec):
    """One whole compression run. Each stage is optional: no ``student`` means no
    distillation (the teacher itself is quantized); ``quantization.method == "none"``
    means no quantization."""

    task: Literal["classification", "regression", "embedding"] | None = None
    """Default: what the teacher says it is."""
    student: StudentSpec | None = Field(default_factory=StudentSpec)
    distillation: DistillSpec = Field(default_factory=DistillSpec)
    quantization: QuantizationSpec = Field(default_factory=QuantizationSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    targets: SearchTargets | None = Field(default=None, validate_default=True)
    """What the result must meet; runs a search (student ``auto`` becomes ``search``)."""

    @field_validator("targets")
    @classmethod
    def _targets_fit_student(cls, targets: SearchTargets | None, info: ValidationInfo) -> SearchTargets | None:
        if "student" not in info.data:  # the student itself is invalid: reported there
            return targets
        student = info.data["student"]
        kind = None if student is None else student.kind
        if targets is not None and kind is None:
            raise ValueError("targets drive a student search: give student {'kind': 'search'} (or 'auto')")
        if targets is not None and kind not in ("auto", "search"):
            raise ValueError(f"targets drive a student search, but a {kind!r} student is fixed: "
                             "use student kind 'search' (or 'auto'), or drop the targets")
        if targets is None and kind == "search":
            raise ValueError("student.kind 'search' needs targets (what the model must meet)")
        return targets

    @model_validator(mode="after")
    def _auto_searches(self) -> "CompressSpec":
        """``auto`` with targets is a search; the stored spec says so."""
        if self.targets is not None and self.student is not None and self.student.kind == "auto":
            self.student = self.student.model_copy(update={"kind": "search"})
        return self
