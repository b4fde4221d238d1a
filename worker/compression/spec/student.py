"""How to make the student: one config class per kind, holding only that kind's fields, in a union
keyed by ``kind`` (`StudentSpec`).

Every kind takes a parameter budget (`StudentConfig`): ``max_params``, or ``max_params_ratio`` of
the teacher's parameters. ``auto`` sizes the student to it (default ratio 0.25); ``derived``,
``zoo`` and ``hf_config`` students must fit under it when one is given; ``search`` drops the ladder
candidates over it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from .base import SpecModel

MAX_PARAMETERS = 10**10
"""No student is larger (a job's own limit, from its memory, is usually lower: `service.api.costs`)."""


class StudentConfig(SpecModel):
    """The parameter budget every kind takes."""

    kind: str
    """The kind's name; each config class fixes it (the union's discriminator)."""
    max_params: int | None = Field(default=None, gt=0, le=MAX_PARAMETERS)
    max_params_ratio: float | None = Field(default=None, gt=0, le=1)

    @model_validator(mode="after")
    def _one_budget(self) -> StudentConfig:
        if self.max_params is not None and self.max_params_ratio is not None:
            raise ValueError("give student.max_params or student.max_params_ratio, not both")
        return self


class AutoStudent(StudentConfig):
    """A sensible student for the teacher under the budget (default: 0.25 of its parameters). Becomes
    ``search`` when the job gives targets."""

    kind: Literal["auto"] = "auto"


class DerivedStudent(StudentConfig):
    """From the teacher itself: fewer layers (``layers`` picks which teacher layers to copy, or
    ``num_layers`` picks them evenly) and optionally narrower (``width_ratio`` < 1); initialised from
    the teacher where shapes allow. Needs a zoo or Hugging Face teacher."""

    kind: Literal["derived"] = "derived"
    layers: list[Annotated[int, Field(ge=0, le=1024)]] | None = Field(default=None, max_length=1024)
    num_layers: int | None = Field(default=None, ge=1, le=1024)
    width_ratio: float | None = Field(default=None, gt=0, le=1)

    @model_validator(mode="after")
    def _layers_agree(self) -> DerivedStudent:
        if self.layers is not None and self.num_layers is not None and len(self.layers) != self.num_layers:
            raise ValueError("student.layers and student.num_layers disagree")
        return self


class ZooStudent(StudentConfig):
    """A zoo architecture (a zoo config: ``architecture`` names it, e.g. ``{"architecture": "mlp",
    "hidden": [64]}``); input dims, task and output size come from the teacher."""

    kind: Literal["zoo"] = "zoo"
    architecture: dict[str, Any] = Field(min_length=1)


class HFConfigStudent(StudentConfig):
    """A transformers config (merged over the teacher's) for a Hugging Face teacher."""

    kind: Literal["hf_config"] = "hf_config"
    hf_config: dict[str, Any] = Field(min_length=1)


class SearchStudent(StudentConfig):
    """The smallest, fastest student that meets ``CompressSpec.targets``, found by training and
    measuring a ladder of candidates (``search``); it picks the architecture itself."""

    kind: Literal["search"] = "search"


StudentKind = AutoStudent | DerivedStudent | ZooStudent | HFConfigStudent | SearchStudent
StudentSpec = Annotated[StudentKind, Field(discriminator="kind")]
"""How to make the student: one of the kind configs, by ``kind``."""
