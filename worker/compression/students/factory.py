"""The student factory: a smaller model for a teacher, derived from it, named, or sized to a budget.

``StudentSpec.kind`` picks the way:

* ``derived``: the teacher's own architecture with fewer layers (``layers`` = which teacher
  layers to keep, or ``num_layers`` picked evenly, first and last included) and/or narrower
  (``width_ratio``), initialised from the teacher (below). Hugging Face teachers go to ``hf.py``.
* ``zoo``: a zoo architecture; input dims, task and output_dim are filled from the teacher.
* ``hf_config``: a transformers config for a Hugging Face teacher (``hf.py``).
* ``auto``: the budget is ``max_params``, else ``max_params_ratio`` (default 0.25) of the
  teacher's parameters. Zoo teachers get the same architecture, narrowed (and, when deep,
  shortened) to fit; Hugging Face teachers half their layers, then a narrower feed-forward;
  black-box (ONNX) teachers a fresh MLP / CNN / 1-D CNN / transformer for their input kind.
  Students are saved with ``save_student``; a saved zoo transformer also gets the teacher's
  tokenizer, so the folder is self-contained.

The "layers" of each zoo architecture: MLP hidden layers, cnn / cnn1d conv blocks, transformer
layers, resnet residual blocks numbered across stages (every stage keeps at least one).

Initialising a derived zoo student from its teacher
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

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from torch import nn

from . import zoo
from ..errors import SpecError
from ..spec import StudentSpec
from ..types import Teacher

MIN_WIDTH = 4
"""No auto-sized or narrowed layer gets fewer units / channels than this (unless the teacher's has)."""
DEFAULT_RATIO = 0.25
_RATIOS = [i / 128 for i in range(129)]
"""Width ratios the zoo auto search tries; 0 means every layer at its minimum width."""
_HF_RATIOS = [i / 16 for i in range(1, 17)]
_T = TypeVar("_T")


@dataclass
class InitReport:
    """How many student tensors (parameters and buffers) were initialised from the teacher."""

    full: int = 0
    partial: int = 0
    none: int = 0

    def __str__(self) -> str:
        return f"{self.full} tensors copied fully, {self.partial} partially, {self.none} not"


@dataclass
class Student:
    module: nn.Module
    kind: Literal["zoo", "hf"]
    config: dict[str, Any]
    """The zoo config, or the Hugging Face config dict."""
    layer_map: dict[int, int] | None
    """Student hidden-state index -> teacher hidden-state index, for feature matching."""
    description: str
    num_parameters: int
    how: Literal["auto", "derived", "zoo", "hf_config"]
    init: InitReport | None = None
    """Set when a zoo student was initialised from the teacher."""

    def __post_init__(self) -> None:
        self.module.kdq_layer_map = self.layer_map  # where the distiller looks for it


# --- public API ---------------------------------------------------------------------------


def make_student(teacher: Teacher, spec: StudentSpec, *, seed: int = 0) -> Student:
    """Build the student ``spec`` asks for; fresh weights are seeded by ``seed`` (global RNG untouched)."""
    if spec.kind == "search":
        raise SpecError("student kind 'search' is a search over many students: run it through compress() "
                        "(worker.compression.search), not make_student")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if spec.kind == "auto":
            student = _auto(teacher, _budget(teacher, spec))
        elif spec.kind == "derived":
            student = _derived(teacher, spec)
        elif spec.kind == "zoo":
            assert spec.architecture is not None  # the spec validator guarantees it
            student = _zoo_student(teacher, spec.architecture)
        else:
            student = _hf_config_student(teacher, spec)
    if spec.kind != "auto" and (spec.max_params is not None or spec.max_params_ratio is not None):
        budget = _budget(teacher, spec)
        if student.num_parameters > budget:
            raise SpecError(f"the {spec.kind} student has {student.num_parameters:,} parameters, "
                            f"over the budget of {budget:,}")
    _check_outputs(teacher, student)
    return student


def save_student(student: Student, folder: Path, teacher: Teacher) -> Path:
    """Write the student as config.json + model.safetensors (+ tokenizer), loadable by ``load_teacher``."""
    folder = Path(folder)
    if student.kind == "hf":
        from .hf import save_hf_model
        save_hf_model(student.module, folder, teacher.tokenizer)
        return folder
    from ..io.teachers import save_zoo_model
    save_zoo_model(student.module, student.config, folder)
    if teacher.input_kind == "tokens" and hasattr(teacher.tokenizer, "save_pretrained"):
        teacher.tokenizer.save_pretrained(folder)
    return folder


def derive_zoo_config(cfg: dict[str, Any], kept: Sequence[int], width_ratio: float) -> dict[str, Any]:
    """The zoo config of ``cfg`` keeping teacher layers ``kept``, widths scaled by ``width_ratio``.

    Transformers keep their head count: ``dim`` stays a multiple of ``num_heads``.
    """
    arch, out = cfg["architecture"], dict(cfg)
    if arch == "mlp":
        out["hidden"] = [_scale(int(cfg["hidden"][i]), width_ratio) for i in kept]
    elif arch in ("cnn", "cnn1d"):
        out["channels"] = [_scale(int(cfg["channels"][i]), width_ratio) for i in kept]
        if int(cfg.get("hidden", 0)):
            out["hidden"] = _scale(int(cfg["hidden"]), width_ratio)
    elif arch == "resnet":
        per_stage = _split_resnet(_resnet_blocks(cfg), kept)
        out["widths"] = [_scale(int(w), width_ratio) for w in cfg["widths"]]
        out["blocks_per_stage"] = [len(k) for k in per_stage]
    else:
        dim, heads = int(cfg["dim"]), int(cfg.get("num_heads", 4))
        head_dim = dim // heads
        out["dim"] = heads * min(head_dim, max(-(-MIN_WIDTH // heads), round(head_dim * width_ratio)))
        out["num_heads"] = heads
        out["ffn_dim"] = _scale(int(cfg.get("ffn_dim", 4 * dim)), width_ratio)
        out["num_layers"] = len(kept)
    return out


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


# --- the four ways ------------------------------------------------------------------------


def _derived(teacher: Teacher, spec: StudentSpec) -> Student:
    if teacher.kind == "hf":
        from .hf import derive_hf_student
        module, layer_map = derive_hf_student(
            teacher, layers=spec.layers, num_layers=spec.num_layers, width_ratio=spec.width_ratio)
        return _hf_student(module, layer_map, "derived",
                           f"derived from teacher layers {_kept_hf_layers(layer_map)}, initialised from teacher")
    if teacher.kind != "zoo" or teacher.module is None:
        raise SpecError("student.kind 'derived' needs a zoo or Hugging Face teacher; "
                        "an ONNX teacher is a black box: use 'auto' or 'zoo'")
    cfg = zoo.validate_config(teacher.config)
    return _derive_zoo(teacher, _kept_from_spec(cfg, spec), spec.width_ratio or 1.0, "derived")


def _zoo_student(teacher: Teacher, architecture: dict[str, Any]) -> Student:
    cfg = _fit_to_teacher(teacher, architecture)
    module = zoo.build(cfg)
    return Student(module, "zoo", cfg, None, f"zoo {_describe(cfg)}, fresh weights",
                   zoo.count_parameters(module), "zoo")


def _hf_config_student(teacher: Teacher, spec: StudentSpec) -> Student:
    if teacher.kind != "hf":
        raise SpecError(f"student.kind 'hf_config' needs a Hugging Face teacher, not a {teacher.kind} one; "
                        "use 'zoo', 'derived' or 'auto'")
    from .hf import hf_student_from_config
    assert spec.hf_config is not None  # the spec validator guarantees it
    module, layer_map = hf_student_from_config(teacher, spec.hf_config)
    return _hf_student(module, layer_map, "hf_config", "from the given transformers config")


def _auto(teacher: Teacher, budget: int) -> Student:
    if teacher.kind == "hf":
        return _auto_hf(teacher, budget)
    if teacher.kind == "zoo" and teacher.module is not None:
        return _auto_zoo(teacher, budget)
    return _auto_blackbox(teacher, budget)


def _auto_zoo(teacher: Teacher, budget: int) -> Student:
    """Same architecture, widest that fits; deep teachers (3+ layers) may lose half their layers
    when full depth would leave under half the width; fewer layers still only if nothing else fits."""
    cfg = zoo.validate_config(teacher.config)
    depth, min_depth = _depth(cfg), _min_depth(cfg)

    def widest(d: int) -> tuple[list[int], float | None]:
        kept = _even_layers(cfg, d)
        return kept, _largest_fitting(_RATIOS, lambda r: _meta_count(derive_zoo_config(cfg, kept, r)), budget)

    depths = [depth] if depth < 3 else [depth, max(min_depth, math.ceil(depth / 2))]
    fitting: list[tuple[float, list[int]]] = []
    for d in depths:
        kept, ratio = widest(d)
        if ratio is not None and ratio >= 0.5:
            return _derive_zoo(teacher, kept, ratio, "auto", budget)
        if ratio is not None:
            fitting.append((ratio, kept))
    if fitting:
        ratio, kept = max(fitting, key=lambda f: f[0])
        return _derive_zoo(teacher, kept, ratio, "auto", budget)
    for d in range(depths[-1] - 1, min_depth - 1, -1):
        kept, ratio = widest(d)
        if ratio is not None:
            return _derive_zoo(teacher, kept, ratio, "auto", budget)
    smallest = _meta_count(derive_zoo_config(cfg, _even_layers(cfg, min_depth), 0.0))
    raise SpecError(f"no {cfg['architecture']} student fits {budget:,} parameters: the smallest "
                    f"({min_depth} layer(s), minimum widths) has {smallest:,}; raise the budget")


def _auto_hf(teacher: Teacher, budget: int) -> Student:
    """Half the layers (at least 1) with the widest feed-forward that fits, else 1 layer; if nothing
    fits (the embedding table may dominate), the smallest derived student, said so in its description."""
    from .hf import derive_hf_student, hf_layer_count

    def build(n: int, r: float) -> tuple[nn.Module, dict[int, int]]:
        return derive_hf_student(teacher, num_layers=n, width_ratio=None if r == 1.0 else r)

    sizes: dict[tuple[int, float], int] = {}

    def size(n: int, r: float) -> int:  # only the counts are kept: real transformers are large
        if (n, r) not in sizes:
            sizes[(n, r)] = zoo.count_parameters(build(n, r)[0])
        return sizes[(n, r)]

    layer_counts = list(dict.fromkeys((max(1, hf_layer_count(teacher) // 2), 1)))
    for n in layer_counts:
        ratio = _largest_fitting(_HF_RATIOS, lambda r, n=n: size(n, r), budget)
        if ratio is not None:
            module, layer_map = build(n, ratio)
            return _hf_student(module, layer_map, "auto",
                               f"derived from teacher layers {_kept_hf_layers(layer_map)}, feed-forward width "
                               f"×{ratio:g}, within {budget:,} parameters, initialised from teacher")
    module, layer_map = build(layer_counts[-1], _HF_RATIOS[0])
    return _hf_student(module, layer_map, "auto",
                       f"derived from teacher layers {_kept_hf_layers(layer_map)}, feed-forward width "
                       f"×{_HF_RATIOS[0]:g}: the smallest derived student, still over the budget of {budget:,} "
                       "parameters (the embedding table dominates), initialised from teacher")


def _auto_blackbox(teacher: Teacher, budget: int) -> Student:
    """A fresh student for a black box: MLP (2 hidden layers) for vectors, 3-block CNN for images,
    3-block 1-D CNN for signals, a small transformer for token ids; widths fitted to the budget."""
    kind = teacher.input_kind
    base = {"task": teacher.task, "output_dim": teacher.output_dim}
    if kind == "tokens":
        return _auto_tokens(teacher, budget, base)
    arch = {"vector": "mlp", "image": "cnn", "signal": "cnn1d"}[kind]
    base.update(architecture=arch, **_input_keys(teacher, arch))
    widths = list(range(MIN_WIDTH, 1025 if arch == "mlp" else 129))

    def family(w: int) -> dict[str, Any]:
        if arch == "mlp":
            return {**base, "hidden": [w, w]}
        return {**base, "channels": [w, 2 * w, 4 * w], "kernel_size": 3 if arch == "cnn" else 5}

    width = _largest_fitting(widths, lambda w: _meta_count(family(w)), budget)
    if width is None:
        raise SpecError(f"no {arch} student fits {budget:,} parameters: the smallest has "
                        f"{_meta_count(family(widths[0])):,}; raise the budget")
    cfg = zoo.validate_config(family(width))
    return _fresh(cfg, f"auto for a black-box teacher: {_describe(cfg)}, within {budget:,} parameters")


def _auto_tokens(teacher: Teacher, budget: int, base: dict[str, Any]) -> Student:
    """4 layers when that still allows dim ≥ 128, else 2, else 1; dim the largest that fits (≤ 512)."""
    base = {**base, "architecture": "transformer", **_input_keys(teacher, "transformer"), "pooling": "mean"}
    if "vocab_size" not in base:
        raise SpecError(_NO_VOCAB)

    def cfg(layers: int, dim: int) -> dict[str, Any]:
        heads = next(h for h in (8, 4, 2, 1) if dim % h == 0 and (dim // h >= 32 or h == 1))
        return {**base, "dim": dim, "num_layers": layers, "num_heads": heads, "ffn_dim": 4 * dim}

    dims = list(range(MIN_WIDTH, 513, 4))
    for layers, min_dim in ((4, 128), (2, MIN_WIDTH), (1, MIN_WIDTH)):
        dim = _largest_fitting(dims, lambda d, n=layers: _meta_count(cfg(n, d)), budget)
        if dim is not None and dim >= min_dim:
            chosen = zoo.validate_config(cfg(layers, dim))
            return _fresh(chosen, f"auto for a black-box teacher: {_describe(chosen)}, within {budget:,} parameters")
    raise SpecError(f"no transformer student fits {budget:,} parameters: the smallest (1 layer, dim "
                    f"{MIN_WIDTH}, vocabulary {base['vocab_size']:,}) has {_meta_count(cfg(1, MIN_WIDTH)):,}; "
                    "raise the budget")


# --- helpers for the four ways --------------------------------------------------------------


def _derive_zoo(teacher: Teacher, kept: list[int], ratio: float, how: Literal["auto", "derived"],
                budget: int | None = None) -> Student:
    assert teacher.module is not None
    cfg_t = zoo.validate_config(teacher.config)
    cfg = derive_zoo_config(cfg_t, kept, ratio)
    module = zoo.build(cfg)
    report = init_from_teacher(module, teacher.module, kept)
    depth = _depth(cfg_t)
    layers = "all layers" if len(kept) == depth else f"layers {kept} of {depth}"
    within = "" if budget is None else f", within {budget:,} parameters"
    description = (f"derived from teacher: {_describe(cfg)} (width ×{ratio:.3g}, {layers}){within}, "
                   f"initialised from teacher ({report})")
    return Student(module, "zoo", cfg, _layer_map(cfg_t, kept), description, zoo.count_parameters(module), how,
                   report)


def _fresh(cfg: dict[str, Any], description: str) -> Student:
    module = zoo.build(cfg)
    return Student(module, "zoo", cfg, None, description, zoo.count_parameters(module), "auto")


def _hf_student(module: nn.Module, layer_map: dict[int, int] | None, how: Literal["auto", "derived", "hf_config"],
                description: str) -> Student:
    """``module`` is an ``hf.HFEncoder``; its ``config`` is the transformers config."""
    cfg, n = module.config, zoo.count_parameters(module)
    shape = f"{cfg.model_type}, {cfg.num_hidden_layers} layer(s), hidden size {cfg.hidden_size}, {n:,} parameters"
    return Student(module, "hf", cfg.to_dict(), layer_map, f"{description}: {shape}", n, how)


def _kept_hf_layers(layer_map: dict[int, int]) -> list[int]:
    """The teacher layers a derived hf student copied (hidden index 0 is the embeddings)."""
    return [t - 1 for s, t in sorted(layer_map.items()) if s > 0]


def _budget(teacher: Teacher, spec: StudentSpec) -> int:
    if spec.max_params is not None:
        return spec.max_params
    total = teacher.num_parameters or (zoo.count_parameters(teacher.module) if teacher.module is not None else 0)
    if total <= 0:
        raise SpecError("the teacher's parameter count is unknown, so a ratio budget cannot be applied; "
                        "give student.max_params")
    return max(1, int(total * (spec.max_params_ratio or DEFAULT_RATIO)))


def _check_outputs(teacher: Teacher, student: Student) -> None:
    """One dummy batch through the student: it must produce the teacher's output width."""
    shape = tuple(max(1, int(d)) for d in teacher.input_shape)
    if teacher.input_kind == "tokens":
        inputs = {"input_ids": torch.zeros((2, *shape), dtype=torch.long),
                  "attention_mask": torch.ones((2, *shape), dtype=torch.long)}
    else:
        inputs = {"x": torch.zeros((2, *shape))}
    was_training = student.module.training
    student.module.eval()
    with torch.no_grad():
        out = student.module(**inputs)
    student.module.train(was_training)
    if tuple(out.shape) != (2, teacher.output_dim):
        raise SpecError(f"the student outputs shape {tuple(out.shape[1:])} per sample; "
                        f"the teacher outputs ({teacher.output_dim},)")


_NO_VOCAB = ("the teacher's vocabulary size is unknown (no tokenizer and no vocab_size in its config); "
             "give vocab_size in the student architecture")


def _vocab_size(teacher: Teacher) -> int | None:
    if teacher.tokenizer is not None:
        return len(teacher.tokenizer)
    vocab = teacher.config.get("vocab_size")
    return None if vocab is None else int(vocab)


def _input_keys(teacher: Teacher, arch: str) -> dict[str, Any]:
    """The zoo config keys that describe the teacher's inputs for architecture ``arch``."""
    shape = [int(d) for d in teacher.input_shape]
    if arch == "mlp":
        return {"input_dim": math.prod(shape)}
    if arch in ("cnn", "resnet"):
        return {"in_channels": shape[0], "input_size": shape[1:]}
    if arch == "cnn1d":
        return {"in_channels": shape[0], "input_length": shape[1]}
    vocab = _vocab_size(teacher)
    return {"max_len": shape[0], **({} if vocab is None else {"vocab_size": vocab})}


def _fit_to_teacher(teacher: Teacher, architecture: dict[str, Any]) -> dict[str, Any]:
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
    wanted = {"task": teacher.task, "output_dim": teacher.output_dim, **_input_keys(teacher, arch)}
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
        raise SpecError(_NO_VOCAB)
    return zoo.validate_config(cfg)


def _largest_fitting(options: Sequence[_T], size: Callable[[_T], int], budget: int) -> _T | None:
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


def _meta_count(cfg: dict[str, Any]) -> int:
    """Parameter count of a zoo config without allocating its weights."""
    with torch.device("meta"):
        return zoo.count_parameters(zoo.build(cfg))


def _scale(width: int, ratio: float) -> int:
    return min(width, max(MIN_WIDTH, round(width * ratio)))


def _describe(cfg: dict[str, Any]) -> str:
    arch = cfg["architecture"]
    if arch == "mlp":
        return f"mlp hidden {list(cfg['hidden'])}"
    if arch in ("cnn", "cnn1d"):
        fc = f", hidden {cfg['hidden']}" if int(cfg.get("hidden", 0)) else ""
        return f"{arch} channels {list(cfg['channels'])}{fc}"
    if arch == "resnet":
        return f"resnet widths {list(cfg['widths'])}, blocks per stage {_resnet_blocks(cfg)}"
    return (f"transformer dim {cfg['dim']}, {cfg['num_layers']} layer(s), {cfg.get('num_heads', 4)} heads, "
            f"ffn {cfg.get('ffn_dim', 4 * int(cfg['dim']))}")


# --- which layers ---------------------------------------------------------------------------


def _resnet_blocks(cfg: dict[str, Any]) -> list[int]:
    return [int(b) for b in cfg.get("blocks_per_stage", [2] * len(cfg["widths"]))]


def _depth(cfg: dict[str, Any]) -> int:
    arch = cfg["architecture"]
    if arch == "mlp":
        return len(cfg["hidden"])
    if arch in ("cnn", "cnn1d"):
        return len(cfg["channels"])
    if arch == "resnet":
        return sum(_resnet_blocks(cfg))
    return int(cfg["num_layers"])


def _min_depth(cfg: dict[str, Any]) -> int:
    return len(cfg["widths"]) if cfg["architecture"] == "resnet" else 1


def _even(n: int, k: int) -> list[int]:
    """``k`` of ``range(n)`` evenly spaced, first and last included (rounding half up)."""
    return [0] if k == 1 else [int(i * (n - 1) / (k - 1) + 0.5) for i in range(k)]


def _even_layers(cfg: dict[str, Any], k: int) -> list[int]:
    if cfg["architecture"] != "resnet":
        return _even(_depth(cfg), k)
    counts = _resnet_blocks(cfg)
    quota = [1] * len(counts)  # every stage keeps a block; extras go where the most are dropped
    for _ in range(k - len(counts)):
        s = max((i for i in range(len(counts)) if quota[i] < counts[i]), key=lambda i: counts[i] / quota[i])
        quota[s] += 1
    starts = [sum(counts[:s]) for s in range(len(counts))]
    return [starts[s] + b for s in range(len(counts)) for b in _even(counts[s], quota[s])]


def _split_resnet(counts: list[int], kept: Sequence[int]) -> list[list[int]]:
    """Global block indices -> per-stage local indices."""
    per_stage: list[list[int]] = [[] for _ in counts]
    starts = [sum(counts[:s]) for s in range(len(counts))]
    for g in kept:
        s = max(i for i in range(len(counts)) if starts[i] <= g)
        per_stage[s].append(g - starts[s])
    return per_stage


def _kept_from_spec(cfg: dict[str, Any], spec: StudentSpec) -> list[int]:
    depth, min_depth = _depth(cfg), _min_depth(cfg)
    unit = "residual blocks (numbered across stages)" if cfg["architecture"] == "resnet" else "layers"
    if spec.layers is not None:
        kept = list(spec.layers)
        if not kept or any(i < 0 or i >= depth for i in kept):
            raise SpecError(f"student.layers {kept} must pick among the teacher's {depth} {unit} (0..{depth - 1})")
        if any(b <= a for a, b in itertools.pairwise(kept)):
            raise SpecError(f"student.layers {kept} must be strictly increasing")
        if cfg["architecture"] == "resnet" and not all(_split_resnet(_resnet_blocks(cfg), kept)):
            raise SpecError(f"student.layers {kept} must keep at least one block of each resnet stage "
                            f"(blocks per stage: {_resnet_blocks(cfg)})")
        return kept
    if spec.num_layers is not None:
        if not min_depth <= spec.num_layers <= depth:
            raise SpecError(f"student.num_layers {spec.num_layers} must be between {min_depth} and the "
                            f"teacher's {depth} {unit}")
        return _even_layers(cfg, spec.num_layers)
    return list(range(depth))


def _layer_map(cfg: dict[str, Any], kept: list[int]) -> dict[int, int]:
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


# --- copying weights ------------------------------------------------------------------------


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


def _conv_parts(block: nn.Sequential) -> tuple[nn.Module, nn.Module]:
    conv = next(m for m in block if isinstance(m, (nn.Conv1d, nn.Conv2d)))
    norm = next(m for m in block if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)))
    return conv, norm


def _convnet_pairs(s: zoo._ConvNet, t: zoo._ConvNet, kept: list[int]) -> list[_Pair]:
    def c(i: int) -> _Space:
        return _IN if i < 0 else _Space(f"c{i}")

    pairs: list[_Pair] = []
    for j, i in enumerate(kept):
        (s_conv, s_bn), (t_conv, t_bn) = _conv_parts(s.blocks[j]), _conv_parts(t.blocks[i])
        pairs += _leaf(s_conv, t_conv, c(i), c(i - 1)) + _leaf(s_bn, t_bn, c(i))
    last = c(len(t.blocks) - 1)
    if s.fc is not None:
        fc = _Space("fc")
        pairs += _leaf(s.fc[0], t.fc[0] if t.fc is not None else None, fc, last)
        last = fc
    return pairs + _leaf(s.head, t.head, _OUT, last)


def _resnet_pairs(s: zoo.ResNet, t: zoo.ResNet, kept: list[int]) -> list[_Pair]:
    def stage(i: int) -> _Space:
        return _Space(f"stage{i}")

    pairs = _leaf(s.stem[0], t.stem[0], stage(0), _IN) + _leaf(s.stem[1], t.stem[1], stage(0))
    per_stage = _split_resnet([len(st) for st in t.stages], kept)
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
    zoo.CNN: _convnet_pairs,
    zoo.CNN1d: _convnet_pairs,
    zoo.ResNet: _resnet_pairs,
    zoo.TransformerEncoder: _transformer_pairs,
}


def _module_depth(module: nn.Module) -> int:
    if isinstance(module, zoo.ResNet):
        return sum(len(stage) for stage in module.stages)
    return len(module.blocks if isinstance(module, zoo._ConvNet) else module.layers)


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
