"""What an uploaded file really is, from its bytes (torch-free: the API sniffs uploads too).

The declared format and the file name are only claims; these checks decide whether a
file is a Python pickle (never loaded), a TorchScript or ExportedProgram archive
(code-bearing: loaded only in the sandbox, and only when the operator allows it), or
one of the data formats the loaders read.
"""

from __future__ import annotations

import os
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

from .safetensors_header import looks_like_safetensors

FileKind = Literal["pickle", "torch_pickle", "torchscript", "exported_program", "safetensors", "zip", "tar",
                   "npy", "gzip", "unknown"]
CODE_KINDS = ("torchscript", "exported_program")
"""Code-bearing archives the sandbox can run."""
PICKLE_KINDS = ("pickle", "torch_pickle")
"""Formats that would run code when loaded: refused whatever the operator allows."""
PICKLE_MESSAGE = ("this is a Python pickle{how}; pickles can run code and are never loaded; "
                  "export safetensors (with a config.json) or ONNX")
CODE_MESSAGE = ("this is a {what} archive, a code-bearing checkpoint; the operator must enable them with "
                "KDQ_ALLOW_CODE_CHECKPOINTS=1 (they then run only in a sandbox); otherwise export safetensors "
                "(with a config.json) or ONNX")
DESCRIPTIONS = {"torchscript": "TorchScript (torch.jit.save)",
                "exported_program": "ExportedProgram (torch.export.save)"}
HEAD_BYTES = 16


@dataclass(frozen=True)
class Sniffed:
    kind: FileKind
    members: tuple[str, ...] = ()
    """Zip member names, when the file is a zip."""


def is_pickle(head: bytes) -> bool:
    """Pickle protocol 2+ opens with PROTO (0x80) and the protocol number; ``torch.save``'s
    legacy format and ``pickle.dumps`` both do."""
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def torch_archive_kind(names: list[str] | tuple[str, ...]) -> FileKind | None:
    """The kind of zip that torch.save / torch.jit.save / torch.export.save writes, from its
    member names (``<top>/data.pkl``, ``<top>/code/``, ``<top>/archive_format``), or None."""
    markers: set[str] = set()
    for name in names:
        parts = PurePosixPath(name).parts
        if len(parts) in (1, 2):  # a file at the top or in the one top folder
            markers.add(parts[-1])
        elif len(parts) > 2:  # a folder inside the top folder
            markers.add(parts[1] + "/")
    if "archive_format" in markers and "models/" in markers:
        return "exported_program"
    if "constants.pkl" in markers or ("code/" in markers and "data.pkl" in markers):
        return "torchscript"
    if "data.pkl" in markers:
        return "torch_pickle"
    if "archive_format" in markers:
        return "exported_program"
    return None


def sniff(path: str | os.PathLike[str]) -> Sniffed:
    """Classify ``path`` by content (see the module doc)."""
    path = Path(path)
    with open(path, "rb") as fh:
        head = fh.read(HEAD_BYTES)
    if is_pickle(head):
        return Sniffed("pickle")
    if head.startswith(b"\x93NUMPY"):
        return Sniffed("npy")
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as zf:
                names = tuple(zf.namelist())
        except (zipfile.BadZipFile, OSError, ValueError, EOFError):
            return Sniffed("zip")
        return Sniffed(torch_archive_kind(names) or "zip", names)
    if looks_like_safetensors(head):
        return Sniffed("safetensors")
    try:
        if tarfile.is_tarfile(path):
            return Sniffed("tar")
    except (OSError, EOFError, tarfile.TarError):
        pass
    if head.startswith(b"\x1f\x8b"):
        return Sniffed("gzip")
    return Sniffed("unknown")


def pickle_message(kind: FileKind) -> str:
    return PICKLE_MESSAGE.format(how=" (torch.save)" if kind == "torch_pickle" else "")


def code_message(kind: FileKind) -> str:
    return CODE_MESSAGE.format(what=DESCRIPTIONS.get(kind, kind))


AUDIO_SUFFIXES = (".wav", ".flac")


def has_audio(names: list[str]) -> bool:
    """An archive's member names look like audio class folders (``format: auto`` tells an audio zip from
    an image zip by this, before anything is extracted)."""
    lowered = [n.lower() for n in names]
    return any(n.endswith(AUDIO_SUFFIXES) for n in lowered) and not any(
        n.endswith((".png", ".jpg", ".jpeg")) for n in lowered)
