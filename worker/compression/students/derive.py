"""Building students: a derived zoo student (the teacher's layers, narrowed, initialised from it), a
fresh zoo student, a transformers student wrapped with its description, and the parameter budget."""

from __future__ import annotations

from typing import Any, Literal

from torch import nn

from ..errors import SpecError
from ..types import Teacher
from . import zoo
from .student import Student
from .zoo_init import init_from_teacher
from .zoo_layers import (
    NO_VOCAB,
    derive_zoo_config,
    describe_config,
    input_keys,
    layer_count,
    zoo_layer_map,
)

DEFAULT_RATIO = 0.25


def derive_zoo_student(teacher: Teacher, kept: list[int], ratio: float, how: Literal["auto", "derived"],
                budget: int | None = None) -> Student:
    assert teacher.module is not None
    cfg_t = zoo.validate_config(teacher.config)
    cfg = derive_zoo_config(cfg_t, kept, ratio)
    module = zoo.build(cfg)
    report = init_from_teacher(module, teacher.module, kept)
    depth = layer_count(cfg_t)
    layers = "all layers" if len(kept) == depth else f"layers {kept} of {depth}"
    within = "" if budget is None else f", within {budget:,} parameters"
    description = (f"derived from teacher: {describe_config(cfg)} (width ×{ratio:.3g}, {layers}){within}, "
                   f"initialised from teacher ({report})")
    return Student(module, "zoo", cfg, zoo_layer_map(cfg_t, kept), description, zoo.count_parameters(module), how,
                   report)


def fresh_zoo_student(cfg: dict[str, Any], description: str) -> Student:
    module = zoo.build(cfg)
    return Student(module, "zoo", cfg, None, description, zoo.count_parameters(module), "auto")


def hf_student(module: nn.Module, layer_map: dict[int, int] | None, how: Literal["auto", "derived", "hf_config"],
                description: str) -> Student:
    """``module`` is an ``hf_model.HFEncoder``; its ``config`` is the transformers config."""
    cfg, n = module.config, zoo.count_parameters(module)
    shape = f"{cfg.model_type}, {cfg.num_hidden_layers} layer(s), hidden size {cfg.hidden_size}, {n:,} parameters"
    return Student(module, "hf", cfg.to_dict(), layer_map, f"{description}: {shape}", n, how)


def kept_hf_layers(layer_map: dict[int, int]) -> list[int]:
    """The teacher layers a derived hf student copied (hidden index 0 is the embeddings)."""
    return [t - 1 for s, t in sorted(layer_map.items()) if s > 0]


def student_budget(teacher: Teacher, max_params: int | None, max_params_ratio: float | None) -> int:
    """``max_params``, else ``max_params_ratio`` (default `DEFAULT_RATIO`) of the teacher's parameters."""
    if max_params is not None:
        return max_params
    total = teacher.num_parameters or (zoo.count_parameters(teacher.module) if teacher.module is not None else 0)
    if total <= 0:
        raise SpecError("the teacher's parameter count is unknown, so a ratio budget cannot be applied; "
                        "give student.max_params")
    return max(1, int(total * (max_params_ratio or DEFAULT_RATIO)))


def fit_to_teacher(teacher: Teacher, architecture: dict[str, Any]) -> dict[str, Any]:
    """Fill a zoo architecture's task, output_dim and input dims from the teacher; refuse mismatches."""
    cfg = dict(architecture)
    arch = cfg.get("architecture")
    if arch not in zoo.ARCHITECTURES:
        raise SpecError(f"unknown zoo architecture {arch!r}; known: {', '.join(zoo.ARCHITECTURES)}")
    kind = zoo.input_kind(cfg)
    flattens = arch == "mlp" and teacher.input_kind != "tokens"  # an MLP takes any fixed-size input, flattened
    if kind != teacher.input_kind and not flattens:
        raise SpecError(f"student architecture {arch!r} takes {kind} inputs but the teacher takes "
                        f"{teacher.input_kind} inputs")
    wanted = {"task": teacher.task, "output_dim": teacher.output_dim, **input_keys(teacher, arch)}
    at_least = {"vocab_size", "max_len"}  # a transformer student may have room for more tokens
    for key, value in wanted.items():
        if key not in cfg:
            cfg[key] = value
            continue
        given = list(cfg[key]) if key == "input_size" and isinstance(cfg[key], (list, tuple)) else cfg[key]
        if key in at_least and (not isinstance(given, int) or given < value):
            raise SpecError(f"student {key} {given!r} does not fit the teacher's inputs: it must be an integer "
                            f"of at least {value!r}")
        if key not in at_least and given != value:
            raise SpecError(f"student {key} {given!r} does not match the teacher's {value!r}")
    if arch == "transformer" and "vocab_size" not in cfg:
        raise SpecError(NO_VOCAB)
    return zoo.validate_config(cfg)
