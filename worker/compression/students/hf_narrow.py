"""Narrowing a transformers student's hidden width (`narrow_hidden`): the most important residual
dimensions, consistently in every tensor that reads or writes the residual stream, and whole
attention heads (see `narrow_hidden`). Called through ``hf_derive.derive_hf_student(hidden_size=...)``.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import SpecError
from .hf_model import HFEncoder, build_like

_NORM_TOKENS = 4096
"""Tokens per LayerNorm kept for its statistics."""
_NARROWABLE = frozenset({"bert", "roberta", "xlm-roberta", "distilbert"})
_RIDGE = 1.0
"""Ridge strength of the output-projection fit (towards putting the kept dimensions back), relative
to the student features' mean variance; 0.1 and 10 did worse on MiniLM."""


_RES, _ATTN, _FFN, _POOL = "res", "attn", "ffn", "pool"
_RULES: list[tuple[re.Pattern[str], tuple[str | None, ...]]] = [
    (re.compile(p), axes)
    for p, axes in [
        (r"embeddings\.(word|position|token_type)_embeddings\.weight$", (None, _RES)),
        (r"embeddings\.LayerNorm\.(weight|bias)$", (_RES,)),
        (r"attention\.(self\.(query|key|value)|[qkv]_lin)\.weight$", (_ATTN, _RES)),
        (r"attention\.(self\.(query|key|value)|[qkv]_lin)\.bias$", (_ATTN,)),
        (r"attention\.(output\.dense|out_lin)\.weight$", (_RES, _ATTN)),
        (r"attention\.(output\.dense|out_lin)\.bias$", (_RES,)),
        (r"(output\.LayerNorm|sa_layer_norm|output_layer_norm)\.(weight|bias)$", (_RES,)),
        (r"(intermediate\.dense|ffn\.lin1)\.weight$", (_FFN, _RES)),
        (r"(intermediate\.dense|ffn\.lin1)\.bias$", (_FFN,)),
        (r"(output\.dense|ffn\.lin2)\.weight$", (_RES, _FFN)),
        (r"(output\.dense|ffn\.lin2)\.bias$", (_RES,)),
        (r"(pooler\.dense|pre_classifier|classifier\.dense)\.weight$", (_POOL, _RES)),
        (r"(pooler\.dense|pre_classifier|classifier\.dense)\.bias$", (_POOL,)),
        (r"(classifier|classifier\.out_proj)\.weight$", (None, _POOL)),
        (r"(classifier|classifier\.out_proj)\.bias$", (None,)),
    ]
]
"""Which channel space each axis of a tensor belongs to (first matching rule wins): the residual
stream, one layer's attention (heads × head size) or feed-forward units, or the head's pooled
space (pooler / pre-classifier output, read by the classifier)."""
_LAYER = re.compile(r"(?:encoder|transformer)\.layer\.(\d+)\.")


def head_size(config: Any) -> int:
    return int(config.hidden_size) // int(config.num_attention_heads)


def narrowed_config(config: Any, hidden_size: int) -> Any:
    """``config`` with ``hidden_size`` and as many heads of the same head size as fit in it."""
    if config.model_type not in _NARROWABLE:
        raise SpecError(f"narrowing the hidden size supports {', '.join(sorted(_NARROWABLE))}, "
                        f"not {config.model_type}")
    width, size = int(config.hidden_size), head_size(config)
    if not 0 < hidden_size <= width or hidden_size % size:
        raise SpecError(f"student hidden_size {hidden_size} must be a multiple of the head size {size} "
                        f"between {size} and the teacher's {width}")
    out = copy.deepcopy(config)
    out.hidden_size, out.num_attention_heads = hidden_size, hidden_size // size
    return out


def _axes(key: str) -> tuple[str | None, ...]:
    for pattern, axes in _RULES:
        if pattern.search(key):
            return axes
    raise SpecError(f"cannot narrow the hidden size: no rule for tensor {key!r}")


