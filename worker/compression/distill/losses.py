"""Distillation losses: soft targets, hard labels, embeddings, features and attention maps.

Every loss computes in float32 (inputs may come from bf16 autocast) and returns a scalar.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SpecError

_EPS = 1e-12
IGNORE_INDEX = -100
"""A token position without a label (`measure.entities.IGNORE`)."""


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton KD: KL(p_T ‖ p_S) on temperature-softened logits, batch mean, times T².

    The T² factor keeps the soft-target gradients on the same scale as the hard-label ones.
    """
    t = float(temperature)
    log_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(log_s, log_t, reduction="batchmean", log_target=True) * (t * t)


def kd_kl_topk(
    student_logits: torch.Tensor, topk_values: torch.Tensor, topk_indices: torch.Tensor, temperature: float
) -> torch.Tensor:
    """KD against a teacher cached as its top-k logits only.

    Approximation: the teacher distribution is the softmax of its top-k logits alone
    (renormalised, the tail's mass is dropped); the student's log-probabilities are a
    softmax over *all* classes gathered at the teacher's top-k indices, so mass the student
    puts outside the top-k is still penalised. With k = number of classes this is exactly
    :func:`kd_kl`.
    """
    t = float(temperature)
    log_s = F.log_softmax(student_logits.float() / t, dim=-1).gather(-1, topk_indices.long())
    log_t = F.log_softmax(topk_values.float() / t, dim=-1)
    return (log_t.exp() * (log_t - log_s)).sum(-1).mean() * (t * t)


def token_kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, y: torch.Tensor | None,
                temperature: float) -> torch.Tensor:
    """Per-token KD for token classification: `kd_kl` over the labelled tokens only (``y`` != -100: the
    words' first subwords; every position without labels). The student may see a batch trimmed of its
    trailing padding (`types.trim_padding`): the teacher's logits and the labels are cut to its length."""
    length = student_logits.shape[1]
    s, t = student_logits[:, :length], teacher_logits[:, :length]
    if y is None:
        return kd_kl(s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1]), temperature)
    mask = y[:, :length] != IGNORE_INDEX
    if not mask.any():
        return student_logits.sum() * 0.0
    return kd_kl(s[mask], t[mask], temperature)


def token_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on per-token labels (-100 ignored), the labels cut to the (trimmed) batch length."""
    y = y[:, : logits.shape[1]].long()
    if not (y != IGNORE_INDEX).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX)


def hard_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on class-index labels."""
    return F.cross_entropy(logits.float(), y.long())


def embedding_loss(
    student: torch.Tensor, teacher: torch.Tensor, kind: Literal["cosine", "mse"]
) -> torch.Tensor:
    """``1 - mean cosine`` (direction only) or MSE (direction and scale) between embeddings."""
    s, t = student.float(), teacher.float()
    if kind == "cosine":
        return 1.0 - F.cosine_similarity(s, t, dim=-1).mean()
    if kind == "mse":
        return F.mse_loss(s, t)
    raise SpecError(f"unknown embedding loss {kind!r} (use cosine or mse)")


