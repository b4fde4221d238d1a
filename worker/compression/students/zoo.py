"""The project's own architecture zoo: small, exportable nets built from a JSON config.

A zoo config is a dict such as::

    {"architecture": "mlp", "task": "classification", "input_dim": 64,
     "hidden": [256, 256], "output_dim": 10}

Architectures and their keys (``task`` and ``output_dim`` always):

* ``mlp``: ``input_dim``, ``hidden`` (list of widths), ``activation`` (relu|gelu), ``dropout``.
* ``cnn``: images ``(C, H, W)``: ``in_channels``, ``input_size`` [H, W], ``channels``
  (one conv block each, 2× downsampling after each but the first), ``kernel_size``, ``hidden``.
* ``cnn1d``: signals ``(C, L)``: ``in_channels``, ``input_length``, ``channels``, ``kernel_size``, ``hidden``,
  ``pool`` (``mean`` over time, the default; ``flatten`` keeps where in the window each feature is, as a
  forecaster must: the head sees every position of the last block), ``frontend`` (``{"type": "logmel",
  "sample_rate", "n_fft", "hop", "n_mels"}``: waveforms ``(1, L)`` in, a log-mel spectrogram computed
  inside the model, `zoo_audio`).
* ``resnet``: images: ``in_channels``, ``input_size``, ``widths`` (one stage each),
  ``blocks_per_stage``.
* ``transformer``: token ids: ``vocab_size``, ``max_len``, ``dim``, ``num_layers``,
  ``num_heads``, ``ffn_dim``, ``pooling`` (cls|mean).
* ``ctr``: click-through tables (`zoo_ctr`): ``input_dim``, ``categorical`` (vocabularies with ``index``
  and ``size``), ``embedding_dim``, ``hidden``, ``interaction`` (concat|dot), ``activation``.

Every model is called as ``model(**inputs)`` and has ``forward_features`` (see types.py).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SpecError
from ..types import InputKind, ModelOutput
from .zoo_audio import LogMel, frames, frontend_config
from .zoo_ctr import CTR, check_ctr

ARCHITECTURES = ("mlp", "cnn", "cnn1d", "resnet", "transformer", "ctr")
TASKS = ("classification", "regression", "embedding")


def _act(name: str) -> nn.Module:
    if name == "relu":
        return nn.ReLU()
    if name == "gelu":
        return nn.GELU()
    raise SpecError(f"unknown activation {name!r} (use relu or gelu)")


class MLP(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        dims = [int(cfg["input_dim"]), *[int(h) for h in cfg.get("hidden", [])]]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.act = _act(cfg.get("activation", "relu"))
        self.dropout = nn.Dropout(float(cfg.get("dropout", 0.0)))
        self.head = nn.Linear(dims[-1], int(cfg["output_dim"]))

    def forward_features(self, x: torch.Tensor) -> ModelOutput:
        h = x.flatten(1)
        hidden = []
        for layer in self.layers:
            h = self.dropout(self.act(layer(h)))
            hidden.append(h)
        return ModelOutput(self.head(h), hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x).output


class ConvNet(nn.Module):
    """Shared body of ``cnn`` (2-D) and ``cnn1d``: conv-BN-ReLU blocks, then pool and head."""

    def __init__(self, cfg: dict[str, Any], dims: int) -> None:
        super().__init__()
        conv, bn, pool = (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d) if dims == 2 else (nn.Conv1d, nn.BatchNorm1d, nn.MaxPool1d)
        k = int(cfg.get("kernel_size", 3))
        front = frontend_config(cfg.get("frontend")) if dims == 1 else None
        self.frontend = LogMel(front) if front else None
        chans = [front["n_mels"] if front else int(cfg["in_channels"]), *[int(c) for c in cfg["channels"]]]
        self.blocks = nn.ModuleList()
        for i, (a, b) in enumerate(zip(chans[:-1], chans[1:])):
            layers: list[nn.Module] = []
            if i > 0:
                layers.append(pool(2, ceil_mode=True))
            layers += [conv(a, b, k, padding=k // 2), bn(b), nn.ReLU()]
            self.blocks.append(nn.Sequential(*layers))
        self.dims = dims
        self.flatten = cfg.get("pool", "mean") == "flatten"
        features = chans[-1] * flat_length(cfg) if self.flatten else chans[-1]
        hidden = int(cfg.get("hidden", 0))
        self.fc = nn.Sequential(nn.Linear(features, hidden), nn.ReLU()) if hidden else None
        self.head = nn.Linear(hidden or features, int(cfg["output_dim"]))

    def forward_features(self, x: torch.Tensor) -> ModelOutput:
        hidden = []
        h = x if self.frontend is None else self.frontend(x)
        for block in self.blocks:
            h = block(h)
            hidden.append(h)
        h = h.mean(dim=(2, 3)) if self.dims == 2 else h.flatten(1) if self.flatten else h.mean(dim=2)
        if self.fc is not None:
            h = self.fc(h)
            hidden.append(h)
        return ModelOutput(self.head(h), hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x).output


def flat_length(cfg: dict[str, Any]) -> int:
    """Time steps left after a cnn1d's blocks (each but the first halves them, rounding up)."""
    length = int(cfg["input_length"])
    front = frontend_config(cfg.get("frontend"))
    if front:
        length = frames(front, length)
    for _ in range(len(cfg["channels"]) - 1):
        length = math.ceil(length / 2)
    return length


