"""Initialising a derived zoo student from its teacher (`init_from_teacher`).

---------------------------------------------------
Every tensor axis belongs to a *channel space* of the teacher: a hidden layer's units, a conv
block's channels, a resnet stage's residual channels, a transformer's residual stream, one
layer's attention or feed-forward units (kernel axes belong to none). A student tensor is the
teacher tensor indexed, along each axis, by ``select(space, n)``: the ``n`` most important units
of that space, in their original order (all of them when ``n`` is the full size). Selection
depends on the space alone, so the units a layer keeps are the inputs the next layer keeps, and
BatchNorm / LayerNorm parameters and running statistics follow their channels. A unit's
importance is the L2 norm of every teacher parameter that writes to or reads from it (incoming
row and bias, norm scale and shift, outgoing column); ties keep the leading units. Attention
units are chosen per head, the same ones for q, k and v. Tensors whose shape cannot be met (a
teacher tensor that is missing, smaller, or has another kernel size) keep their fresh
initialisation. With every layer at full width the student is an exact copy of the teacher.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ..errors import SpecError
from . import zoo
from .student import InitReport
from .zoo_ctr import CTR
from .zoo_layers import split_resnet


@torch.no_grad()
def init_from_teacher(student: nn.Module, teacher: nn.Module, kept_layers: Sequence[int]) -> InitReport:
    """Copy the teacher's weights into a derived zoo student, where shapes allow (module doc)."""
    pairs = _PAIRS.get(type(teacher))
    if pairs is None or type(student) is not type(teacher):
        raise SpecError(f"cannot initialise a {type(student).__name__} from a {type(teacher).__name__}")
    selector = _Selector(pairs(teacher, teacher, list(range(_module_depth(teacher)))))
    report = InitReport()
    for s_tensor, t_tensor, axes in pairs(student, teacher, list(kept_layers)):
        outcome = selector.copy(s_tensor, t_tensor, axes)
        report.full += outcome == "full"
        report.partial += outcome == "partial"
    report.none = len(student.state_dict()) - report.full - report.partial
    return report


@dataclass(frozen=True)
class _Space:
    name: str
    repeat: int = 1
    """The axis stacks ``repeat`` copies of the space (fused q/k/v rows)."""
    groups: int = 1
    """Units are chosen evenly per group (attention heads)."""


_Axes = tuple[_Space | None, ...]
_Pair = tuple[torch.Tensor, torch.Tensor | None, _Axes]
"""(student tensor, teacher tensor or None, the teacher tensor's axis spaces)."""


def _leaf(s: nn.Module, t: nn.Module | None, out: _Space, inp: _Space | None = None) -> list[_Pair]:
    """Pairs for one layer: weights are (out, in, *kernel); 1-D tensors follow ``out``."""
    t_state = t.state_dict(keep_vars=True) if t is not None and type(t) is type(s) else {}
    pairs: list[_Pair] = []
    for name, tensor in s.state_dict(keep_vars=True).items():
        axes: _Axes = (out, inp, *[None] * (tensor.ndim - 2)) if tensor.ndim >= 2 else (out,) * tensor.ndim
        pairs.append((tensor, t_state.get(name), axes))
    return pairs


_IN, _OUT = _Space("input"), _Space("output")


def _mlp_pairs(s: zoo.MLP, t: zoo.MLP, kept: list[int]) -> list[_Pair]:
    def h(i: int) -> _Space:
        return _IN if i < 0 else _Space(f"h{i}")

    pairs = [p for j, i in enumerate(kept) for p in _leaf(s.layers[j], t.layers[i], h(i), h(i - 1))]
    return pairs + _leaf(s.head, t.head, _OUT, h(len(t.layers) - 1))


def _ctr_pairs(s: CTR, t: CTR, kept: list[int]) -> list[_Pair]:
    """Tables keep their most important embedding units (one space for every table and the dot's bottom
    layer); the MLP's first layer reads a concatenation, copied only where the shapes agree."""
    emb = _Space("embedding")
    pairs = [(st.weight, tt.weight, (None, emb)) for st, tt in zip(s.embeddings, t.embeddings)]
    if s.bottom is not None:
        pairs += _leaf(s.bottom, t.bottom, emb, None)

    def h(i: int) -> _Space:
        return _Space(f"h{i}")

    for j, i in enumerate(kept):
        pairs += _leaf(s.layers[j], t.layers[i], h(i), h(i - 1) if i > 0 else None)
    return pairs + _leaf(s.head, t.head, _OUT, h(len(t.layers) - 1) if len(t.layers) else None)


def _conv_parts(block: nn.Sequential) -> tuple[nn.Module, nn.Module]:
    conv = next(m for m in block if isinstance(m, (nn.Conv1d, nn.Conv2d)))
    norm = next(m for m in block if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)))
    return conv, norm


def _convnet_pairs(s: zoo.ConvNet, t: zoo.ConvNet, kept: list[int]) -> list[_Pair]:
    def c(i: int) -> _Space:
        return _IN if i < 0 else _Space(f"c{i}")

    pairs: list[_Pair] = []
    for j, i in enumerate(kept):
        (s_conv, s_bn), (t_conv, t_bn) = _conv_parts(s.blocks[j]), _conv_parts(t.blocks[i])
        pairs += _leaf(s_conv, t_conv, c(i), c(i - 1)) + _leaf(s_bn, t_bn, c(i))
    last: _Space | None = c(len(t.blocks) - 1)
    if getattr(t, "flatten", False):  # (channels × positions) inputs: copied only where the shapes agree
        last = None
    if s.fc is not None:
        fc = _Space("fc")
        pairs += _leaf(s.fc[0], t.fc[0] if t.fc is not None else None, fc, last)
        last = fc
    return pairs + _leaf(s.head, t.head, _OUT, last)


