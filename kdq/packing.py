"""What a user points at is not always one file: a transformers or zoo *folder*, or an ONNX graph
saved the way torch's exporter saves a large model (``model.onnx`` plus ``model.onnx.data`` beside
it). `packed` turns those into the one zip the service takes, in a temporary folder; a plain file
goes as it is."""

from __future__ import annotations

import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def external_data_files(graph: Path) -> list[Path]:
    """The files an ``.onnx`` graph keeps its weights in, beside it: the locations its tensors name
    (read with the ``onnx`` package when it is installed), else the usual ``<name>.data``."""
    try:
        import onnx
        from onnx.external_data_helper import ExternalDataInfo, uses_external_data
    except ImportError:
        guess = [graph.with_name(graph.name + ".data"), graph.with_suffix(".data")]
        return [p for p in guess if p.is_file()][:1]
    try:
        model = onnx.load(str(graph), load_external_data=False)
    except Exception:  # noqa: BLE001 — not ours to judge: the service says what is wrong with it
        return []
    found: list[Path] = []
    tensors = [*model.graph.initializer, *(a.t for n in model.graph.node for a in n.attribute if a.HasField("t"))]
    for tensor in tensors:
        if uses_external_data(tensor):
            location = (graph.parent / ExternalDataInfo(tensor).location).resolve()
            if location.is_file() and location.parent == graph.parent.resolve() and location not in found:
                found.append(location)
    return found


@contextmanager
def packed(path: Path, format: str) -> Iterator[tuple[Path, str]]:
    """(the file to send, its format): a folder zipped (format ``auto``: the service tells zoo,
    transformers or ONNX apart), an ONNX graph with its external data zipped as ``onnx_zip``."""
    data = external_data_files(path) if path.is_file() and path.suffix.lower() == ".onnx" else []
    if not path.is_dir() and not data:
        yield path, format
        return
    with tempfile.TemporaryDirectory(prefix="kdq-pack-") as tmp:
        archive = Path(tmp) / f"{path.name}.zip"
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
            if path.is_dir():
                for file in sorted(p for p in path.rglob("*") if p.is_file() and not p.is_symlink()):
                    zf.write(file, file.relative_to(path).as_posix())
            else:
                for file in [path, *data]:
                    zf.write(file, file.name)
        yield archive, ("onnx_zip" if data and format in ("auto", "onnx") else format)