@dataclass
class _Stats:
    residual: torch.Tensor
    """Mean squared activation of each residual dimension."""
    heads: dict[int, torch.Tensor]
    """Teacher layer -> per-head output energy."""
    norm_inputs: dict[str, torch.Tensor]
    """Teacher LayerNorm (backbone module name) -> its inputs at the real tokens, (tokens, hidden)."""


@torch.no_grad()
def _activations(enc: HFEncoder, inputs: Mapping[str, torch.Tensor], hidden_idx: list[int]) -> _Stats:
    """Mean squared activation of each residual dimension over the real tokens of the teacher's
    hidden states ``hidden_idx``, each teacher layer's per-head output energy
    ``E‖context_h W_O[:, h]ᵀ‖²`` (read at the attention output projection's input), and what
    every LayerNorm reads."""
    layers = enc.backbone.get_submodule(_layers_path(enc))
    contexts: dict[int, torch.Tensor] = {}
    norm_inputs: dict[str, torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(layers):
        out_proj = _attention_output(layer)

        def grab(_m: nn.Module, args: tuple[torch.Tensor, ...], i: int = i) -> None:
            contexts[i] = args[0].detach()
        hooks.append(out_proj.register_forward_pre_hook(grab))
    for name, module in enc.backbone.named_modules():
        if isinstance(module, nn.LayerNorm):
            def grab_norm(_m: nn.Module, args: tuple[torch.Tensor, ...], name: str = name) -> None:
                norm_inputs[name] = args[0].detach()
            hooks.append(module.register_forward_pre_hook(grab_norm))
    try:
        was_training = enc.training
        enc.eval()
        feats = enc.forward_features(**inputs)
        enc.train(was_training)
    finally:
        for h in hooks:
            h.remove()
    mask = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"])).to(torch.bool)
    res = torch.stack([feats.hidden[i][mask].float().pow(2).mean(0) for i in hidden_idx]).mean(0)
    size, heads = head_size(enc.config), int(enc.config.num_attention_heads)
    per_head: dict[int, torch.Tensor] = {}
    for i, ctx in contexts.items():
        w = _attention_output(layers[i]).weight.float()  # (hidden, heads*size)
        ctx = ctx[mask].float().view(-1, heads, size)
        per_head[i] = torch.stack([(ctx[:, h] @ w[:, h * size:(h + 1) * size].T).pow(2).sum(1).mean()
                                   for h in range(heads)])
    return _Stats(res, per_head, {k: v[mask][:_NORM_TOKENS].float() for k, v in norm_inputs.items()})


def _norm_scale(z: torch.Tensor, kept: torch.Tensor, eps: float) -> torch.Tensor:
    """E[σ_kept / σ_all] over tokens: how much larger a LayerNorm's output gets when it
    normalises over the kept dimensions only (its weight is multiplied by this to undo it)."""
    full = (z.var(1, unbiased=False) + eps).sqrt()
    part = (z[:, kept].var(1, unbiased=False) + eps).sqrt()
    return (part / full).mean()


def _layers_path(enc: HFEncoder) -> str:
    return next(n for n, m in enc.backbone.named_modules()
                if isinstance(m, nn.ModuleList) and re.search(r"(encoder|transformer)\.layer$", n))


def _attention_output(layer: nn.Module) -> nn.Linear:
    for path in ("attention.output.dense", "attention.out_lin"):
        try:
            return layer.get_submodule(path)
        except AttributeError:
            continue
    raise SpecError(f"cannot find the attention output projection of {type(layer).__name__}")


def _top(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the ``n`` largest scores, ascending (ties keep the leading ones)."""
    order = torch.argsort(scores, descending=True, stable=True)[:n]
    return order.sort().values


@torch.no_grad()
def narrow_hidden(
    enc: HFEncoder,
    state: dict[str, torch.Tensor],
    config: Any,
    hidden_size: int,
    layer_map: dict[int, int],
    calibration: Mapping[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], Any, nn.Linear | None]:
    """Narrow a derived student's ``state`` (full width; layers already chosen) to ``hidden_size``.

    **Heads keep their size; whole heads are dropped** (384 → 256 keeps 8 of MiniLM's 12 heads
    of 32). A kept head computes exactly the teacher head's function of its (narrowed) input,
    with the same 1/√d scaling: head pruning is known to cost little (Michel et al. 2019, many
    heads can go), whereas shrinking every head's size cuts every query·key product short and
    changes its scale. Same head size also keeps the matmuls the shape kernels are tuned for.
    Attention-map distillation still works: the distiller averages maps over heads when the
    head counts differ.

    **Residual dimensions** are chosen once and used by every tensor that reads or writes the
    stream (embedding tables, every LayerNorm, Q/K/V inputs, attention and FFN outputs, the
    pooler / classifier inputs), so the kept dimensions line up through the whole network.
    With ``calibration`` inputs a dimension's importance is its mean squared activation over
    the teacher's hidden states that the student keeps, and a head's the energy of its output
    (``‖context_h W_Oᵀ‖²``); without, weights stand in: ``Σ γ² + β²`` over the LayerNorms
    (a post-LN stream's per-dimension energy is about that) and ``‖W_V,h‖·‖W_O,h‖``. The
    pooled space of a classifier head keeps its strongest units (``‖W_pool row‖·‖W_cls col‖``).
    A LayerNorm over fewer dimensions divides by their spread rather than all dimensions';
    with calibration each LayerNorm's weight is rescaled by the mean ratio of the two, as
    measured on the teacher's inputs to it.

    An embedding model's output must keep the teacher's width, so it gets a ``project``
    layer (hidden_size → teacher's output width): without calibration it puts each kept
    dimension back in its place (the dropped ones read 0); with calibration it is the ridge
    fit of the teacher's output on the student's pooled output, shrunk towards that
    put-back map, with a bias (the fit of the embeddings' common offset matters most).
    A teacher that already had a projection keeps it, restricted to the kept dimensions.

    all-MiniLM-L6-v2, 3 layers, mean cosine to the teacher on held-out sentences before any
    training: 0.65 at hidden 256 and 0.51 at 192 with 256 calibration texts; 0.37 / 0.26 without.
    """
    width = int(config.hidden_size)
    new_config = narrowed_config(config, hidden_size)
    size, heads_kept = head_size(config), hidden_size // head_size(config)
    student_to_teacher = {s - 1: t - 1 for s, t in layer_map.items() if s > 0}  # layer indices

    stats = None
    if calibration is not None:
        stats = _activations(enc, calibration, sorted(layer_map.values()))
        res_score, head_energy = stats.residual, stats.heads
    else:
        res_score = torch.zeros(width)
        for key, value in state.items():
            if ("LayerNorm" in key or "layer_norm" in key) and value.ndim == 1:
                res_score += value.float().pow(2)
        head_energy = {}

    select: dict[tuple[str, int], torch.Tensor] = {(_RES, -1): _top(res_score, hidden_size)}
    pool_w = pool_r = None
    for key, value in state.items():
        if not value.is_floating_point():
            continue
        axes = _axes(key)
        m = _LAYER.search(key)
        layer = int(m[1]) if m else -1
        if _ATTN in axes and (_ATTN, layer) not in select:
            t_layer = student_to_teacher[layer]
            if t_layer in head_energy:
                score = head_energy[t_layer]
            else:
                v, o = _value_and_output(state, key)
                score = (v.float().view(-1, size, v.shape[1]).pow(2).sum((1, 2))
                         * o.float().view(o.shape[0], -1, size).pow(2).sum((0, 2))).sqrt()
            heads = _top(score, heads_kept)
            select[(_ATTN, layer)] = (heads[:, None] * size + torch.arange(size)).flatten()
        if axes[0] == _POOL and value.ndim == 2:
            pool_w = value
        if axes == (None, _POOL) and value.ndim == 2:
            pool_r = value
    if pool_w is not None:
        score = pool_w.float().norm(dim=1) * (pool_r.float().norm(dim=0) if pool_r is not None else 1.0)
        select[(_POOL, -1)] = _top(score, hidden_size)

    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if value.is_floating_point():
            m = _LAYER.search(key)
            layer = int(m[1]) if m else -1
            for axis, space in enumerate(_axes(key)):
                if space in (_RES, _POOL):
                    value = value.index_select(axis, select[(space, -1)])
                elif space == _ATTN:
                    value = value.index_select(axis, select[(_ATTN, layer)])
        out[key] = value.clone()
    if stats is not None:
        eps = float(getattr(config, "layer_norm_eps", 1e-12))
        _correct_norms(out, stats, select[(_RES, -1)], student_to_teacher, eps)

    project = _projection(enc, select[(_RES, -1)], width)
    if project is not None and calibration is not None and enc.project is None:
        student = build_like(enc, copy.deepcopy(new_config), project=project)  # shares `project`
        student.backbone.load_state_dict(out, strict=True)
        _fit_projection(student, enc, calibration)
    return out, new_config, project


def _correct_norms(state: dict[str, torch.Tensor], stats: _Stats, kept: torch.Tensor,
                   student_to_teacher: dict[int, int], eps: float) -> None:
    """Scale each residual LayerNorm's weight by `_norm_scale` of the teacher's inputs to it."""
    for key in list(state):
        if not key.endswith(".weight") or state[key].ndim != 1:
            continue
        module = key[: -len(".weight")]
        m = _LAYER.search(module)
        teacher_module = module if m is None else (
            module[: m.start(1)] + str(student_to_teacher[int(m[1])]) + module[m.end(1):])
        z = stats.norm_inputs.get(teacher_module)
        if z is not None and z.shape[1] > kept.numel():
            state[key] = state[key] * _norm_scale(z, kept, eps)


def _value_and_output(state: dict[str, torch.Tensor], key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The value and attention-output weights of the layer ``key`` belongs to."""
    prefix = key[: _LAYER.search(key).end()]  # type: ignore[union-attr]
    for v, o in (("attention.self.value.weight", "attention.output.dense.weight"),
                 ("attention.v_lin.weight", "attention.out_lin.weight")):
        if prefix + v in state:
            return state[prefix + v], state[prefix + o]
    raise SpecError(f"cannot find the value / output weights of {prefix!r}")


def _projection(enc: HFEncoder, kept: torch.Tensor, width: int) -> nn.Linear | None:
    """The output projection of a narrowed embedding model (see `narrow_hidden`)."""
    if enc.task != "embedding":
        return None
    if enc.project is not None:
        proj = nn.Linear(kept.numel(), enc.project.out_features)
        proj.weight.copy_(enc.project.weight[:, kept])
        proj.bias.copy_(enc.project.bias)
        return proj
    proj = nn.Linear(kept.numel(), width)
    proj.weight.zero_()
    proj.weight[kept, torch.arange(kept.numel())] = 1.0
    proj.bias.zero_()
    return proj


def _fit_projection(student: HFEncoder, teacher: HFEncoder, inputs: Mapping[str, torch.Tensor]) -> None:
    """Ridge fit of the teacher's (pre-normalisation) output on the student's pooled output."""
    proj = student.project
    assert proj is not None
    student.project, s_norm = None, student.normalize
    teacher_norm, student.normalize, teacher.normalize = teacher.normalize, False, False
    try:
        x, y = student(**inputs).double(), teacher(**inputs).double()
    finally:
        student.project, student.normalize, teacher.normalize = proj, s_norm, teacher_norm
    x_mean, y_mean = x.mean(0), y.mean(0)
    xc, yc = x - x_mean, y - y_mean
    prior = proj.weight.detach().double().T  # (in, out): shrink towards putting dimensions back
    lam = _RIDGE * xc.pow(2).mean() * x.shape[0]
    w = torch.linalg.solve(xc.T @ xc + lam * torch.eye(x.shape[1], dtype=x.dtype), xc.T @ yc + lam * prior)
    proj.weight.copy_(w.T.float())
    proj.bias.copy_((y_mean - x_mean @ w).float())
