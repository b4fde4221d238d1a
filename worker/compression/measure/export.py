"""Export torch models to ONNX and check the result against PyTorch.

The exporter is torch's TorchScript-based one (``dynamo=False``): on torch 2.13 it exported a zoo
transformer in 0.5 s (the dynamo exporter: 13 s, and it forces opset 18 before converting back) and
all-MiniLM-L6-v2 in 2.6 s, at opset 17, as the plain MatMul / Gemm / Conv patterns that
onnxruntime's quantizers and graph fusions recognise.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from ..errors import CompressionError, InputError, ModelFileError, UnsupportedOpError
from ..types import TOKEN_KEYS

OUTPUT_NAME = "output"
TASK_KEY = "kdq_task"
_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32}


def export_onnx(
    module: nn.Module,
    sample_inputs: dict[str, torch.Tensor],
    path: Path,
    *,
    opset: int = 17,
    dynamic_batch: bool = True,
    dynamic_seq: bool = True,
    task: str | None = None,
    rename: Mapping[str, str] | None = None,
) -> Path:
    """Write ``module`` as an ONNX graph whose inputs are the keys of ``sample_inputs`` (or what
    ``rename`` calls them: a student takes the name its teacher's graph took, e.g. ``image``).

    Axis 0 of every input and of ``output`` is dynamic (``dynamic_batch``); axis 1 of token inputs
    is dynamic too (``dynamic_seq``), and so is axis 1 of a token classifier's output. ``task`` (or ``module.task``) is stored as metadata ``kdq_task``.
    """
    if not sample_inputs:
        raise InputError("export_onnx needs at least one sample input")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = list(sample_inputs)
    names = [(rename or {}).get(k, k) for k in keys]
    axes: dict[str, dict[int, str]] = {}
    for key, name in zip(keys, names):
        ax: dict[int, str] = {}
        if dynamic_batch:
            ax[0] = "batch"
        if dynamic_seq and key in TOKEN_KEYS:
            ax[1] = "sequence"
        if ax:
            axes[name] = ax
    if dynamic_batch:
        axes[OUTPUT_NAME] = {0: "batch"}
    if dynamic_seq and (task or getattr(module, "task", None)) == "token_classification":
        axes[OUTPUT_NAME] = {**axes.get(OUTPUT_NAME, {}), 1: "sequence"}  # one tag per token: (N, T, C)

    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    kwargs = {k: v.to(device) for k, v in sample_inputs.items()}
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings on shape arithmetic; deprecation notice
            torch.onnx.export(
                module,
                (),
                str(path),
                kwargs=kwargs,
                input_names=names,
                output_names=[OUTPUT_NAME],
                dynamic_axes=axes or None,
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
    except Exception as exc:  # the exporter raises many unrelated types for unsupported code
        raise UnsupportedOpError(
            f"the model cannot be exported to ONNX: {type(exc).__name__}: {exc}") from exc
    finally:
        module.train(was_training)

    task = task or getattr(module, "task", None)
    if task:
        model = onnx.load(str(path), load_external_data=False)
        onnx.helper.set_model_props(model, {TASK_KEY: str(task)})
        onnx.save(model, str(path))
    return path


def onnx_size_bytes(path: Path) -> int:
    """Size of the ONNX file plus any external-data files it references."""
    path = Path(path)
    total = path.stat().st_size
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends
        raise ModelFileError(f"{path.name} is not a readable ONNX model: {exc}") from exc
    seen: set[str] = set()
    for tensor in model.graph.initializer:
        if onnx.external_data_helper.uses_external_data(tensor):
            location = next(e.value for e in tensor.external_data if e.key == "location")
            if location not in seen:
                seen.add(location)
                total += (path.parent / location).stat().st_size
    return total


def session(path: Path, threads: int = 1):
    """An onnxruntime CPU session with full graph optimisation and ``threads`` intra-op threads."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        raise ModelFileError(f"onnxruntime cannot load {Path(path).name}: {exc}") from exc


def run_onnx_model(
    path: Path | object,
    inputs: Mapping[str, np.ndarray | torch.Tensor],
    threads: int = 1,
    batch_size: int = 256,
) -> np.ndarray:
    """Run every row of ``inputs`` through the model in batches; returns the stacked first output.

    ``path`` may also be an existing ``onnxruntime.InferenceSession``. Inputs the graph does not
    declare are ignored (e.g. ``token_type_ids`` for a model without it); missing ones raise.
    """
    sess = session(Path(path), threads) if isinstance(path, (str, Path)) else path
    feeds = feed_arrays(sess, inputs)
    n = next(iter(feeds.values())).shape[0]
    outs = [run_rows(sess, {k: v[i : i + batch_size] for k, v in feeds.items()}) for i in range(0, n, batch_size)]
    return np.concatenate(outs, axis=0) if outs else np.zeros((0,), np.float32)


def fixed_batch(sess) -> int | None:
    """The batch size a graph was exported with when its first input's batch axis is a number (torch's
    default exporter writes the sample's: ``[1, 1, 28, 28]``); None when the axis is dynamic."""
    dim = sess.get_inputs()[0].shape[0]
    return dim if isinstance(dim, int) and dim > 0 else None


def run_rows(sess, feeds: Mapping[str, np.ndarray], output: str | None = None) -> np.ndarray:
    """``output`` (default: the first) for every row of ``feeds``; a graph with a fixed batch size runs
    in chunks of it, the last one zero-padded, so it is measured and scored like any other."""
    names = [output] if output else None
    b = fixed_batch(sess)
    n = next(iter(feeds.values())).shape[0]
    if b is None or n == b:
        return sess.run(names, dict(feeds))[0]
    parts = []
    for start in range(0, n, b):
        rows = min(b, n - start)
        chunk = {k: v[start:start + b] for k, v in feeds.items()}
        if rows < b:
            chunk = {k: np.concatenate([v, np.zeros((b - rows, *v.shape[1:]), v.dtype)]) for k, v in chunk.items()}
        parts.append(sess.run(names, chunk)[0][:rows])
    return np.concatenate(parts)


def feed_arrays(sess, inputs: Mapping[str, np.ndarray | torch.Tensor]) -> dict[str, np.ndarray]:
    """The graph's inputs taken from ``inputs``, as numpy arrays of the dtype the graph declares. A
    graph of one input takes the one array given whatever either is called (``x`` for ``image``)."""
    feeds: dict[str, np.ndarray] = {}
    missing = []
    specs = sess.get_inputs()
    if len(specs) == 1 and len(inputs) == 1 and specs[0].name not in inputs:
        inputs = {specs[0].name: next(iter(inputs.values()))}
    for spec in specs:
        if spec.name not in inputs:
            missing.append(spec.name)
            continue
        value = inputs[spec.name]
        arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        feeds[spec.name] = arr.astype(_ORT_DTYPES.get(spec.type, arr.dtype), copy=False)
    if missing:
        raise InputError(f"the ONNX model needs inputs {missing}, got {sorted(inputs)}")
    return feeds


def check_onnx(
    path: Path,
    module: nn.Module,
    sample_inputs: dict[str, torch.Tensor],
    *,
    atol: float = 1e-4,
    rtol: float = 1e-3,
) -> dict[str, object]:
    """Validate the graph with onnx.checker, run it in onnxruntime and compare with PyTorch.

    Passes when every element satisfies ``|onnx - torch| <= atol + rtol * |torch|``; the first row
    alone is also run to prove the batch axis is really dynamic. Raises CompressionError otherwise.
    """
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise CompressionError(f"{Path(path).name} fails onnx.checker: {exc}") from exc
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            expected = module(**{k: v.to(device) for k, v in sample_inputs.items()}).float().cpu().numpy()
    finally:
        module.train(was_training)
    sess = session(Path(path))
    got = run_onnx_model(sess, sample_inputs)
    first = run_onnx_model(sess, {k: v[:1] for k, v in sample_inputs.items()})
    if got.shape != expected.shape or first.shape[1:] != expected.shape[1:]:
        raise CompressionError(f"ONNX output shape {got.shape} differs from PyTorch {tuple(expected.shape)}")
    diff = np.abs(got - expected)
    diff_first = np.abs(first - expected[:1])
    bound = atol + rtol * np.abs(expected)
    ok = bool(np.all(diff <= bound) and np.all(diff_first <= bound[:1]))
    result = {
        "max_abs_diff": float(max(diff.max(initial=0.0), diff_first.max(initial=0.0))),
        "tolerance": {"atol": atol, "rtol": rtol},
        "ok": ok,
    }
    if not ok:
        raise CompressionError(
            f"ONNX output differs from PyTorch by up to {result['max_abs_diff']:.3g} "
            f"(allowed {atol} + {rtol}·|value|)"
        )
    return result
