"""Core value types shared by every engine module.

Conventions
-----------
* Inputs travel as a dict of tensors with a leading batch dimension:
  ``{"x": ...}`` for vectors ``(N, F)``, images ``(N, C, H, W)`` and signals ``(N, C, L)``;
  ``{"input_ids", "attention_mask"[, "token_type_ids"]}`` for token sequences.
  Every model is called as ``model(**inputs)``.
* A *feature model* (every student, every torch teacher) also implements
  ``forward_features(**inputs) -> ModelOutput`` exposing hidden states (and attention
  maps for transformers) for feature / attention matching.
* ``task`` is one of ``classification`` (output = logits), ``regression`` (output =
  values), ``embedding`` (output = a pooled sentence / sample embedding) or
  ``token_classification`` (output = per-token logits ``(N, T, C)``; `students.hf_tokens`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Protocol

import torch
from torch import nn

Task = Literal["classification", "regression", "embedding", "token_classification"]
"""``token_classification``: one label per token (NER); outputs ``(N, T, classes)`` logits, labels ``(N, T)``
with -100 where no word starts (padding, special tokens, a word's later subwords)."""
InputKind = Literal["vector", "image", "signal", "tokens"]
TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass
class ModelOutput:
    output: torch.Tensor
    hidden: list[torch.Tensor] = field(default_factory=list)
    """Per-layer hidden states, shallow to deep (excluding the output)."""
    attentions: list[torch.Tensor] = field(default_factory=list)
    """Per-layer attention probabilities (B, heads, T, T) for transformers."""


class FeatureModel(Protocol):
    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor: ...

    def forward_features(self, **inputs: torch.Tensor) -> ModelOutput: ...


@dataclass
class Teacher:
    """A loaded teacher, torch-backed (zoo, hf) or a black box (onnx; torchscript and
    exported_program, which run in a sandboxed child process)."""

    kind: Literal["zoo", "hf", "onnx", "torchscript", "exported_program"]
    task: Task
    input_kind: InputKind
    input_shape: tuple[int, ...]
    """Per-sample input shape; for tokens ``(max_seq_len,)``."""
    output_dim: int
    config: dict[str, Any]
    """The zoo config, the HF config dict, or a summary of the ONNX graph."""
    module: nn.Module | None = None
    """Torch teachers only; implements ``forward_features``."""
    tokenizer: Any | None = None
    source_dir: Path | None = None
    run_onnx: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None
    """Black-box teachers only: runs a batch through onnxruntime, or through the sandboxed child."""
    num_parameters: int = 0
    size_bytes: int = 0
    classes: list[str] | None = None
    """Its class names in output order, when its file names them (`io.teacher_meta`)."""
    task_source: Literal["declared", "inferred"] = "declared"
    """``inferred``: the file does not say the task; it was guessed from the output (a job may say
    otherwise)."""
    input_names: tuple[str, ...] = ("x",)
    """What its input(s) are called (an ONNX graph's own names; the student takes the same)."""
    preprocessing: dict[str, Any] | None = None
    """How its images are normalised, from its own files (a transformers ``preprocessor_config.json``):
    ``image_mean`` / ``image_std`` for pixels in [0, 1]; a job that gives none uses these."""

    @torch.no_grad()
    def predict(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The teacher's output (logits / values / embedding) for one batch, float32 CPU."""
        if self.run_onnx is not None:
            return self.run_onnx(inputs)
        assert self.module is not None
        self.module.eval()
        return self.module(**inputs).float()

    @torch.no_grad()
    def features(self, inputs: dict[str, torch.Tensor]) -> ModelOutput | None:
        """Hidden states and attentions, or None for black-box teachers."""
        if self.module is None:
            return None
        self.module.eval()
        return self.module.forward_features(**inputs)

    def summary(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "task": self.task,
            "input_kind": self.input_kind,
            "input_shape": list(self.input_shape),
            "output_dim": self.output_dim,
            "num_parameters": self.num_parameters,
            "size_bytes": self.size_bytes,
            "task_source": self.task_source,
            "input_names": list(self.input_names),
            **({"classes": list(self.classes)} if self.classes else {}),
        }


@dataclass
class TensorData:
    """A dataset loaded into memory as tensors (leading dim = samples)."""

    inputs: dict[str, torch.Tensor]
    y: torch.Tensor | None = None
    """Class indices (int64, N), regression / embedding targets (float32, N or N×D), or None."""
    input_kind: InputKind = "vector"
    classes: list[str] | None = None
    """Class names in index order, when known."""
    texts: list[str] | None = None
    """Raw texts for text data (used for vocabulary statistics and reports)."""
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return next(iter(self.inputs.values())).shape[0]

    @property
    def labelled(self) -> bool:
        return self.y is not None

    def subset(self, indices: torch.Tensor | list[int]) -> "TensorData":
        idx = torch.as_tensor(indices, dtype=torch.long)
        return TensorData(
            inputs={k: v[idx] for k, v in self.inputs.items()},
            y=None if self.y is None else self.y[idx],
            input_kind=self.input_kind,
            classes=self.classes,
            texts=None if self.texts is None else [self.texts[i] for i in idx.tolist()],
            meta=dict(self.meta),
        )

    def split(self, eval_fraction: float, seed: int = 0) -> tuple["TensorData", "TensorData"]:
        """A seeded hold-out split: (train, eval)."""
        n = len(self)
        if not 0.0 < eval_fraction < 1.0:
            raise ValueError("eval_fraction must be in (0, 1)")
        n_eval = max(1, int(round(n * eval_fraction)))
        if n_eval >= n:
            raise ValueError(f"cannot hold out {n_eval} of {n} samples")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        return self.subset(perm[n_eval:]), self.subset(perm[:n_eval])

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "samples": len(self),
            "input_kind": self.input_kind,
            "inputs": {k: list(v.shape[1:]) for k, v in self.inputs.items()},
            "labelled": self.labelled,
        }
        if self.classes is not None:
            out["classes"] = list(self.classes)
        if self.y is not None:
            out["target_shape"] = list(self.y.shape[1:])
        out.update({k: v for k, v in self.meta.items() if isinstance(v, (str, int, float, bool))})
        return out


@dataclass
class Progress:
    """One progress report. ``fraction`` covers the current stage only."""

    stage: str
    step: int
    total: int
    loss: float | None = None
    metric: float | None = None
    eta_s: float | None = None
    message: str | None = None

    @property
    def fraction(self) -> float:
        return 0.0 if self.total <= 0 else min(1.0, self.step / self.total)


ProgressFn = Callable[[Progress], None]
CancelFn = Callable[[], bool]


def no_progress(_: Progress) -> None:
    return None


def never_cancel() -> bool:
    return False


def trim_padding(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Token inputs cut after the batch's last real token (right padding).

    Datasets are padded to their longest sequence, so without this every batch would cost
    that length (docstring sentences: 23 tokens on average, padded to 64). Outputs do not
    change: padding is masked out of attention and pooling. Inputs without a 2-D
    ``attention_mask`` and left-padded batches come back as they are.
    """
    mask = inputs.get("attention_mask")
    if mask is None or mask.ndim != 2:
        return inputs
    used = mask.any(0).nonzero()
    length = int(used[-1]) + 1 if used.numel() else mask.shape[1]
    if length == mask.shape[1]:
        return inputs
    return {k: v[:, :length] if v.ndim == 2 and v.shape == mask.shape else v for k, v in inputs.items()}


ArtifactKind = Literal[
    "student",  # a zip of the student folder (config.json + model.safetensors [+ tokenizer]), loadable by load_teacher
    "onnx_fp32",
    "onnx_int8",
    "onnx_int4",
    "report_json",
    "report_html",
    "manifest",
    "sensitivity",
    "bundle",  # bundle.zip: the delivered model with preprocessing.json, predict.py and MODEL_CARD.md
    "other",
]


@dataclass
class Artifact:
    """One file a compression run produced (its path is inside the run's output_dir)."""

    name: str
    kind: ArtifactKind
    path: Path
    description: str = ""


@dataclass
class CompressResult:
    artifacts: list[Artifact]
    metrics: dict[str, Any]
    """The content of report.json."""
