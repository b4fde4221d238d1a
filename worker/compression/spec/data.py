"""How to read a dataset file (torch-free: the service validates upload options with it)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import SpecModel


class DataSpec(SpecModel):
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
