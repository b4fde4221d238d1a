"""Zoo config arithmetic for students: which teacher layers a student keeps, how wide its layers
are, how many parameters a config has, and which config keys describe the teacher's inputs.

The "layers" of each zoo architecture: MLP hidden layers, cnn / cnn1d conv blocks, transformer
layers, resnet residual blocks numbered across stages (every stage keeps at least one).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

from ..errors import SpecError
from ..types import Teacher
from . import zoo

MIN_WIDTH = 4
"""No auto-sized or narrowed layer gets fewer units / channels than this (unless the teacher's has)."""
T = TypeVar("T")


def derive_zoo_config(cfg: dict[str, Any], kept: Sequence[int], width_ratio: float) -> dict[str, Any]:
    """The zoo config of ``cfg`` keeping teacher layers ``kept``, widths scaled by ``width_ratio``.

    Transformers keep their head count: ``dim`` stays a multiple of ``num_heads``.
    """
    arch, out = cfg["architecture"], dict(cfg)
    if arch in ("mlp", "ctr"):
        out["hidden"] = [scaled_width(int(cfg["hidden"][i]), width_ratio) for i in kept]
        if arch == "ctr":  # narrower tables too (the vocabularies stay: the student reads the same ids)
            out["embedding_dim"] = scaled_width(int(cfg.get("embedding_dim", 16)), width_ratio)
    elif arch in ("cnn", "cnn1d"):
        out["channels"] = [scaled_width(int(cfg["channels"][i]), width_ratio) for i in kept]
        if int(cfg.get("hidden", 0)):
            out["hidden"] = scaled_width(int(cfg["hidden"]), width_ratio)
    elif arch == "resnet":
        per_stage = split_resnet(resnet_blocks(cfg), kept)
        out["widths"] = [scaled_width(int(w), width_ratio) for w in cfg["widths"]]
        out["blocks_per_stage"] = [len(k) for k in per_stage]
    else:
        dim, heads = int(cfg["dim"]), int(cfg.get("num_heads", 4))
        head_dim = dim // heads
        out["dim"] = heads * min(head_dim, max(-(-MIN_WIDTH // heads), round(head_dim * width_ratio)))
        out["num_heads"] = heads
        out["ffn_dim"] = scaled_width(int(cfg.get("ffn_dim", 4 * dim)), width_ratio)
        out["num_layers"] = len(kept)
    return out


NO_VOCAB = ("the teacher's vocabulary size is unknown (no tokenizer and no vocab_size in its config); "
             "give vocab_size in the student architecture")


def teacher_vocab_size(teacher: Teacher) -> int | None:
    if teacher.tokenizer is not None:
        return len(teacher.tokenizer)
    vocab = teacher.config.get("vocab_size")
    return None if vocab is None else int(vocab)


def input_keys(teacher: Teacher, arch: str) -> dict[str, Any]:
    """The zoo config keys that describe the teacher's inputs for architecture ``arch``."""
    shape = [int(d) for d in teacher.input_shape]
    if arch in ("mlp", "ctr"):
        return {"input_dim": math.prod(shape)}
    if arch in ("cnn", "resnet"):
        return {"in_channels": shape[0], "input_size": shape[1:]}
    if arch == "cnn1d":
        return {"in_channels": shape[0], "input_length": shape[1]}
    vocab = teacher_vocab_size(teacher)
    return {"max_len": shape[0], **({} if vocab is None else {"vocab_size": vocab})}


def largest_fitting(options: Sequence[T], size: Callable[[T], int], budget: int) -> T | None:
    """The last of ``options`` (ordered by non-decreasing size) whose size is within ``budget``."""
    if size(options[0]) > budget:
        return None
    lo, hi = 0, len(options) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if size(options[mid]) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return options[lo]


def meta_count(cfg: dict[str, Any]) -> int:
    """Parameter count of a zoo config without allocating its weights."""
    with torch.device("meta"):
        return zoo.count_parameters(zoo.build(cfg))


def scaled_width(width: int, ratio: float) -> int:
    return min(width, max(MIN_WIDTH, round(width * ratio)))


def describe_config(cfg: dict[str, Any]) -> str:
    arch = cfg["architecture"]
    if arch == "mlp":
        return f"mlp hidden {list(cfg['hidden'])}"
    if arch == "ctr":
        return (f"ctr ({cfg.get('interaction', 'concat')}) embedding dim {cfg.get('embedding_dim', 16)} × "
                f"{len(cfg['categorical'])} tables, hidden {list(cfg['hidden'])}")
    if arch in ("cnn", "cnn1d"):
        fc = f", hidden {cfg['hidden']}" if int(cfg.get("hidden", 0)) else ""
        return f"{arch} channels {list(cfg['channels'])}{fc}"
    if arch == "resnet":
        return f"resnet widths {list(cfg['widths'])}, blocks per stage {resnet_blocks(cfg)}"
    return (f"transformer dim {cfg['dim']}, {cfg['num_layers']} layer(s), {cfg.get('num_heads', 4)} heads, "
            f"ffn {cfg.get('ffn_dim', 4 * int(cfg['dim']))}")


# --- which layers ---------------------------------------------------------------------------


def resnet_blocks(cfg: dict[str, Any]) -> list[int]:
    return [int(b) for b in cfg.get("blocks_per_stage", [2] * len(cfg["widths"]))]


def layer_count(cfg: dict[str, Any]) -> int:
    arch = cfg["architecture"]
    if arch in ("mlp", "ctr"):
        return len(cfg["hidden"])
    if arch in ("cnn", "cnn1d"):
        return len(cfg["channels"])
    if arch == "resnet":
        return sum(resnet_blocks(cfg))
    return int(cfg["num_layers"])


def min_layer_count(cfg: dict[str, Any]) -> int:
    return len(cfg["widths"]) if cfg["architecture"] == "resnet" else 1


def evenly_spaced(n: int, k: int) -> list[int]:
    """``k`` of ``range(n)`` evenly spaced, first and last included (rounding half up)."""
    return [0] if k == 1 else [int(i * (n - 1) / (k - 1) + 0.5) for i in range(k)]


def even_layers(cfg: dict[str, Any], k: int) -> list[int]:
    if cfg["architecture"] != "resnet":
        return evenly_spaced(layer_count(cfg), k)
    counts = resnet_blocks(cfg)
    quota = [1] * len(counts)  # every stage keeps a block; extras go where the most are dropped
    for _ in range(k - len(counts)):
        s = max((i for i in range(len(counts)) if quota[i] < counts[i]), key=lambda i: counts[i] / quota[i])
        quota[s] += 1
    starts = [sum(counts[:s]) for s in range(len(counts))]
    return [starts[s] + b for s in range(len(counts)) for b in evenly_spaced(counts[s], quota[s])]


def split_resnet(counts: list[int], kept: Sequence[int]) -> list[list[int]]:
    """Global block indices -> per-stage local indices."""
    per_stage: list[list[int]] = [[] for _ in counts]
    starts = [sum(counts[:s]) for s in range(len(counts))]
    for g in kept:
        s = max(i for i in range(len(counts)) if starts[i] <= g)
        per_stage[s].append(g - starts[s])
    return per_stage


def kept_layers(cfg: dict[str, Any], layers: list[int] | None, num_layers: int | None) -> list[int]:
    """The teacher layers a derived student keeps: ``layers`` as given, else ``num_layers`` evenly
    spaced (first and last included), else all of them."""
    depth, min_depth = layer_count(cfg), min_layer_count(cfg)
    unit = "residual blocks (numbered across stages)" if cfg["architecture"] == "resnet" else "layers"
    if layers is not None:
        kept = list(layers)
        if not kept or any(i < 0 or i >= depth for i in kept):
            raise SpecError(f"student.layers {kept} must pick among the teacher's {depth} {unit} (0..{depth - 1})")
        if any(b <= a for a, b in itertools.pairwise(kept)):
            raise SpecError(f"student.layers {kept} must be strictly increasing")
        if cfg["architecture"] == "resnet" and not all(split_resnet(resnet_blocks(cfg), kept)):
            raise SpecError(f"student.layers {kept} must keep at least one block of each resnet stage "
                            f"(blocks per stage: {resnet_blocks(cfg)})")
        return kept
    if num_layers is not None:
        if not min_depth <= num_layers <= depth:
            raise SpecError(f"student.num_layers {num_layers} must be between {min_depth} and the "
                            f"teacher's {depth} {unit}")
        return even_layers(cfg, num_layers)
    return list(range(depth))


def zoo_layer_map(cfg: dict[str, Any], kept: list[int]) -> dict[int, int]:
    """Student hidden index -> teacher hidden index (the ``hidden`` lists of ``forward_features``)."""
    arch = cfg["architecture"]
    if arch == "resnet":
        return {s: s for s in range(len(cfg["widths"]))}
    if arch == "transformer":
        return {0: 0, **{j + 1: i + 1 for j, i in enumerate(kept)}}
    mapping = dict(enumerate(kept))
    if arch in ("cnn", "cnn1d") and int(cfg.get("hidden", 0)):
        mapping[len(kept)] = len(cfg["channels"])
    return mapping
