"""Engine specs as pydantic models. Torch-free: the HTTP service validates job specs with them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


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
    """

    kind: Literal["auto", "derived", "zoo", "hf_config"] = "auto"
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
