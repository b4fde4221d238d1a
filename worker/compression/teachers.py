"""Load an uploaded teacher safely, whatever shape the upload has.

Accepted: a zoo folder (``config.json`` naming an ``architecture`` + ``model.safetensors``),
a Hugging Face folder (``config.json`` with ``model_type`` + safetensors weights), an ONNX
file (or a folder holding exactly one), or a ``.zip`` of any of these folders.
Pickle-based and code-bearing checkpoints (torch.save, TorchScript, ExportedProgram) are
refused by name and by content sniffing; they are never opened with torch.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import weakref
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from torch import nn

from . import safetensors_io, zoo
from .archives import safe_extract_zip
from .errors import ModelFileError, SpecError, UnsafeFileError, UnsupportedFormatError
from .types import Teacher

ZOO_FORMAT = "kdq-zoo"
WEIGHTS = "model.safetensors"
CODE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle", ".pt2", ".jit", ".ptl")
TORCH_ARCHIVE_MARKERS = {"data.pkl", "constants.pkl", "archive_format"}
"""Entries of the zips written by torch.save / torch.jit.save / torch.export.save."""
PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
ACCEPTED = ("a zoo folder (config.json with 'architecture' + model.safetensors), "
            "a Hugging Face folder (config.json with 'model_type' + model.safetensors), "
            "an .onnx file, or a .zip of one of these folders")
_IGNORED = {"__MACOSX", ".DS_Store"}


def _refuse_code(name: str, allow_code: bool) -> None:
    if allow_code:
        raise UnsupportedFormatError(
            f"{name}: code-bearing checkpoints (pickle, TorchScript, ExportedProgram) need a sandbox "
            "that is not available yet; upload safetensors with a config.json, or ONNX")
    raise UnsafeFileError(
        f"{name}: code-bearing checkpoints (pickle, TorchScript, ExportedProgram) are off "
        "(operator flag KDQ_ALLOW_CODE_CHECKPOINTS, not supported yet); "
        "upload safetensors with a config.json, or ONNX")


def _is_torch_archive(names: list[str]) -> bool:
    """True for zips written by torch.save / TorchScript / torch.export (``<top>/data.pkl`` etc.)."""
    for name in names:
        parts = PurePosixPath(name).parts
        if len(parts) <= 2 and parts and parts[-1] in TORCH_ARCHIVE_MARKERS:
            return True
    return False


def _content_root(folder: Path) -> Path:
    """Descend into the single top-level folder many zip tools add."""
    entries = [p for p in folder.iterdir() if p.name not in _IGNORED]
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return folder


def _check_task(task: str | None) -> None:
    if task is not None and task not in zoo.TASKS:
        raise SpecError(f"unknown task {task!r}; known: {', '.join(zoo.TASKS)}")


def load_teacher(path: str | os.PathLike[str], *, task: str | None = None, allow_code: bool = False) -> Teacher:
    """Load a teacher from a folder, a zip of a folder, or an ONNX file (see the module doc)."""
    _check_task(task)
    path = Path(path)
    if path.is_dir():
        return _load_folder(path, task, allow_code)
    if not path.is_file():
        raise ModelFileError(f"{path.name}: no such file or folder")
    suffix = path.suffix.lower()
    if suffix in CODE_SUFFIXES:
        _refuse_code(path.name, allow_code)
    if suffix == ".onnx":
        from .onnx_teacher import load_onnx_teacher
        return load_onnx_teacher(path, task=task)
    if suffix == ".safetensors":
        raise UnsupportedFormatError(
            f"{path.name}: bare safetensors weights need a config.json naming the architecture; "
            f"upload {ACCEPTED}")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic.startswith(PICKLE_MAGIC):
        _refuse_code(path.name, allow_code)
    if suffix == ".zip" or zipfile.is_zipfile(path):
        return _load_zip(path, task, allow_code)
    raise UnsupportedFormatError(f"{path.name}: unrecognised model file; upload {ACCEPTED}")


def _load_zip(path: Path, task: str | None, allow_code: bool) -> Teacher:
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise UnsupportedFormatError(f"{path.name} is not a readable zip archive: {exc}") from exc
    if _is_torch_archive(names):
        _refuse_code(path.name, allow_code)
    tmp = Path(tempfile.mkdtemp(prefix="kdq-teacher-"))
    try:
        safe_extract_zip(path, tmp)
        teacher = _load_folder(_content_root(tmp), task, allow_code)
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


def _load_folder(folder: Path, task: str | None, allow_code: bool) -> Teacher:
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
            from .hf import load_hf_teacher
            return load_hf_teacher(folder, task=task)
        raise UnsupportedFormatError(
            "config.json names neither an 'architecture' (zoo) nor a 'model_type' (Hugging Face)")
    onnx_files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".onnx")
    if len(onnx_files) == 1:
        from .onnx_teacher import load_onnx_teacher
        return load_onnx_teacher(onnx_files[0], task=task)
    if len(onnx_files) > 1:
        raise UnsupportedFormatError(
            f"the folder holds {len(onnx_files)} .onnx files ({', '.join(p.name for p in onnx_files)}); "
            "upload exactly one")
    pickles = _pickle_files(folder)
    if pickles:
        _refuse_code(", ".join(pickles), allow_code)
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
    )


def save_zoo_model(module: nn.Module, config: dict[str, Any], folder: str | os.PathLike[str]) -> Path:
    """Write ``config.json`` and ``model.safetensors``: a folder ``load_teacher`` reads back."""
    cfg = zoo.validate_config({k: v for k, v in config.items() if k != "format"})
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**cfg, "format": ZOO_FORMAT}, indent=2), encoding="utf-8")
    safetensors_io.save_module(module, folder / WEIGHTS)
    return folder