class CNN(ConvNet):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__(cfg, 2)


class CNN1d(ConvNet):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__(cfg, 1)


class _BasicBlock(nn.Module):
    def __init__(self, a: int, b: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(a, b, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(b)
        self.conv2 = nn.Conv2d(b, b, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(b)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(a, b, 1, stride, bias=False), nn.BatchNorm2d(b))
            if stride != 1 or a != b
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        widths = [int(w) for w in cfg["widths"]]
        blocks = [int(b) for b in cfg.get("blocks_per_stage", [2] * len(widths))]
        if len(blocks) != len(widths):
            raise SpecError("resnet: blocks_per_stage must have one entry per width")
        self.stem = nn.Sequential(
            nn.Conv2d(int(cfg["in_channels"]), widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        self.stages = nn.ModuleList()
        prev = widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            stage = [_BasicBlock(prev if j == 0 else w, w, 2 if (i > 0 and j == 0) else 1) for j in range(n)]
            self.stages.append(nn.Sequential(*stage))
            prev = w
        self.head = nn.Linear(prev, int(cfg["output_dim"]))

    def forward_features(self, x: torch.Tensor) -> ModelOutput:
        h = self.stem(x)
        hidden = []
        for stage in self.stages:
            h = stage(h)
            hidden.append(h)
        return ModelOutput(self.head(h.mean(dim=(2, 3))), hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x).output


class _EncoderLayer(nn.Module):
    """Post-LN transformer encoder layer that also returns its attention probabilities."""

    def __init__(self, dim: int, heads: int, ffn: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise SpecError(f"transformer: dim {dim} is not divisible by num_heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.ln1 = nn.LayerNorm(dim)
        self.ff1 = nn.Linear(dim, ffn)
        self.ff2 = nn.Linear(ffn, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, mask_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, d = h.shape
        q, k, v = self.qkv(h).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads) + mask_bias
        probs = scores.softmax(-1)
        ctx = (self.drop(probs) @ v).transpose(1, 2).reshape(b, t, d)
        h = self.ln1(h + self.drop(self.out(ctx)))
        h = self.ln2(h + self.drop(self.ff2(F.gelu(self.ff1(h)))))
        return h, probs


class TransformerEncoder(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        dim = int(cfg["dim"])
        self.tok = nn.Embedding(int(cfg["vocab_size"]), dim)
        self.pos = nn.Embedding(int(cfg.get("max_len", 128)), dim)
        self.ln = nn.LayerNorm(dim)
        dropout = float(cfg.get("dropout", 0.0))
        self.layers = nn.ModuleList(
            _EncoderLayer(dim, int(cfg.get("num_heads", 4)), int(cfg.get("ffn_dim", 4 * dim)), dropout)
            for _ in range(int(cfg["num_layers"]))
        )
        self.pooling = cfg.get("pooling", "mean")
        if self.pooling not in ("mean", "cls"):
            raise SpecError("transformer: pooling must be 'mean' or 'cls'")
        self.head = nn.Linear(dim, int(cfg["output_dim"]))

    def forward_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> ModelOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        h = self.ln(self.tok(input_ids) + self.pos(positions)[None])
        mask = attention_mask.to(h.dtype)
        bias = (1.0 - mask)[:, None, None, :] * torch.finfo(h.dtype).min
        hidden, attentions = [h], []
        for layer in self.layers:
            h, probs = layer(h, bias)
            hidden.append(h)
            attentions.append(probs)
        if self.pooling == "cls":
            pooled = h[:, 0]
        else:
            pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)
        return ModelOutput(self.head(pooled), hidden, attentions)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.forward_features(input_ids, attention_mask).output


def _ctr(cfg: dict[str, Any]) -> CTR:
    return CTR(cfg, _act(cfg.get("activation", "relu")))


_BUILDERS = {"mlp": MLP, "cnn": CNN, "cnn1d": CNN1d, "resnet": ResNet, "transformer": TransformerEncoder, "ctr": _ctr}
_REQUIRED = {
    "mlp": ("input_dim",),
    "cnn": ("in_channels", "input_size", "channels"),
    "cnn1d": ("in_channels", "input_length", "channels"),
    "resnet": ("in_channels", "input_size", "widths"),
    "transformer": ("vocab_size", "dim", "num_layers"),
    "ctr": ("input_dim", "categorical", "hidden"),
}


def validate_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Check a zoo config and fill defaults (``task``); raise SpecError naming the problem."""
    if not isinstance(cfg, dict):
        raise SpecError("zoo config must be a JSON object")
    arch = cfg.get("architecture")
    if arch not in _BUILDERS:
        raise SpecError(f"unknown zoo architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    missing = [k for k in ("output_dim", *_REQUIRED[arch]) if k not in cfg]
    if missing:
        raise SpecError(f"zoo config for {arch!r} is missing {', '.join(missing)}")
    cfg = {"task": "classification", **cfg}
    if cfg.get("pool", "mean") not in ("mean", "flatten") or (cfg.get("pool") == "flatten" and arch != "cnn1d"):
        raise SpecError(f"pool {cfg.get('pool')!r}: 'mean', or 'flatten' for a cnn1d")
    if cfg.get("frontend") is not None:
        if arch != "cnn1d" or int(cfg.get("in_channels", 1)) != 1:
            raise SpecError("a frontend turns mono waveforms into spectrograms: a cnn1d with in_channels 1")
        try:
            frontend_config(cfg["frontend"])
        except (ValueError, TypeError, AttributeError) as exc:
            raise SpecError(f"frontend: {exc}") from exc
    if arch == "ctr":
        check_ctr(cfg)
    if cfg["task"] not in TASKS:
        raise SpecError(f"unknown task {cfg['task']!r}; known: {', '.join(TASKS)}")
    return cfg


def build(cfg: dict[str, Any]) -> nn.Module:
    """A freshly initialised zoo model for ``cfg``."""
    cfg = validate_config(cfg)
    try:
        return _BUILDERS[cfg["architecture"]](cfg)
    except (KeyError, TypeError, ValueError) as exc:
        raise SpecError(f"bad zoo config for {cfg['architecture']!r}: {exc}") from exc


def input_kind(cfg: dict[str, Any]) -> InputKind:
    return {"mlp": "vector", "ctr": "vector", "cnn": "image", "resnet": "image", "cnn1d": "signal", "transformer": "tokens"}[
        cfg["architecture"]
    ]


def input_shape(cfg: dict[str, Any]) -> tuple[int, ...]:
    arch = cfg["architecture"]
    if arch in ("mlp", "ctr"):
        return (int(cfg["input_dim"]),)
    if arch in ("cnn", "resnet"):
        h, w = cfg["input_size"]
        return (int(cfg["in_channels"]), int(h), int(w))
    if arch == "cnn1d":
        return (int(cfg["in_channels"]), int(cfg["input_length"]))
    return (int(cfg.get("max_len", 128)),)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
