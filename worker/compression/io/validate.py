"""Upload validation: inspect a model or dataset file with the engine's loaders.

Used by the worker's light ``validate`` queue. Returns a JSON-safe summary, or raises an
``errors.InputError`` whose message says what is wrong with the upload.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from ..errors import UnsupportedFormatError
from ..spec import DataSpec
from .data_common import DataLimits
from .datasets import load_dataset
from .sandbox import SandboxLimits, close_teacher
from .teachers import load_teacher

MODEL_FORMATS = ("auto", "zoo_zip", "hf_zip", "onnx", "onnx_zip", "torchscript", "exported_program")
_KIND_OF_FORMAT = {"zoo_zip": "zoo", "hf_zip": "hf", "onnx_zip": "onnx", "torchscript": "torchscript",
                   "exported_program": "exported_program"}


def validate_model(path: Path, format: str = "auto", *, allow_code: bool = False,
                   sandbox: SandboxLimits | None = None, memory_bytes: int | None = None) -> dict[str, Any]:
    """Load the uploaded teacher exactly as a job would and summarise it (a code-bearing one
    in its sandbox, when ``allow_code``; the sandbox ends with the teacher). ``memory_bytes``: the
    validation's memory limit, which an estimate from the file's own description must fit first."""
    if format not in MODEL_FORMATS:
        raise UnsupportedFormatError(f"unknown model format {format!r}; use one of {', '.join(MODEL_FORMATS)}")
    with _named_copy(path, ".onnx" if format == "onnx" else ".zip" if format.endswith("_zip") else "") as p:
        teacher = load_teacher(p, allow_code=allow_code, sandbox=sandbox, memory_bytes=memory_bytes)
    try:
        want = _KIND_OF_FORMAT.get(format)
        if want is not None and teacher.kind != want:
            raise UnsupportedFormatError(f"declared format {format} but the upload holds a {teacher.kind} model")
        summary = teacher.summary()
        summary["format"] = _format_of(teacher.kind, path)
        if "activation_bytes" in teacher.config:  # (for the API's cost check at submission)
            summary["activation_bytes"] = teacher.config["activation_bytes"]
        return summary
    finally:
        close_teacher(teacher)


def _format_of(kind: str, path: Path) -> str:
    """The upload's format as a job fetches it: an ONNX graph alone, or in a zip with its data files."""
    if kind == "onnx":
        return "onnx_zip" if zipfile.is_zipfile(path) else "onnx"
    return {"zoo": "zoo_zip", "hf": "hf_zip"}.get(kind, kind)


def validate_dataset(path: Path, spec: DataSpec | None = None, *, memory_bytes: int | None = None) -> dict[str, Any]:
    """Read the uploaded dataset and summarise it. Text data is checked structurally:
    its rows are parsed but tokenized only at job time, with the teacher's tokenizer. Data whose
    decoded size (from its headers) is past half of ``memory_bytes`` is refused before decoding."""
    spec = spec or DataSpec()
    with _named_copy(path, _suffix_for(spec.format)) as p:
        data = load_dataset(p, spec, structure_only=True, limits=DataLimits(memory_bytes=memory_bytes))
    return data.summary()


_SUFFIXES = {"npz": ".npz", "safetensors": ".safetensors", "csv": ".csv", "parquet": ".parquet",
             "jsonl": ".jsonl", "text_csv": ".csv", "image_zip": ".zip", "audio_zip": ".zip"}
"""An ``image_zip`` may hold a tar(.gz) too: archives are told apart by their bytes."""


def _suffix_for(fmt: str) -> str:
    return _SUFFIXES.get(fmt, "")


class _named_copy:
    """Uploads are stored by sha256 without an extension; loaders detect formats by suffix,
    so expose the blob under a suffixed name (a hard link when possible, else a copy)."""

    def __init__(self, path: Path, suffix: str) -> None:
        self.path, self.suffix = Path(path), suffix
        self.tmp: str | None = None

    def __enter__(self) -> Path:
        if not self.suffix or self.path.suffix == self.suffix:
            return self.path
        self.tmp = tempfile.mkdtemp(prefix="kdq-validate-")
        target = Path(self.tmp) / f"upload{self.suffix}"
        try:
            os.link(self.path, target)
        except OSError:
            shutil.copyfile(self.path, target)
        return target

    def __exit__(self, *exc: object) -> None:
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
