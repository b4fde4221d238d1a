"""The search's candidates: a ladder of student sizes from the teacher's down.

* zoo teachers (mlp, cnn, cnn1d, resnet, transformer): derived students (``students.factory.make_student``,
  initialised from the teacher) at every depth from the teacher's down to 1 (resnet: one block per
  stage; beyond 4 layers: the teacher's, then halving), each at width ×1, ×1/2, ×1/4, ... until the
  widest layer would fall under ``MIN_LADDER_WIDTH`` units. The full-depth full-width one would be a
  copy of the teacher and is left out: the teacher is a candidate of its own. MLP, CNN and 1-D CNN
  teachers also get fresh narrow, shallow students (``_small_fresh``), so the ladder reaches the
  bottom whatever the teacher's widths.
* black-box (ONNX) teachers: fresh zoo students for their input kind (MLP of 2 and 1 hidden layers,
  and 3 up to 128 units; CNN of 3 and 2 blocks; 1-D CNN of 3, 2 and 1 blocks; transformer of 4, 2
  and 1 layers), the widest within the teacher's parameter count, halving down to
  ``MIN_LADDER_WIDTH`` (transformer dim 32).
* Hugging Face teachers: ``students.hf_ladder.hf_ladder`` (4, 3 and 2 layers, narrower hidden sizes,
  vocabulary trimmed to the tokens the training data uses).
* the teacher itself (``TEACHER``), never trained: its fp32 and int8 graphs may already meet the
  targets.

``max_params`` (from ``student.max_params`` / ``max_params_ratio``) drops every candidate over it.
At most ``MAX_CANDIDATES`` students are kept, spread evenly over the parameter counts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import SpecError
from ..spec import DerivedStudent, StudentConfig, ZooStudent
from ..students import zoo
from ..students.factory import make_student
from ..students.hf_ladder import hf_ladder
from ..students.student import Student
from ..students.zoo_layers import (
    derive_zoo_config,
    describe_config,
    even_layers,
    input_keys,
    layer_count,
    meta_count,
    min_layer_count,
)
from ..types import Teacher, TensorData

MIN_LADDER_WIDTH = 8
MAX_CANDIDATES = 40
SMALL_MLP_WIDTHS = (8, 16, 32, 64, 128)
"""Fresh plain MLPs of 1, 2 and 3 hidden layers at these widths join a zoo MLP teacher's ladder: halving
a 700-unit teacher's width never lands on 64, and a narrow, shallow student trained to convergence
often matches a large teacher (issue 18)."""
SMALL_CONV_WIDTHS = (4, 8, 16)
"""First-block widths of the fresh 2- and 3-block (CNN / 1-D CNN) students joining a conv teacher's ladder."""
TEACHER = "teacher"


@dataclass
class Candidate:
    """One rung of the ladder; ``build`` makes the student on demand (None for the teacher)."""

    name: str
    description: str
    num_parameters: int
    build: Callable[[], Student] | None
    embedding_parameters: int | None = None
    is_teacher: bool = False

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "description": self.description,
                               "num_parameters": self.num_parameters}
        if self.embedding_parameters is not None:
            out["embedding_parameters"] = self.embedding_parameters
            out["embedding_share"] = self.embedding_parameters / max(1, self.num_parameters)
        return out


def embedding_parameters(module: nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Embedding))


def build_ladder(teacher: Teacher, train: TensorData, student: StudentConfig) -> list[Candidate]:
    """Every candidate for ``teacher`` within the student spec's parameter cap, teacher first."""
    cap = _cap(teacher, student)
    if teacher.kind == "hf":
        entries = hf_ladder(teacher, train, max_params=cap)
        students = [Candidate(e.name, e.description, int(e.num_parameters), e.build,
                              int(e.embedding_parameters)) for e in entries]
    elif teacher.kind == "zoo" and teacher.module is not None:
        students = _zoo_ladder(teacher)
        names = {c.name for c in students}
        students += [c for c in _small_fresh(teacher) if c.name not in names]
    else:
        students = _blackbox_ladder(teacher)
    if cap is not None:
        students = [c for c in students if c.num_parameters <= cap]
    if not students:
        raise SpecError(f"no student candidate fits the cap of {cap:,} parameters; raise student.max_params "
                        "or max_params_ratio")
    students = _thin(sorted(students, key=lambda c: c.num_parameters), MAX_CANDIDATES)
    out = []
    n_teacher = teacher.num_parameters or (zoo.count_parameters(teacher.module) if teacher.module else 0)
    if cap is None or n_teacher <= cap:
        emb = embedding_parameters(teacher.module) if teacher.module is not None else None
        out.append(Candidate(TEACHER, f"the teacher itself ({teacher.kind}), not distilled", n_teacher, None,
                             emb or None, is_teacher=True))
    return out + students


