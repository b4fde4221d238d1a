"""Hugging Face vision transformers (ViT) as engine models: `HFVisionEncoder`.

A ViT image classifier (``ViTForImageClassification``) answers the engine's image convention:
``model(x=...)`` with ``x`` of shape ``(N, C, H, W)``, already resized and normalised as the teacher
expects (its ``preprocessor_config.json``, `io.hf_vision_io`). It subclasses `hf_model.HFEncoder`, so
the transformers machinery that does not care about the input (derived students with fewer, evenly
spaced layers and a narrower feed-forward: `hf_derive.derive_hf_student`; saving with
`io.hf_folder.save_hf_model`) serves ViT as it serves BERT. The patch embedding (a Conv2d), the class
token and the position embeddings are the "embeddings" a derived student copies whole; hidden states
``[patch embeddings, layer 1, ..., layer N]`` and per-layer attentions come out of ``forward_features``
for feature and attention distillation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ModelFileError, SpecError
from ..types import ModelOutput, Task
from .hf_model import HFEncoder

VISION_MODEL_TYPES = ("vit",)
IMAGE_INPUT = "x"
"""The engine's image input: the key models are called with, and the student's ONNX input name."""


class HFVisionEncoder(HFEncoder):
    """A transformers image classifier called as ``model(x)``: logits (classification) or values
    (regression, ``num_labels`` outputs). No token map, no output projection, no pooling choice (the
    classifier reads the class token's final state)."""

    def __init__(self, backbone: nn.Module, task: Task, pooling: str = "cls", normalize: bool = False, *,
                 token_map: torch.Tensor | None = None, project: nn.Linear | None = None) -> None:
        if task not in ("classification", "regression"):
            raise SpecError(f"a {backbone.config.model_type} teacher classifies or regresses images; "
                            f"task {task!r} is not supported for it")
        if token_map is not None or project is not None:
            raise SpecError("vision transformers take no token map or output projection")
        super().__init__(backbone, task, "cls", False)

    @property
    def uses_token_type_ids(self) -> bool:
        return False

    @property
    def input_names(self) -> tuple[str, ...]:
        return (IMAGE_INPUT,)

    @property
    def tokenizer_vocab_size(self) -> int:
        raise SpecError("a vision transformer has no vocabulary")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.backbone(pixel_values=x, return_dict=True).logits

    def forward_features(self, x: torch.Tensor) -> ModelOutput:  # type: ignore[override]
        """Logits, hidden states ``[patch embeddings, layer 1, ..., layer N]`` (N, 1 + patches, D) and
        attention probabilities per layer."""
        out = self.backbone(pixel_values=x, output_hidden_states=True, output_attentions=True, return_dict=True)
        return ModelOutput(out.logits, list(out.hidden_states), list(out.attentions or ()))


def vision_types() -> tuple[str, ...]:
    return VISION_MODEL_TYPES


def is_vision(model_type: Any) -> bool:
    return model_type in VISION_MODEL_TYPES


def image_shape(config: Any) -> tuple[int, int, int]:
    """(channels, height, width) the model takes: position embeddings fix the image size."""
    size = config.image_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    patch = config.patch_size
    ph, pw = (patch, patch) if isinstance(patch, int) else tuple(patch)
    channels = config.num_channels
    for name, value in (("image_size", h), ("image_size", w), ("patch_size", ph), ("patch_size", pw),
                        ("num_channels", channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ModelFileError(f"config.json: {name} must be a positive integer, not {value!r}")
    if h % ph or w % pw:
        raise ModelFileError(f"config.json: image_size {h}x{w} is not a whole number of {ph}x{pw} patches")
    return int(channels), int(h), int(w)