def regression_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE; a ``(B,)`` target is matched against a ``(B, 1)`` prediction."""
    return F.mse_loss(pred.float(), target.float().reshape(pred.shape))


def default_layer_map(n_student: int, n_teacher: int) -> dict[int, int]:
    """Evenly spaced student → teacher hidden-state indices; the last maps to the last."""
    if n_student <= 0 or n_teacher <= 0:
        return {}
    return {i: max(0, round((i + 1) * n_teacher / n_student) - 1) for i in range(n_student)}


def _resolve_index(i: int, n: int, who: str) -> int:
    j = i + n if i < 0 else i
    if not 0 <= j < n:
        raise SpecError(
            f"layer_map: {who} hidden index {i} is out of range (the {who} has {n} hidden states)"
        )
    return j


def _channels(shape: torch.Size, tokens: bool) -> int:
    return shape[-1] if tokens and len(shape) == 3 else shape[1]


def _to_vector(h: torch.Tensor, tokens: bool) -> torch.Tensor:
    """Average every non-channel dimension away: (B, D), (B, T, D) or (B, C, ...) → (B, C)."""
    if h.ndim == 2:
        return h
    return h.mean(1) if tokens and h.ndim == 3 else h.flatten(2).mean(-1)


def _identity_init(module: nn.Module) -> None:
    """Square projections start as the identity, so layers copied from the teacher start matched."""
    weight = module.weight
    with torch.no_grad():
        weight.zero_()
        eye = torch.eye(weight.shape[0], dtype=weight.dtype)
        weight.view(weight.shape[0], weight.shape[1], -1)[:, :, 0] = eye
        if module.bias is not None:
            module.bias.zero_()


def _projection(s_shape: torch.Size, t_shape: torch.Size, tokens: bool) -> nn.Module:
    cs, ct = _channels(s_shape, tokens), _channels(t_shape, tokens)
    rank = len(s_shape)
    if rank != len(t_shape) or rank == 2 or (tokens and rank == 3):
        proj: nn.Module = nn.Linear(cs, ct)
    elif rank == 3:
        proj = nn.Conv1d(cs, ct, 1)
    elif rank == 4:
        proj = nn.Conv2d(cs, ct, 1)
    else:
        raise SpecError(f"feature matching: unsupported hidden shapes {list(s_shape)} / {list(t_shape)}")
    if cs == ct:
        _identity_init(proj)
    return proj


class FeatureProjector(nn.Module):
    """Learned projections from student hidden states to the mapped teacher hidden states.

    One projection per mapped pair: ``Linear`` for ``(B, D)`` and token states ``(B, T, D)``,
    a 1×1 convolution for channel-first maps ``(B, C, L)`` / ``(B, C, H, W)``; the larger of
    two spatial (or token) grids is average-pooled to the smaller. Pairs of different rank
    (a conv map against a vector) are both averaged to ``(B, C)`` first. ``tokens`` says
    that 3-D states are ``(B, T, D)`` rather than ``(B, C, L)``.
    Trained with the student, then thrown away.
    """

    def __init__(
        self,
        student_hidden: Sequence[torch.Tensor],
        teacher_hidden: Sequence[torch.Tensor],
        layer_map: dict[int, int],
        *,
        kind: Literal["mse", "cosine"] = "mse",
        tokens: bool = False,
    ) -> None:
        super().__init__()
        if kind not in ("mse", "cosine"):
            raise SpecError(f"unknown feature loss {kind!r} (use mse or cosine)")
        if not layer_map:
            raise SpecError("feature matching needs at least one mapped layer (layer_map is empty)")
        self.kind = kind
        self.tokens = tokens
        ns, nt = len(student_hidden), len(teacher_hidden)
        self.pairs = sorted(
            (_resolve_index(s, ns, "student"), _resolve_index(t, nt, "teacher")) for s, t in layer_map.items()
        )
        self.projections = nn.ModuleList(
            _projection(student_hidden[s].shape, teacher_hidden[t].shape, tokens) for s, t in self.pairs
        )

    def _align(self, s: torch.Tensor, t: torch.Tensor, proj: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        if s.ndim != t.ndim:
            return proj(_to_vector(s, self.tokens)), _to_vector(t, self.tokens)
        s = proj(s)
        if s.ndim == 2:
            return s, t
        if self.tokens and s.ndim == 3:  # (B, T, D) → channel-first (B, D, T) like every other map
            s, t = s.transpose(1, 2), t.transpose(1, 2)
        if s.shape[2:] != t.shape[2:]:
            size = tuple(min(a, b) for a, b in zip(s.shape[2:], t.shape[2:], strict=True))
            pool = F.adaptive_avg_pool1d if s.ndim == 3 else F.adaptive_avg_pool2d
            s, t = pool(s, size), pool(t, size)
        return s, t

    def forward(
        self, student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        total = None
        for (si, ti), proj in zip(self.pairs, self.projections, strict=True):
            s, t = self._align(student_hidden[si], teacher_hidden[ti].detach(), proj)
            s, t = s.float(), t.float()
            if self.kind == "mse":
                loss = F.mse_loss(s, t)
            else:
                loss = 1.0 - F.cosine_similarity(s, t, dim=1).mean()  # aligned maps are channel-first
            total = loss if total is None else total + loss
        assert total is not None
        return total / len(self.pairs)


def attention_loss(
    student_attn: Sequence[torch.Tensor], teacher_attn: Sequence[torch.Tensor], layer_map: dict[int, int]
) -> torch.Tensor:
    """Attention-map matching: KL(teacher row ‖ student row), averaged over rows, heads, layers.

    Maps are attention probabilities ``(B, heads, T, T)``. When head counts differ both sides
    are averaged over heads first. KL (as in MiniLM) rather than MSE because each row is a
    distribution; identical maps give exactly 0.
    """
    if not layer_map:
        raise SpecError("attention matching needs at least one mapped layer")
    total = None
    for si, ti in sorted(layer_map.items()):
        s = student_attn[_resolve_index(si, len(student_attn), "student")].float()
        t = teacher_attn[_resolve_index(ti, len(teacher_attn), "teacher")].detach().float()
        if s.shape[-1] != t.shape[-1]:
            raise SpecError(f"attention matching: sequence lengths differ ({s.shape[-1]} vs {t.shape[-1]})")
        if s.shape[1] != t.shape[1]:
            s, t = s.mean(1, keepdim=True), t.mean(1, keepdim=True)
        kl = (t * (t.clamp_min(_EPS).log() - s.clamp_min(_EPS).log())).sum(-1).mean()
        total = kl if total is None else total + kl
    assert total is not None
    return total / len(layer_map)