def _cap(teacher: Teacher, spec: StudentConfig) -> int | None:
    if spec.max_params is not None:
        return spec.max_params
    if spec.max_params_ratio is not None:
        total = teacher.num_parameters or (zoo.count_parameters(teacher.module) if teacher.module else 0)
        if total <= 0:
            raise SpecError("the teacher's parameter count is unknown, so max_params_ratio cannot be applied; "
                            "give student.max_params")
        return max(1, int(total * spec.max_params_ratio))
    return None


def _thin(items: list[Candidate], n: int) -> list[Candidate]:
    if len(items) <= n:
        return items
    idx = sorted({round(i * (len(items) - 1) / (n - 1)) for i in range(n)})
    return [items[i] for i in idx]


def _widths(cfg: dict[str, Any]) -> list[int]:
    arch = cfg["architecture"]
    if arch == "mlp":
        return [int(h) for h in cfg["hidden"]]
    if arch == "ctr":
        return [int(cfg.get("embedding_dim", 16)), *(int(h) for h in cfg["hidden"])]
    if arch in ("cnn", "cnn1d"):
        return [int(c) for c in cfg["channels"]] + ([int(cfg["hidden"])] if int(cfg.get("hidden", 0)) else [])
    if arch == "resnet":
        return [int(w) for w in cfg["widths"]]
    return [int(cfg["dim"])]


def short_name(cfg: dict[str, Any]) -> str:
    """A file-name-safe name of a zoo config: ``mlp-64-64``, ``cnn1d-8-16-16-h32``, ``transformer-d64-l2``."""
    arch = cfg["architecture"]
    if arch == "mlp":
        return "mlp-" + "-".join(str(int(h)) for h in cfg["hidden"]) if cfg["hidden"] else "mlp-linear"
    if arch == "ctr":
        return (f"ctr-{cfg.get('interaction', 'concat')}-e{int(cfg.get('embedding_dim', 16))}-"
                + "-".join(str(int(h)) for h in cfg["hidden"]))
    if arch in ("cnn", "cnn1d"):
        fc = f"-h{int(cfg['hidden'])}" if int(cfg.get("hidden", 0)) else ""
        return f"{arch}-" + "-".join(str(int(c)) for c in cfg["channels"]) + fc
    if arch == "resnet":
        blocks = cfg.get("blocks_per_stage", [2] * len(cfg["widths"]))
        return "resnet-w" + "-".join(str(int(w)) for w in cfg["widths"]) + "-b" + "-".join(str(int(b)) for b in blocks)
    return f"transformer-d{int(cfg['dim'])}-l{int(cfg['num_layers'])}-f{int(cfg.get('ffn_dim', 4 * int(cfg['dim'])))}"


