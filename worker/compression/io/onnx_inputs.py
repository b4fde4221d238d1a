"""ONNX teachers with several named inputs: a click model's integer id inputs beside one dense float input.

Such a graph — int64 / int32 inputs of shape ``(N,)`` or ``(N, 1)`` (one categorical column each) and at
most one float input ``(N, F)`` with a static ``F`` — is wrapped before it runs into a graph of one float
input ``x`` of ``k + F`` columns: the ids first, in the graph's input order, then the dense features (a
``Gather`` and a ``Cast`` per id input, a ``Slice`` for the dense one, ahead of the original nodes). So
the engine's one-matrix path (the data reader, the meter, the timer, the students, the bundle) serves it
unchanged; the delivered student takes that ``x``. The table columns named like the id inputs hold the ids
the teacher was trained on (integers, read as they are), placed first (`layout_columns`).

A table's size is read where the graph looks an id up straight in a weight (``Gather(weight, ids)``, as
torch exports ``nn.Embedding``): the auto student is then a zoo ``ctr`` with a table per id input.
"""

from __future__ import annotations

from typing import Any

from onnx import ModelProto, TensorProto, helper

from ..types import TOKEN_KEYS

INT_ELEMS = (TensorProto.INT64, TensorProto.INT32)
FLOAT_ELEMS = (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16)
MIN_OPSET = 11
"""Slice with tensor inputs and Gather on any axis (opset 10/11): older graphs are not wrapped."""


def _dims(value: Any) -> list[int]:
    return [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]


def ids_layout(model: ModelProto) -> dict[str, Any] | None:
    """The id and dense inputs of a click model's graph (module doc), or None for any other graph."""
    initialised = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initialised]
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if len(inputs) < 2 or opset < MIN_OPSET or any(i.name in TOKEN_KEYS for i in inputs):
        return None
    ids: list[dict[str, Any]] = []
    dense: list[dict[str, Any]] = []
    for value in inputs:
        elem, dims = value.type.tensor_type.elem_type, _dims(value)
        if elem in INT_ELEMS and (len(dims) == 1 or (len(dims) == 2 and dims[1] == 1)):
            ids.append({"name": value.name, "elem": int(elem), "rank": len(dims)})
        elif elem in FLOAT_ELEMS and len(dims) == 2 and dims[1] > 0:
            dense.append({"name": value.name, "elem": int(elem), "width": dims[1]})
        else:
            return None
    if not ids or len(dense) > 1:
        return None
    sizes = _table_sizes(model)
    for spec in ids:
        spec["size"] = sizes.get(spec["name"])
    return {"ids": ids, "dense": dense[0] if dense else None}


def _table_sizes(model: ModelProto) -> dict[str, int]:
    """Input name → rows of the weight a ``Gather`` looks it up in (directly, or after one Cast / Reshape /
    Squeeze / Unsqueeze / Clip)."""
    weights = {t.name: list(t.dims) for t in model.graph.initializer}
    source: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type in ("Cast", "Reshape", "Squeeze", "Unsqueeze", "Clip") and node.input:
            source[node.output[0]] = node.input[0]
    sizes: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) == 2 and node.input[0] in weights:
            name = source.get(node.input[1], node.input[1])
            if weights[node.input[0]]:
                sizes[name] = int(weights[node.input[0]][0])
    return sizes


def input_name(model: ModelProto) -> str:
    """``x``, unless the graph already names a tensor so."""
    taken = {n for node in model.graph.node for n in (*node.input, *node.output)}
    taken |= {v.name for v in model.graph.input} | {t.name for t in model.graph.initializer}
    return "x" if "x" not in taken else next(f"kdq_x{i}" for i in range(1000) if f"kdq_x{i}" not in taken)


def wrap_single_input(model: ModelProto, layout: dict[str, Any]) -> ModelProto:
    """``model`` taking one float ``x`` (ids first, then the dense features) instead of its inputs."""
    out = ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    ids, dense = layout["ids"], layout["dense"]
    width = len(ids) + (dense["width"] if dense else 0)
    x = input_name(model)
    nodes, consts = [], []
    for j, spec in enumerate(ids):
        index = f"{x}_kdq_index_{j}"
        consts.append(helper.make_tensor(index, TensorProto.INT64, [1] if spec["rank"] == 2 else [], [j]))
        column = f"{x}_kdq_column_{j}"
        nodes.append(helper.make_node("Gather", [x, index], [column], axis=1))
        nodes.append(helper.make_node("Cast", [column], [spec["name"]], to=spec["elem"]))
    if dense:
        bounds = [(f"{x}_kdq_start", len(ids)), (f"{x}_kdq_end", width), (f"{x}_kdq_axis", 1)]
        consts += [helper.make_tensor(name, TensorProto.INT64, [1], [v]) for name, v in bounds]
        sliced = f"{x}_kdq_dense" if dense["elem"] != TensorProto.FLOAT else dense["name"]
        nodes.append(helper.make_node("Slice", [x, *(n for n, _ in bounds)], [sliced]))
        if sliced != dense["name"]:
            nodes.append(helper.make_node("Cast", [sliced], [dense["name"]], to=dense["elem"]))
    batch = graph.input[0].type.tensor_type.shape.dim[0]
    keep = [v for v in graph.input if v.name in {t.name for t in graph.initializer}]
    new_input = helper.make_tensor_value_info(x, TensorProto.FLOAT, [None, width])
    new_input.type.tensor_type.shape.dim[0].CopyFrom(batch)
    del graph.input[:]
    graph.input.extend([new_input, *keep])
    original = list(graph.node)
    del graph.node[:]
    graph.node.extend([*nodes, *original])
    graph.initializer.extend(consts)
    return out


def layout_columns(teacher: Any) -> list[str] | None:
    """The table columns a click teacher reads first, as ids: a wrapped ONNX teacher's id inputs, or a zoo
    ``ctr`` student of one (its ``categorical`` columns of kind ``ids``, reloaded as a teacher); else None."""
    config = getattr(teacher, "config", None) or {}
    if config.get("ids_layout"):
        return [spec["name"] for spec in config["ids_layout"]["ids"]]
    ids = [c for c in config.get("categorical") or [] if isinstance(c, dict) and c.get("kind") == "ids"]
    return [str(c["column"]) for c in sorted(ids, key=lambda c: c["index"])] or None
