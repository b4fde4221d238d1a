"""Parameter counts from configs, torch-free: what a zoo architecture or a transformers config would
build, counted before anything is built (the API's cost checks, `service.api.costs`; the upload
validation of Hugging Face folders). Counts are exact for the zoo's layers and close (within the
small terms: norms, biases) for transformers configs."""

from __future__ import annotations

import math
from itertools import pairwise
from typing import Any

from .frontend import frames, frontend_config


def _int(cfg: dict[str, Any], key: str, default: int = 0) -> int:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{key} must be a number, got {value!r}")
    return int(value)


def _ints(cfg: dict[str, Any], key: str) -> list[int]:
    values = cfg.get(key) or []
    if not isinstance(values, list):
        raise TypeError(f"{key} must be a list")
    return [int(v) for v in values]


def zoo_parameters(cfg: dict[str, Any], input_shape: list[int] | None = None,
                   output_dim: int | None = None) -> int | None:  # fmt: skip
    """Parameters of a zoo architecture config (missing input/output sizes from the teacher's); None
    for an architecture this module does not count (the job checks the name itself)."""
    arch = cfg.get("architecture")
    out = _int(cfg, "output_dim", output_dim or 1)
    if arch == "mlp":
        dims = [_int(cfg, "input_dim", math.prod(input_shape or [1])), *_ints(cfg, "hidden"), out]
        return sum(a * b + b for a, b in pairwise(dims))
    if arch in ("cnn", "cnn1d"):
        k = _int(cfg, "kernel_size", 3)
        kernel = k * k if arch == "cnn" else k
        chans = [_int(cfg, "in_channels", (input_shape or [1])[0]), *_ints(cfg, "channels")]
        front = frontend_config(cfg.get("frontend")) if arch == "cnn1d" else None
        if front:
            chans[0] = front["n_mels"]
        total = sum(kernel * a * b + b + 2 * b for a, b in pairwise(chans))
        hidden = _int(cfg, "hidden", 0)
        features = chans[-1]
        if arch == "cnn1d" and cfg.get("pool") == "flatten":
            length = _int(cfg, "input_length", (input_shape or [1, 1])[-1])
            if front:
                length = frames(front, length)
            for _ in range(len(chans) - 2):
                length = math.ceil(length / 2)
            features *= length
        head_in = hidden or features
        return total + (features * hidden + hidden if hidden else 0) + head_in * out + out
    if arch == "resnet":
        widths = _ints(cfg, "widths")
        blocks = _ints(cfg, "blocks_per_stage") or [2] * len(widths)
        if not widths:
            return None
        prev = widths[0]
        total = 9 * _int(cfg, "in_channels", (input_shape or [3])[0]) * prev + 2 * prev  # stem conv + BN
        for stage, (width, count) in enumerate(zip(widths, blocks, strict=False)):
            for j in range(count):
                a = prev if j == 0 else width
                strided = stage > 0 and j == 0
                total += 9 * a * width + 9 * width * width + 4 * width  # two convs, two BNs
                total += a * width + 2 * width if strided or a != width else 0  # the shortcut
            prev = width
        return total + prev * out + out
    if arch == "transformer":
        dim = _int(cfg, "dim")
        ffn = _int(cfg, "ffn_dim", 4 * dim)
        layers = _int(cfg, "num_layers")
        embed = (_int(cfg, "vocab_size") + _int(cfg, "max_len", 128)) * dim
        return embed + 2 * dim + layers * (4 * dim * dim + 2 * dim * ffn + ffn + 9 * dim) + dim * out + out
    return None


def hf_parameters(cfg: dict[str, Any]) -> int:
    """About the parameters of a BERT-family transformers config (embeddings and encoder layers)."""
    hidden = _int(cfg, "hidden_size", 768)
    layers = _int(cfg, "num_hidden_layers", 12)
    inter = _int(cfg, "intermediate_size", 4 * hidden)
    embed = (_int(cfg, "vocab_size", 30522) + _int(cfg, "max_position_embeddings", 512)
             + _int(cfg, "type_vocab_size", 2)) * hidden  # fmt: skip
    return embed + layers * (4 * hidden * hidden + 2 * hidden * inter + 9 * hidden + inter)


TEACHER_BATCH = 256
"""The teacher's outputs are computed in batches of at least this (the engine's ``EVAL_BATCH``)."""

TRAINING_BYTES_PER_PARAMETER = 16
"""fp32 weights, gradients and AdamW's two moments."""


def describe_bytes(n: float) -> str:
    """``3.0 GiB``, ``48 MiB``: sizes in refusals."""
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"