def _depths(cfg: dict[str, Any]) -> list[int]:
    depth, low = layer_count(cfg), min_layer_count(cfg)
    if depth <= 4:
        return list(range(depth, low - 1, -1))
    out, d = [depth], depth
    while d > low:
        d = max(low, d // 2)
        out.append(d)
    return list(dict.fromkeys(out))


def _zoo_ladder(teacher: Teacher) -> list[Candidate]:
    cfg_t = zoo.validate_config(teacher.config)
    depth = layer_count(cfg_t)
    out: list[Candidate] = []
    for d in _depths(cfg_t):
        kept = even_layers(cfg_t, d)
        previous = None
        for k in range(16):
            ratio = 2.0 ** -k
            cfg = derive_zoo_config(cfg_t, kept, ratio)
            name = short_name(cfg)
            if name == previous or (k > 0 and max(_widths(cfg)) < MIN_LADDER_WIDTH):
                break  # every layer at its minimum width, or narrower than the ladder goes
            previous = name
            if d == depth and k == 0:
                continue  # the teacher itself
            spec = DerivedStudent(layers=kept, width_ratio=ratio)
            out.append(Candidate(
                name, f"derived: {describe_config(cfg)} (width ×{ratio:g}, {d} of {depth} layers), initialised from "
                      "the teacher", meta_count(cfg),
                lambda spec=spec: make_student(teacher, spec), _meta_embedding(cfg)))
    return out


def _small_fresh(teacher: Teacher) -> list[Candidate]:
    """Fresh narrow, shallow zoo students for a zoo MLP / CNN / 1-D CNN teacher (``SMALL_MLP_WIDTHS``,
    ``SMALL_CONV_WIDTHS``), smaller than the teacher; none for other architectures."""
    arch = teacher.config.get("architecture") if teacher.config else None
    if arch not in ("mlp", "cnn", "cnn1d"):
        return []
    base: dict[str, Any] = {"task": teacher.task, "output_dim": teacher.output_dim, "architecture": arch,
                            **input_keys(teacher, arch)}
    if arch == "mlp":
        cfgs = [{**base, "hidden": [w] * d} for w in SMALL_MLP_WIDTHS for d in (1, 2, 3)]
    else:
        k = 3 if arch == "cnn" else 5
        cfgs = [{**base, "channels": [m * w for m in b], "kernel_size": k}
                for w in SMALL_CONV_WIDTHS for b in ([1, 2], [1, 2, 4])]
    n_teacher = teacher.num_parameters or zoo.count_parameters(teacher.module)
    out = []
    for cfg in cfgs:
        cfg = zoo.validate_config(cfg)
        n = meta_count(cfg)
        if n >= n_teacher:
            continue
        spec = ZooStudent(architecture=cfg)
        out.append(Candidate(short_name(cfg), f"fresh small zoo student: {describe_config(cfg)}", n,
                             lambda spec=spec: make_student(teacher, spec)))
    return out


def _meta_embedding(cfg: dict[str, Any]) -> int | None:
    if cfg["architecture"] == "ctr":  # lookup tables: parameters that cost no compute
        return sum(int(c["size"]) for c in cfg["categorical"]) * int(cfg.get("embedding_dim", 16))
    if cfg["architecture"] != "transformer":
        return None
    return (int(cfg["vocab_size"]) + int(cfg.get("max_len", 128))) * int(cfg["dim"])


def _blackbox_ladder(teacher: Teacher) -> list[Candidate]:
    """Fresh zoo students for a black box (module doc)."""
    kind = teacher.input_kind
    base: dict[str, Any] = {"task": teacher.task, "output_dim": teacher.output_dim}
    if kind == "tokens":
        families = _token_families(teacher, base)
        widths = [512, 256, 128, 64, 32]
    else:
        arch = {"vector": "mlp", "image": "cnn", "signal": "cnn1d"}[kind]
        base.update(architecture=arch, **input_keys(teacher, arch))
        widths = [2 ** p for p in range(10 if arch == "mlp" else 7, 2, -1) if 2 ** p >= MIN_LADDER_WIDTH]
        if arch == "mlp":
            families = [lambda w: {**base, "hidden": [w, w]}, lambda w: {**base, "hidden": [w]},
                        lambda w: {**base, "hidden": [w, w, w]} if w <= max(SMALL_MLP_WIDTHS) else None]
        else:
            k = 3 if arch == "cnn" else 5
            blocks = ([1, 2, 4], [1, 2]) if arch == "cnn" else ([1, 2, 4], [1, 2], [1])
            families = [lambda w, b=b: {**base, "channels": [m * w for m in b], "kernel_size": k} for b in blocks]
    budget = teacher.num_parameters or None
    out: list[Candidate] = []
    for family in families:
        for w in widths:
            raw = family(w)
            if raw is None:
                continue
            cfg = zoo.validate_config(raw)
            n = meta_count(cfg)
            if budget is not None and n > budget:
                continue
            spec = ZooStudent(architecture=cfg)
            out.append(Candidate(short_name(cfg),
                                 f"fresh zoo student for a black-box teacher: {describe_config(cfg)}", n,
                                 lambda spec=spec: make_student(teacher, spec), _meta_embedding(cfg)))
    return out


def _token_families(teacher: Teacher, base: dict[str, Any]) -> list[Callable[[int], dict[str, Any]]]:
    keys = input_keys(teacher, "transformer")
    if "vocab_size" not in keys:
        raise SpecError("the teacher's vocabulary size is unknown (no tokenizer and no vocab_size in its config)")
    base = {**base, "architecture": "transformer", **keys, "pooling": "mean"}

    def family(layers: int) -> Callable[[int], dict[str, Any]]:
        def cfg(dim: int) -> dict[str, Any]:
            heads = next(h for h in (8, 4, 2, 1) if dim % h == 0 and (dim // h >= 32 or h == 1))
            return {**base, "dim": dim, "num_layers": layers, "num_heads": heads, "ffn_dim": 4 * dim}
        return cfg

    return [family(n) for n in (4, 2, 1)]
