"""Load an uploaded teacher safely, whatever shape the upload has.

Accepted: a zoo folder (``config.json`` naming an ``architecture`` + ``model.safetensors``),
a Hugging Face folder (``config.json`` with ``model_type`` + safetensors weights), an ONNX
file (or a folder holding exactly one), or a zip / tar(.gz) of any of these folders.
What a file is comes from its bytes (`sniff`), not its name: a Python pickle (``torch.save``)
is never loaded; TorchScript and ExportedProgram archives are code-bearing and load only
when the operator allows them (``allow_code``), and then only inside a sandboxed child
process (`sandbox`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelFileError, SpecError, UnsafeFileError, UnsupportedFormatError
from ..students import zoo
from ..types import Teacher
from . import safetensors_io
from .archives import safe_extract
from .hf_folder import load_hf_teacher
from .onnx_teacher import load_onnx_teacher
from .sandbox import SandboxLimits, load_sandboxed_teacher
from .sniff import CODE_KINDS, PICKLE_KINDS, code_message, pickle_message, sniff
from .teacher_meta import class_names

ZOO_FORMAT = "kdq-zoo"
WEIGHTS = "model.safetensors"
CODE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle", ".pt2", ".jit", ".ptl")
ACCEPTED = ("a zoo folder (config.json with 'architecture' + model.safetensors), "
            "a Hugging Face folder (config.json with 'model_type' + model.safetensors), "
            "an .onnx file, or a .zip / .tar(.gz) of one of these folders")
_IGNORED = {"__MACOSX", ".DS_Store"}


def _content_root(folder: Path) -> Path:
    """Descend into the single top-level folder many archive tools add."""
    entries = [p for p in folder.iterdir() if p.name not in _IGNORED]
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return folder


def _check_task(task: str | None) -> None:
    if task is not None and task not in zoo.TASKS:
        raise SpecError(f"unknown task {task!r}; known: {', '.join(zoo.TASKS)}")


def load_teacher(path: str | os.PathLike[str], *, task: str | None = None, allow_code: bool = False,
                 sandbox: SandboxLimits | None = None, memory_bytes: int | None = None) -> Teacher:
    """Load a teacher from a folder, an archive of a folder, or a model file (see the module doc).

    ``allow_code`` (the operator's ``KDQ_ALLOW_CODE_CHECKPOINTS``) lets TorchScript and
    ExportedProgram files load, in a sandboxed child limited by ``sandbox``. ``memory_bytes`` (the
    task's memory limit) refuses an ONNX graph whose tensors would not fit, before it runs.
    """
    _check_task(task)
    path = Path(path)
    if path.is_dir():
        return _load_folder(path, task, allow_code, sandbox, memory_bytes)
    if not path.is_file():
        raise ModelFileError(f"{path.name}: no such file or folder")
    kind = sniff(path).kind
    if kind in PICKLE_KINDS:
        raise UnsafeFileError(f"{path.name}: {pickle_message(kind)}")
    if kind in CODE_KINDS:
        return _load_code(path, kind, task, allow_code, sandbox)
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return load_onnx_teacher(path, task=task, memory_bytes=memory_bytes)
    if kind == "safetensors" or suffix == ".safetensors":
        raise UnsupportedFormatError(
            f"{path.name}: bare safetensors weights need a config.json naming the architecture; "
            f"upload {ACCEPTED}")
    if kind in ("zip", "tar"):
        return _load_archive(path, task, allow_code, sandbox, memory_bytes)
    if suffix in (".zip", ".tar", ".tgz", ".gz"):
        raise UnsupportedFormatError(f"{path.name} is not a readable zip or tar archive (truncated?)")
    raise UnsupportedFormatError(f"{path.name}: unrecognised model file; upload {ACCEPTED}")


def _load_code(path: Path, kind: str, task: str | None, allow_code: bool,
               sandbox: SandboxLimits | None) -> Teacher:
    if not allow_code:
        raise UnsafeFileError(f"{path.name}: {code_message(kind)}")
    return load_sandboxed_teacher(path, kind, task=task, limits=sandbox or SandboxLimits())


def _load_archive(path: Path, task: str | None, allow_code: bool, sandbox: SandboxLimits | None,
                  memory_bytes: int | None) -> Teacher:  # fmt: skip
    tmp = Path(tempfile.mkdtemp(prefix="kdq-teacher-"))
    try:
        safe_extract(path, tmp)
        teacher = _load_folder(_content_root(tmp), task, allow_code, sandbox, memory_bytes)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    weakref.finalize(teacher, shutil.rmtree, tmp, ignore_errors=True)
    return teacher


def _pickle_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in CODE_SUFFIXES)


def _read_config(folder: Path) -> dict[str, Any]:
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"config.json is not valid JSON: {exc}") from exc
    if not isinstance(cfg, dict):
        raise ModelFileError("config.json must be a JSON object")
    return cfg


def _load_folder(folder: Path, task: str | None, allow_code: bool, sandbox: SandboxLimits | None,
                 memory_bytes: int | None = None) -> Teacher:  # fmt: skip
    if (folder / "config.json").is_file():
        cfg = _read_config(folder)
        pickles = _pickle_files(folder)
        if pickles and not any(folder.glob("*.safetensors")):
            raise UnsafeFileError(
                f"the folder has only pickle checkpoints ({', '.join(pickles)}); pickle checkpoints are "
                f"refused, save the weights as {WEIGHTS} (safetensors) instead")
        if "architecture" in cfg:
            return _load_zoo(folder, cfg, task)
        if "model_type" in cfg:
            return load_hf_teacher(folder, task=task)
        raise UnsupportedFormatError(
            "config.json names neither an 'architecture' (zoo) nor a 'model_type' (Hugging Face)")
    onnx_files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".onnx")
    if len(onnx_files) == 1:
        return load_onnx_teacher(onnx_files[0], task=task, memory_bytes=memory_bytes)
    if len(onnx_files) > 1:
        raise UnsupportedFormatError(
            f"the folder holds {len(onnx_files)} .onnx files ({', '.join(p.name for p in onnx_files)}); "
            "upload exactly one")
    checkpoints = [p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in CODE_SUFFIXES]
    kinds = {p: sniff(p).kind for p in checkpoints}
    for p, kind in kinds.items():
        if kind not in CODE_KINDS:
            reason = pickle_message(kind) if kind in PICKLE_KINDS else (
                "not a TorchScript or ExportedProgram archive, and other checkpoints (pickles) are never "
                "loaded; export safetensors (with a config.json) or ONNX")
            raise UnsafeFileError(f"{p.name}: {reason}")
    if len(checkpoints) == 1:
        return _load_code(checkpoints[0], kinds[checkpoints[0]], task, allow_code, sandbox)
    if checkpoints:
        raise UnsupportedFormatError(
            f"the folder holds {len(checkpoints)} checkpoints ({', '.join(p.name for p in checkpoints)}); "
            "upload exactly one")
    if any(folder.glob("*.safetensors")):
        raise UnsupportedFormatError(
            "safetensors weights without a config.json: add a config.json naming the architecture")
    raise UnsupportedFormatError(f"no model found in the folder; upload {ACCEPTED}")


def _load_zoo(folder: Path, cfg: dict[str, Any], task: str | None) -> Teacher:
    fmt = cfg.get("format", ZOO_FORMAT)
    if fmt != ZOO_FORMAT:
        raise UnsupportedFormatError(f"config.json has format {fmt!r}; expected {ZOO_FORMAT!r}")
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise ModelFileError(f"the zoo folder has config.json but no {WEIGHTS}")
    declared = "task" in cfg
    try:
        cfg = zoo.validate_config({k: v for k, v in cfg.items() if k != "format"})
        if task is not None:
            cfg["task"] = task
        with torch.device("meta"):  # shapes only: a huge config must not allocate before the file agrees
            shapes = {k: tuple(v.shape) for k, v in zoo.build(cfg).state_dict().items()}
        safetensors_io.check_header(weights, shapes)
        module = zoo.build(cfg)
    except SpecError as exc:
        raise ModelFileError(f"config.json: {exc}") from exc
    safetensors_io.load_into(module, weights)
    module.eval()
    return Teacher(
        kind="zoo",
        task=cfg["task"],
        input_kind=zoo.input_kind(cfg),
        input_shape=zoo.input_shape(cfg),
        output_dim=int(cfg["output_dim"]),
        config=cfg,
        module=module,
        source_dir=folder,
        num_parameters=zoo.count_parameters(module),
        size_bytes=weights.stat().st_size,
        classes=class_names(cfg.get("classes"), int(cfg["output_dim"]), "config.json classes"),
        task_source="declared" if declared or task is not None else "inferred",
    )


def save_zoo_model(module: nn.Module, config: dict[str, Any], folder: str | os.PathLike[str]) -> Path:
    """Write ``config.json`` and ``model.safetensors``: a folder ``load_teacher`` reads back."""
    cfg = zoo.validate_config({k: v for k, v in config.items() if k != "format"})
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**cfg, "format": ZOO_FORMAT}, indent=2), encoding="utf-8")
    safetensors_io.save_module(module, folder / WEIGHTS)
    return folder
