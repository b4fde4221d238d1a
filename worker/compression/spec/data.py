"""How to read a dataset file (torch-free: the service validates upload options with it)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StringConstraints

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
    image_scale: Literal["auto", "0-1", "0-255", "-1-1", "imagenet"] = "auto"
    """How pixels reach the teacher: in [0, 1], [0, 255], [-1, 1], or ImageNet's mean and std. ``auto``:
    the one under which the teacher agrees best with the labels (``0-1`` without labels); the choice is
    recorded in the job's preprocessing. ``image_mean`` / ``image_std`` override it."""
    image_mean: list[float] | None = Field(default=None, max_length=4)
    image_std: list[float] | None = Field(default=None, max_length=4)
    grayscale: bool | None = None
    """Default: what the teacher's input takes (1 channel: grayscale; 3: RGB)."""
    classes: list[Annotated[str, StringConstraints(min_length=1, max_length=200)]] | None = Field(
        default=None, min_length=1, max_length=100_000)
    """Class names in the order of the teacher's outputs: labels that are names are numbered in this
    order (labels that are integers are indices already). Default: the teacher's own names when it
    has them (a transformers ``id2label``, ONNX metadata ``classes``, a zoo config's ``classes``),
    else sorted; the job says which it used."""
    eval_fraction: float = Field(default=0.2, gt=0, lt=1)
    split_seed: int = Field(default=0, ge=0, le=2**32 - 1)
