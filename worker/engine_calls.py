"""What a confined child (`worker.confine`) runs: one engine call, its messages and its errors as
JSON. Each function here is called in the child only; the engine's modules are imported by the
worker process once (`preload`), before any fork, and never run there.

Messages a job sends: ``{"kind": "progress", stage, step, total, loss, metric, eta_s, message}``.
Errors are named (`classify`): ``input`` (the upload or spec is at fault, with its code),
``cancelled``, ``storage`` (the disk is full); anything else is ``internal``.

The engine is imported inside the functions: the worker's main process imports this module too,
and must stay light (only its pool processes `preload` the engine).
"""

from __future__ import annotations

import errno
import math
from pathlib import Path
from typing import Any

from service.core.outcomes import jsonable

from .confine import Channel

STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def preload() -> None:
    """Import the engine (torch, onnxruntime, transformers …) so that each forked child starts at
    once. Only imports: nothing runs, so no thread pool exists to be forked."""
    import transformers.models.bert.modeling_bert  # noqa: F401  (~5 s a child would pay per HF upload)
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer  # noqa: F401

    import worker.compression.compress  # noqa: F401
    import worker.compression.io.validate  # noqa: F401


def classify(exc: BaseException) -> tuple[str, str, str | None] | None:
    from worker.compression.errors import Cancelled, InputError

    if isinstance(exc, Cancelled):
        return "cancelled", str(exc), None
    if isinstance(exc, InputError):
        return "input", str(exc), getattr(exc, "code", "invalid_input")
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in STORAGE_ERRNOS:
            return "storage", f"no space left on the device{f' ({current.filename})' if current.filename else ''}", None
        current = current.__cause__ or current.__context__
    return None


def validate_upload(path: Path, upload_kind: str, fmt: str, options: dict[str, Any],
                    code_options: dict[str, Any], memory_bytes: int | None = None) -> dict[str, Any]:  # fmt: skip
    """The upload's summary (`worker.compression.io.validate`); ``memory_bytes`` is the child's cap,
    which estimates from the file's headers must fit before anything is decoded."""
    from worker.compression.io.validate import validate_dataset, validate_model
    from worker.compression.spec import DataSpec

    if upload_kind == "model":
        return jsonable(validate_model(path, fmt, memory_bytes=memory_bytes, **code_options))
    return jsonable(validate_dataset(path, DataSpec.model_validate(options), memory_bytes=memory_bytes))


def run_compress(channel: Channel, spec: dict[str, Any], inputs: dict[str, Path | None], output_dir: Path,
                 checkpoint_dir: Path, code_options: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """One `compress()` run: its artifacts (name, kind, path, description) and metrics."""
    from worker.compression.compress import compress
    from worker.compression.spec import CompressSpec

    def progress(p: Any) -> None:
        channel.report({"kind": "progress", "stage": p.stage, "step": p.step, "total": p.total,
                        "fraction": p.fraction, "loss": _finite(p.loss), "metric": _finite(p.metric),
                        "eta_s": _finite(p.eta_s), "message": p.message})  # fmt: skip

    result = compress(CompressSpec.model_validate(spec), **inputs, output_dir=output_dir, progress=progress,
                      cancel=channel.stop_requested, checkpoint_dir=checkpoint_dir, **code_options)  # fmt: skip
    return {
        "artifacts": [{"name": a.name, "kind": a.kind, "path": str(a.path), "description": a.description or ""}
                      for a in result.artifacts],  # fmt: skip
        "metrics": jsonable(result.metrics),
    }


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


