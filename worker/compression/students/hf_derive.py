"""Smaller transformers students of a Hugging Face teacher: fewer (evenly spaced) layers, a narrower
feed-forward or hidden width (`derive_hf_student`), or any config of the teacher's model type
(`hf_student_from_config`)."""

from __future__ import annotations

import copy
import re
from typing import Any

import torch

from ..errors import SpecError
from ..types import Teacher
from .hf_model import (
    FFN,
    FFN_DEFAULT,
    HFEncoder,
    build_like,
    encoder_of,
    hf_layer_count,
)
from .hf_narrow import narrow_hidden

_LAYER_KEY = re.compile(
    r"^(?P<pre>(?:.*\.)?(?:(?:encoder|transformer)\.layer|vit\.layers)\.)(?P<idx>\d+)\.(?P<rest>.+)$")
"""One encoder layer's tensor: BERT family ``bert.encoder.layer.3.…``, ViT (in memory) ``vit.layers.3.…``."""


def same_token_map(enc: HFEncoder, config: Any) -> torch.Tensor | None:
    """A trimmed teacher's token map, for a student that keeps its (trimmed) vocabulary."""
    if enc.token_map is None or int(config.vocab_size) != int(enc.config.vocab_size):
        return None
    return enc.token_map.clone()


def choose_layers(total: int, layers: list[int] | None, num_layers: int | None) -> list[int]:
    if layers is not None:
        if not layers or len(set(layers)) != len(layers) or not all(0 <= i < total for i in layers):
            raise SpecError(f"student layers {layers} must be distinct teacher layers in 0..{total - 1}")
        return sorted(layers)
    n = num_layers if num_layers is not None else max(1, total // 2)
    if not 1 <= n <= total:
        raise SpecError(f"student num_layers {n} must be between 1 and the teacher's {total}")
    return [0] if n == 1 else [int(i * (total - 1) / (n - 1) + 0.5) for i in range(n)]


def derive_hf_student(teacher: Teacher, *, layers: list[int] | None = None, num_layers: int | None = None,
                      width_ratio: float | None = None, hidden_size: int | None = None,
                      calibration: dict[str, torch.Tensor] | None = None) -> tuple[HFEncoder, dict[int, int]]:
    """A smaller copy of the teacher and its default layer map.

    Layers: ``layers`` (distinct teacher layer indices, used in ascending order), else
    ``num_layers`` (default half) evenly spaced from the first to the last (6 -> [0, 3, 5],
    12 -> [0, 2, 4, 7, 9, 11]), as for zoo students. Keeping the last layer matters: the
    pooled output is read from it (all-MiniLM-L6-v2 -> 3 layers, cosine to the teacher before
    any training: 0.36 with [0, 2, 4], 0.66 with [0, 3, 5]). Embeddings, kept layers and the
    pooler / classifier are copied from the teacher.

    ``width_ratio`` < 1 narrows the feed-forward block of each kept layer to
    ``round(ffn * ratio)`` units, keeping those with the largest ``|w_in row| * |w_out column|``.
    ``width_ratio`` leaves attention heads alone: transformers ties the head size to
    ``hidden_size / num_attention_heads``, so fewer heads would change every head's shape.

    ``hidden_size`` below the teacher's narrows the residual stream (and the attention to
    fewer whole heads): see `hf_narrow.narrow_hidden`; ``calibration`` (token inputs, a few
    dozen texts) lets it rank dimensions and heads by their activations instead of weights.
    A trimmed teacher's token map comes along.

    The layer map is ``{student hidden index: teacher hidden index}`` in ``forward_features``
    indexing: 0 (embeddings) -> 0, student layer i+1 -> teacher layer ``kept[i] + 1``.
    """
    enc = encoder_of(teacher)
    kept = choose_layers(hf_layer_count(teacher), layers, num_layers)
    if hidden_size is not None and enc.input_names == ("x",):
        raise SpecError("narrowing the hidden size of a vision transformer is not supported; use width_ratio")
    if width_ratio is not None and not 0.0 < width_ratio <= 1.0:
        raise SpecError(f"width_ratio {width_ratio} must be in (0, 1]")
    ffn_in, ffn_out, ffn_key = FFN.get(enc.config.model_type, FFN_DEFAULT)
    config = copy.deepcopy(enc.config)
    config.num_hidden_layers = len(kept)
    width = int(getattr(config, ffn_key))
    new_width = width if width_ratio is None else max(1, round(width * width_ratio))
    setattr(config, ffn_key, new_width)

    src = enc.backbone.state_dict()
    state: dict[str, torch.Tensor] = {}
    units: dict[int, torch.Tensor] = {}
    for key, value in src.items():
        m = _LAYER_KEY.match(key)
        if m is None:
            state[key] = value.clone()
            continue
        t = int(m["idx"])
        if t not in kept:
            continue
        pre, rest = m["pre"], m["rest"]
        if new_width < width and t not in units:
            w_in, w_out = src[f"{pre}{t}.{ffn_in}.weight"], src[f"{pre}{t}.{ffn_out}.weight"]
            score = w_in.norm(dim=1) * w_out.norm(dim=0)
            units[t] = score.topk(new_width).indices.sort().values
        if t in units and rest in (f"{ffn_in}.weight", f"{ffn_in}.bias"):
            value = value[units[t]]
        elif t in units and rest == f"{ffn_out}.weight":
            value = value[:, units[t]]
        state[f"{pre}{kept.index(t)}.{rest}"] = value.clone()

    layer_map = {0: 0, **{i + 1: t + 1 for i, t in enumerate(kept)}}
    project = copy.deepcopy(enc.project)
    if hidden_size is not None and int(hidden_size) != int(config.hidden_size):
        state, config, project = narrow_hidden(enc, state, config, int(hidden_size), layer_map, calibration)
    token_map = None if enc.token_map is None else enc.token_map.clone()
    student = build_like(enc, config, token_map=token_map, project=project)
    student.backbone.load_state_dict(state, strict=True)
    return student, layer_map


def hf_student_from_config(teacher: Teacher, hf_config: dict[str, Any]) -> tuple[HFEncoder, dict[int, int]]:
    """A new model of the teacher's type from ``hf_config`` merged over the teacher's config.

    Same task, pooling and labels. Embedding tensors (word, position, token type, LayerNorm)
    are copied from the teacher where their shapes match; the rest is freshly initialised.
    The layer map spreads the student's layers evenly over the teacher's (last -> last).
    """
    enc = encoder_of(teacher)
    base = enc.config
    if not isinstance(hf_config, dict):
        raise SpecError("student.hf_config must be a JSON object")
    if hf_config.get("model_type", base.model_type) != base.model_type:
        raise SpecError(f"student.hf_config model_type {hf_config['model_type']!r} differs from the "
                        f"teacher's {base.model_type!r}")
    merged = base.to_dict()
    aliases = getattr(type(base), "attribute_map", {})
    for key, value in hf_config.items():
        key = aliases.get(key, key)
        if key not in merged:
            raise SpecError(f"student.hf_config: {key!r} is not a {base.model_type} config key")
        merged[key] = value
    try:
        config = type(base).from_dict(merged)
    except (ValueError, TypeError) as exc:
        raise SpecError(f"bad student.hf_config: {exc}") from exc
    student = build_like(enc, config, token_map=same_token_map(enc, config))

    src, dst = enc.backbone.state_dict(), student.backbone.state_dict()
    copied = {k: src[k] for k, v in dst.items()
              if ".embeddings." in f".{k}" and k in src and src[k].shape == v.shape}
    student.backbone.load_state_dict(copied, strict=False)
    n, total = int(config.num_hidden_layers), hf_layer_count(teacher)
    return student, {i: i * total // n for i in range(n + 1)}
