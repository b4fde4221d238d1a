"""What the student factory returns: the model and what the distiller and the report need to know."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from torch import nn


@dataclass
class InitReport:
    """How many student tensors (parameters and buffers) were initialised from the teacher."""

    full: int = 0
    partial: int = 0
    none: int = 0

    def __str__(self) -> str:
        return f"{self.full} tensors copied fully, {self.partial} partially, {self.none} not"


@dataclass
class Student:
    module: nn.Module
    kind: Literal["zoo", "hf"]
    config: dict[str, Any]
    """The zoo config, or the Hugging Face config dict."""
    layer_map: dict[int, int] | None
    """Student hidden-state index -> teacher hidden-state index, for feature matching."""
    description: str
    num_parameters: int
    how: Literal["auto", "derived", "zoo", "hf_config"]
    init: InitReport | None = None
    """Set when a zoo student was initialised from the teacher."""

    def __post_init__(self) -> None:
        self.module.kdq_layer_map = self.layer_map  # where the distiller looks for it
