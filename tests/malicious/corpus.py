"""Writers of hostile uploads. Each returns the path it wrote.

The pickles carry a ``__reduce__`` that opens (creates) a canary file when unpickled:
the canary existing after a test means something unpickled an upload.
"""

from __future__ import annotations

import io
import json
import pickle
import stat
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np

TEACHER_CONFIG = {"architecture": "mlp", "task": "classification", "input_dim": 6, "hidden": [8], "output_dim": 3}


class Canary:
    """Unpickling this calls ``open(path, "w")``, creating the canary file."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):  # noqa: ANN204
        return (open, (self.path, "w"))


# --- pickles -------------------------------------------------------------------------------------

def pickle_canary(path: Path, canary: Path) -> Path:
    path.write_bytes(pickle.dumps(Canary(canary), protocol=4))
    return path


def torch_save_canary(path: Path, canary: Path) -> Path:
    """A ``torch.save`` archive (``<top>/data.pkl``) whose pickle creates the canary."""
    import torch

    torch.save({"weights": Canary(canary)}, path)
    return path


def npz_object_canary(path: Path, canary: Path) -> Path:
    """An .npz whose ``x`` is an object array: numpy stores it as a pickle of the canary."""
    payload = np.empty(2, dtype=object)
    payload[0], payload[1] = Canary(canary), Canary(canary)
    with open(path, "wb") as fh:
        np.savez(fh, x=payload, y=np.zeros(2, dtype=np.int64))
    return path


def zoo_zip_with_pickle(path: Path, canary: Path) -> Path:
    """A zoo folder whose only weights are a pickle (``model.pt``)."""
    return _zip(path, {"config.json": json.dumps(TEACHER_CONFIG).encode(),
                       "model.pt": pickle.dumps(Canary(canary), protocol=4)})


# --- archives ------------------------------------------------------------------------------------

def _zip(path: Path, members: dict[str, bytes], modes: dict[str, int] | None = None) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = (modes or {}).get(name, stat.S_IFREG | 0o644) << 16
            zf.writestr(info, data)
    return path


def zip_slip(path: Path) -> Path:
    return _zip(path, {"config.json": b"{}", "../../kdq-zip-slip.txt": b"escaped"})


def zip_symlink(path: Path) -> Path:
    return _zip(path, {"config.json": b"{}", "weights": b"/etc/passwd"}, {"weights": stat.S_IFLNK | 0o777})


def zip_bomb(path: Path, mib: int = 64) -> Path:
    """``mib`` MiB of zeros deflated to about a thousandth of that."""
    return _zip(path, {"config.json": b"{}", "model.safetensors": b"\0" * (mib << 20)})


def tar_symlink(path: Path, target: str = "../../../etc") -> Path:
    """A tar whose ``weights`` member is a symlink out of the folder, then a file written through it."""
    with tarfile.open(path, "w:gz") as tf:
        link = tarfile.TarInfo("folder/weights")
        link.type, link.linkname = tarfile.SYMTYPE, target
        tf.addfile(link)
        data = b"escaped"
        through = tarfile.TarInfo("folder/weights/kdq-tar-escape.txt")
        through.size = len(data)
        tf.addfile(through, io.BytesIO(data))
    return path


def tar_hardlink(path: Path) -> Path:
    with tarfile.open(path, "w") as tf:
        link = tarfile.TarInfo("config.json")
        link.type, link.linkname = tarfile.LNKTYPE, "/etc/passwd"
        tf.addfile(link)
    return path


def tar_device(path: Path) -> Path:
    with tarfile.open(path, "w") as tf:
        dev = tarfile.TarInfo("disk")
        dev.type, dev.devmajor, dev.devminor = tarfile.BLKTYPE, 8, 0
        tf.addfile(dev)
        fifo = tarfile.TarInfo("pipe")
        fifo.type = tarfile.FIFOTYPE
        tf.addfile(fifo)
    return path


def tar_gz_bomb(path: Path, mib: int = 64) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        info = tarfile.TarInfo("class_a/zeros.png")
        info.size = mib << 20
        tf.addfile(info, io.BytesIO(b"\0" * info.size))
    return path


# --- safetensors ---------------------------------------------------------------------------------

def raw_safetensors(header: dict, data: bytes) -> bytes:
    body = json.dumps(header).encode()
    return struct.pack("<Q", len(body)) + body + data


def zoo_safetensors(values: dict[str, np.ndarray]) -> bytes:
    """A safetensors file of float32 arrays, written by hand (so any value, NaN included, fits)."""
    header, data, offset = {}, b"", 0
    for name, arr in values.items():
        raw = np.ascontiguousarray(arr, dtype=np.float32).tobytes()
        header[name] = {"dtype": "F32", "shape": list(arr.shape), "data_offsets": [offset, offset + len(raw)]}
        data += raw
        offset += len(raw)
    return raw_safetensors(header, data)


def mlp_weights(*, nan: bool = False, wrong_shape: bool = False) -> dict[str, np.ndarray]:
    """Weights for TEACHER_CONFIG (zoo mlp: layers.0 = Linear(6, 8), head = Linear(8, 3))."""
    rng = np.random.default_rng(0)
    w = {"layers.0.weight": rng.normal(size=(8, 6)), "layers.0.bias": np.zeros(8),
         "head.weight": rng.normal(size=(3, 8)), "head.bias": np.zeros(3)}
    if nan:
        w["head.weight"][1, 2] = np.nan
    if wrong_shape:
        w["layers.0.weight"] = rng.normal(size=(8, 7))
    return w


def zoo_zip(path: Path, weights: bytes) -> Path:
    return _zip(path, {"config.json": json.dumps(TEACHER_CONFIG).encode(), "model.safetensors": weights})


def truncated_safetensors(path: Path) -> Path:
    good = zoo_safetensors(mlp_weights())
    path.write_bytes(good[: len(good) - 40])
    return path


def lying_offsets_safetensors(path: Path) -> Path:
    """A header whose offsets claim a terabyte of data after a few bytes."""
    n = 1 << 38
    header = {"x": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}}
    path.write_bytes(raw_safetensors(header, b"\0" * 16))
    return path


# --- ONNX, data ----------------------------------------------------------------------------------

def onnx_external_escape(path: Path) -> Path:
    """A zip of a folder whose ONNX graph reads its weights from ``../secret.bin``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    bias = numpy_helper.from_array(np.arange(4, dtype=np.float32), "bias")
    bias.data_location = TensorProto.EXTERNAL
    bias.ClearField("raw_data")
    for key, value in (("location", "../secret.bin"), ("offset", "0"), ("length", "16")):
        entry = bias.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "bias"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])], [bias])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return _zip(path, {"model/model.onnx": model.SerializeToString()})


def non_utf8_csv(path: Path) -> Path:
    path.write_bytes("a,b,label\n1,2,caf\xe9\n3,4,x\n".encode("latin-1"))
    return path


def _png(width: int, height: int) -> bytes:
    """A 1x1 PNG whose IHDR claims ``width`` x ``height``."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0\0"))
            + chunk(b"IEND", b""))


def png_bomb_zip(path: Path, side: int = 50_000) -> Path:
    """Class folders of images, one of which declares ``side`` x ``side`` pixels."""
    return _zip(path, {"a/ok.png": _png(1, 1), "b/bomb.png": _png(side, side)})


def torchscript_mlp(path: Path, *, input_dim: int = 6, classes: int = 3, seed: int = 0) -> Path:
    """A TorchScript MLP carrying the ``kdq.json`` metadata the sandbox reads."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(input_dim, 16), nn.ReLU(), nn.Linear(16, classes)).eval()
    meta = {"kdq.json": json.dumps({"input_shape": [input_dim], "task": "classification"})}
    torch.jit.script(model).save(str(path), _extra_files=meta)
    return path