def _resnet_pairs(s: zoo.ResNet, t: zoo.ResNet, kept: list[int]) -> list[_Pair]:
    def stage(i: int) -> _Space:
        return _Space(f"stage{i}")

    pairs = _leaf(s.stem[0], t.stem[0], stage(0), _IN) + _leaf(s.stem[1], t.stem[1], stage(0))
    per_stage = split_resnet([len(st) for st in t.stages], kept)
    for si, local in enumerate(per_stage):
        for j, b in enumerate(local):
            sb, tb = s.stages[si][j], t.stages[si][b]
            inp, out, mid = stage(si - 1 if b == 0 and si > 0 else si), stage(si), _Space(f"s{si}b{b}")
            pairs += (_leaf(sb.conv1, tb.conv1, mid, inp) + _leaf(sb.bn1, tb.bn1, mid)
                      + _leaf(sb.conv2, tb.conv2, out, mid) + _leaf(sb.bn2, tb.bn2, out))
            if isinstance(sb.shortcut, nn.Sequential):
                t_short = tb.shortcut if isinstance(tb.shortcut, nn.Sequential) else None
                pairs += (_leaf(sb.shortcut[0], t_short[0] if t_short else None, out, inp)
                          + _leaf(sb.shortcut[1], t_short[1] if t_short else None, out))
    return pairs + _leaf(s.head, t.head, _OUT, stage(len(t.stages) - 1))


def _transformer_pairs(s: zoo.TransformerEncoder, t: zoo.TransformerEncoder, kept: list[int]) -> list[_Pair]:
    res = _Space("residual")
    pairs = (_leaf(s.tok, t.tok, _Space("vocab"), res) + _leaf(s.pos, t.pos, _Space("position"), res)
             + _leaf(s.ln, t.ln, res))
    for j, i in enumerate(kept):
        sl, tl = s.layers[j], t.layers[i]
        attn, ffn = _Space(f"attn{i}", groups=tl.heads), _Space(f"ffn{i}")
        pairs += (_leaf(sl.qkv, tl.qkv, _Space(attn.name, repeat=3, groups=tl.heads), res)
                  + _leaf(sl.out, tl.out, res, attn) + _leaf(sl.ln1, tl.ln1, res)
                  + _leaf(sl.ff1, tl.ff1, ffn, res) + _leaf(sl.ff2, tl.ff2, res, ffn) + _leaf(sl.ln2, tl.ln2, res))
    return pairs + _leaf(s.head, t.head, _OUT, res)


_PAIRS: dict[type, Callable[[Any, Any, list[int]], list[_Pair]]] = {
    zoo.MLP: _mlp_pairs,
    CTR: _ctr_pairs,
    zoo.CNN: _convnet_pairs,
    zoo.CNN1d: _convnet_pairs,
    zoo.ResNet: _resnet_pairs,
    zoo.TransformerEncoder: _transformer_pairs,
}


def _module_depth(module: nn.Module) -> int:
    if isinstance(module, zoo.ResNet):
        return sum(len(stage) for stage in module.stages)
    return len(module.blocks if isinstance(module, zoo.ConvNet) else module.layers)


class _Selector:
    """Importance of every teacher unit, and the copy rule of the module doc."""

    def __init__(self, teacher_pairs: list[_Pair]) -> None:
        self.sizes: dict[str, int] = {}
        self.importance: dict[str, torch.Tensor] = {}
        for _, t, axes in teacher_pairs:
            assert t is not None
            for axis, space in enumerate(axes):
                if space is None:
                    continue
                size = t.shape[axis] // space.repeat
                self.sizes[space.name] = size
                if isinstance(t, nn.Parameter):
                    sq = t.detach().float().movedim(axis, 0).reshape(space.repeat, size, -1).pow(2).sum(dim=(0, 2))
                    self.importance[space.name] = self.importance.get(space.name, 0) + sq

    def select(self, space: _Space, n: int) -> torch.Tensor | None:
        """The ``n`` most important units of ``space`` in ascending order, or None if it has fewer."""
        size = self.sizes[space.name]
        if n > size or n % space.groups:
            return None
        if n == size:
            return torch.arange(size)
        per_group = self.importance[space.name].view(space.groups, -1)
        order = torch.argsort(per_group, dim=1, descending=True, stable=True)[:, : n // space.groups]
        offsets = torch.arange(space.groups)[:, None] * (size // space.groups)
        return (order + offsets).flatten().sort().values

    def copy(self, s: torch.Tensor, t: torch.Tensor | None, axes: _Axes) -> Literal["full", "partial", "none"]:
        if t is None or t.ndim != s.ndim:
            return "none"
        sliced = False
        for axis, space in enumerate(axes):
            if space is None:
                if t.shape[axis] != s.shape[axis]:
                    return "none"
                continue
            if s.shape[axis] % space.repeat:
                return "none"
            idx = self.select(space, s.shape[axis] // space.repeat)
            if idx is None:
                return "none"
            size = self.sizes[space.name]
            if len(idx) < size:
                sliced = True
                t = t.index_select(axis, torch.cat([idx + r * size for r in range(space.repeat)]))
        s.copy_(t.detach().to(s.dtype))
        return "partial" if sliced else "full"
