"""The sandboxed child that loads and runs a code-bearing teacher (see `sandbox`).

Run as a script (``python -I sandbox_child.py ARGS``), never imported by the child: its
top level needs only the standard library, so the walls go up before numpy or torch
(or the untrusted file) are touched. `sandbox` imports the framing helpers from here.

Order in the child: die with the parent; no new privileges; a network namespace
(``unshare(CLONE_NEWNET)``, or inside a new user namespace when unprivileged); Landlock
(where the kernel has it: read only the Python installation and system libraries, write
only the scratch folder, no TCP, no signals or abstract sockets outside); rlimits on
memory, CPU time, open files and file size; then a probe of the walls, then torch.

Frames (both directions): 8-byte little-endian length of a JSON header, the header, then
the raw bytes of each array it lists (``{"name", "dtype", "shape"}``). Nothing is pickled.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import resource
import socket
import struct
import sys
from typing import Any, BinaryIO

MAX_HEADER = 1 << 20
ARRAY_DTYPES = {"float16", "float32", "float64", "int32", "int64", "uint8", "bool"}

# --- framing (shared with the parent) ------------------------------------------------------------


def send_frame(out: BinaryIO, header: dict[str, Any], arrays: list[tuple[str, Any]] = ()) -> None:
    """Write one frame; ``arrays`` are (name, numpy array) pairs sent as raw bytes."""
    specs, buffers = [], []
    for name, arr in arrays:
        arr = arr if arr.flags["C_CONTIGUOUS"] else arr.copy(order="C")
        specs.append({"name": name, "dtype": str(arr.dtype), "shape": list(arr.shape)})
        buffers.append(memoryview(arr).cast("B") if arr.size else b"")
    body = json.dumps({**header, "arrays": specs}).encode()
    out.write(struct.pack("<Q", len(body)) + body)
    for buf in buffers:
        out.write(buf)
    out.flush()


def _read_exact(src: BinaryIO, n: int) -> bytes:
    data = src.read(n)
    if data is None or len(data) != n:
        raise EOFError("the other side closed the pipe")
    return data


def recv_frame(src: BinaryIO, max_bytes: int) -> tuple[dict[str, Any], list[tuple[str, Any]]]:
    """Read one frame: the header and its arrays, checked (dtype, shape, size) before any copy."""
    import numpy as np

    (n,) = struct.unpack("<Q", _read_exact(src, 8))
    if n > MAX_HEADER:
        raise ValueError(f"frame header of {n} bytes is over the {MAX_HEADER} byte limit")
    header = json.loads(_read_exact(src, n))
    if not isinstance(header, dict) or not isinstance(header.get("arrays", []), list):
        raise ValueError("malformed frame header")
    arrays, total = [], 0
    for spec in header.pop("arrays", []):
        dtype, shape = spec.get("dtype"), spec.get("shape")
        if dtype not in ARRAY_DTYPES or not isinstance(shape, list) or not all(
                isinstance(d, int) and not isinstance(d, bool) and 0 <= d for d in shape):
            raise ValueError(f"array {spec.get('name')!r} has an unsupported dtype or shape ({dtype}, {shape})")
        size = math.prod(shape) * np.dtype(dtype).itemsize
        total += size
        if total > max_bytes:
            raise ValueError(f"arrays of more than {max_bytes:,} bytes in one frame")
        buf = _read_exact(src, size) if size else b""
        arrays.append((str(spec.get("name")), np.frombuffer(buf, dtype=dtype).reshape(shape)))
    return header, arrays


# --- the walls ---------------------------------------------------------------------------------

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
LANDLOCK_RULE_PATH_BENEATH = 1
FS_EXECUTE, FS_READ_FILE, FS_READ_DIR = 1 << 0, 1 << 2, 1 << 3


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def _unshare_network(libc: ctypes.CDLL) -> str:
    if libc.unshare(CLONE_NEWNET) == 0:
        return "namespace"
    first = os.strerror(ctypes.get_errno())
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0:
        return "user+network namespace"
    return f"none ({first}; user namespace: {os.strerror(ctypes.get_errno())})"


def _landlock(libc: ctypes.CDLL, read_roots: list[str], scratch: str) -> int:
    """Apply Landlock; return its ABI version (0: not applied)."""
    abi = libc.syscall(SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    if abi <= 0:
        return 0
    fs_all = (1 << 13) - 1  # ABI 1: execute .. make_sym
    fs_all |= (1 << 13) if abi >= 2 else 0  # refer
    fs_all |= (1 << 14) if abi >= 3 else 0  # truncate
    fs_all |= (1 << 15) if abi >= 5 else 0  # ioctl_dev
    net = 0b11 if abi >= 4 else 0  # bind_tcp, connect_tcp: handled and never allowed
    scoped = 0b11 if abi >= 6 else 0  # abstract unix sockets, signals
    attr = _RulesetAttr(fs_all, net, scoped)
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    ruleset = libc.syscall(SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size),
                           ctypes.c_uint32(0))
    if ruleset < 0:
        return 0
    try:
        rules = [(root, FS_EXECUTE | FS_READ_FILE | FS_READ_DIR) for root in read_roots] + [(scratch, fs_all)]
        for root, allowed in rules:
            if not os.path.exists(root):
                continue
            if not os.path.isdir(root):  # a single file (a device such as /dev/null): read only
                allowed = FS_READ_FILE if allowed != fs_all else FS_READ_FILE | (1 << 1)
            fd = os.open(root, os.O_PATH | os.O_CLOEXEC)
            try:
                rule = _PathBeneath(allowed, fd)
                if libc.syscall(SYS_LANDLOCK_ADD_RULE, ruleset, LANDLOCK_RULE_PATH_BENEATH, ctypes.byref(rule), 0):
                    raise OSError(ctypes.get_errno(), f"landlock_add_rule({root})")
            finally:
                os.close(fd)
        if libc.syscall(SYS_LANDLOCK_RESTRICT_SELF, ruleset, 0):
            raise OSError(ctypes.get_errno(), "landlock_restrict_self")
    finally:
        os.close(ruleset)
    return int(abi)


def _rlimits(limits: dict[str, int]) -> dict[str, int]:
    applied = {}
    for name, key, value in (("core", "RLIMIT_CORE", 0), ("open_files", "RLIMIT_NOFILE", limits["open_files"]),
                             ("file_bytes", "RLIMIT_FSIZE", limits["file_bytes"]),
                             ("cpu_seconds", "RLIMIT_CPU", limits["cpu_seconds"]),
                             ("memory_bytes", "RLIMIT_AS", limits["memory_bytes"])):
        res = getattr(resource, key)
        hard = value + 5 if key == "RLIMIT_CPU" else value  # SIGXCPU at the soft limit, SIGKILL 5 s later
        inherited = resource.getrlimit(res)[1]  # the worker's own limits (worker.confine) stay the ceiling
        if inherited != resource.RLIM_INFINITY:
            value, hard = min(value, inherited), min(hard, inherited)
        resource.setrlimit(res, (value, hard))
        applied[name] = value
    return applied


def _probe(args: dict[str, Any]) -> dict[str, str]:
    """Try what untrusted code would: reach the parent's listener, write beside the scratch folder."""
    result = {}
    host, port = args["probe_connect"]
    try:
        with socket.create_connection((host, port), timeout=2):
            result["connect"] = "connected"
    except OSError as exc:
        result["connect"] = f"blocked: {exc}"
    try:
        with open(args["probe_write"], "w") as fh:
            fh.write("escaped")
        result["write_outside"] = "written"
    except OSError as exc:
        result["write_outside"] = f"blocked: {exc}"
    return result


def isolate(args: dict[str, Any]) -> dict[str, Any]:
    libc = _libc()
    libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0)  # SIGKILL when the parent dies
    if os.getppid() != args["parent_pid"]:
        os._exit(1)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0):
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    network = _unshare_network(libc)
    landlock = _landlock(libc, args["read_roots"], args["scratch"])
    rlimits = _rlimits(args["limits"])
    os.chdir(args["scratch"])
    return {"network": network, "landlock_abi": landlock, "rlimits": rlimits, "probe": _probe(args)}


# --- serving -------------------------------------------------------------------------------------

def _arg_names(model: Any) -> list[str]:
    try:
        schema = model.forward.schema  # TorchScript
        return [a.name for a in schema.arguments if a.name != "self"]
    except AttributeError:
        import inspect

        try:
            return [p for p in inspect.signature(model.forward).parameters if p != "self"]
        except (TypeError, ValueError):
            return []


def _first_tensor(out: Any) -> Any:
    import torch

    if isinstance(out, torch.Tensor):
        return out
    values = out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else ()
    for value in values:
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"the model returned {type(out).__name__}, not a tensor")


class _Server:
    def __init__(self, args: dict[str, Any]) -> None:
        self.args = args
        self.model: Any = None
        self.program: Any = None
        self.names: list[str] = []

    def load(self, header: dict[str, Any]) -> dict[str, Any]:
        import torch

        path, kind = header["file"], header["kind"]
        extra = {"kdq.json": ""}
        if kind == "torchscript":
            self.model = torch.jit.load(path, map_location="cpu", _extra_files=extra)
            self.model.eval()
        else:  # captured in eval mode at export time; its module refuses .eval()
            self.program = torch.export.load(path, extra_files=extra)
            self.model = self.program.module()
        self.names = _arg_names(self.model)
        raw = extra.get("kdq.json") or ""
        meta = json.loads(raw) if raw else {}
        if not isinstance(meta, dict):
            raise ValueError("kdq.json must hold a JSON object")
        inputs = []
        if self.program is not None:
            user = list(self.program.graph_signature.user_inputs)
            for node in self.program.graph.nodes:
                if node.op == "placeholder" and node.name in user:
                    val = node.meta.get("val")
                    shape = [d if isinstance(d, int) else -1 for d in getattr(val, "shape", [])]
                    inputs.append({"name": node.name, "shape": shape, "dtype": str(getattr(val, "dtype", ""))})
        params = sum(p.numel() for p in self.model.parameters()) if hasattr(self.model, "parameters") else 0
        return {"meta": meta, "arg_names": self.names, "inputs": inputs, "num_parameters": int(params)}

    def _args(self, arrays: list[tuple[str, Any]]) -> list[Any]:
        import torch

        given = {name: torch.from_numpy(arr.copy()) for name, arr in arrays}
        if self.names and all(n in given for n in self.names[:len(given)]) and set(given) <= set(self.names):
            return [given[n] for n in self.names if n in given]
        if len(given) == 1:
            return list(given.values())
        raise ValueError(f"the model takes arguments {self.names}; the data has {sorted(given)}")

    def forward(self, arrays: list[tuple[str, Any]]) -> Any:
        import torch

        with torch.no_grad():
            out = _first_tensor(self.model(*self._args(arrays)))
        return out.detach().float().contiguous().numpy()

    def export(self, header: dict[str, Any], arrays: list[tuple[str, Any]]) -> dict[str, Any]:
        import warnings

        import torch

        args = tuple(self._args(arrays))
        names = [name for name, _ in arrays]
        token_keys = ("input_ids", "attention_mask", "token_type_ids")
        axes = {n: ({0: "batch", 1: "sequence"} if n in token_keys else {0: "batch"}) for n in names}
        axes["output"] = {0: "batch"}
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if self.program is not None:  # its dynamic dims are part of the program
                torch.onnx.export(self.program, args, header["dest"], input_names=names, output_names=["output"],
                                  dynamo=True, external_data=False, verbose=False)
            else:
                torch.onnx.export(self.model, args, header["dest"], input_names=names, output_names=["output"],
                                  dynamic_axes=axes, opset_version=int(header.get("opset", 17)),
                                  do_constant_folding=True, dynamo=False)
        return {"dest": header["dest"]}


def _error(exc: BaseException) -> str:
    """The reason, short: a TorchScript traceback ends with the line that names the cause."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if len(lines) > 1:
        return lines[-1][:2000]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:2000]


def main() -> None:
    args = json.loads(sys.argv[1])
    src = os.fdopen(args["fd_in"], "rb")
    out = os.fdopen(args["fd_out"], "wb")
    report = isolate(args)
    import numpy as np  # noqa: F401  (after the walls)
    import torch

    torch.set_num_threads(int(args["threads"]))
    send_frame(out, {"op": "ready", "isolation": report})
    server = _Server(args)
    while True:
        try:
            header, arrays = recv_frame(src, int(args["max_bytes"]))
        except EOFError:
            return
        op = header.get("op")
        try:
            if op == "close":
                send_frame(out, {"ok": True})
                return
            if op == "load":
                send_frame(out, {"ok": True, **server.load(header)})
            elif op == "forward":
                send_frame(out, {"ok": True}, [("output", server.forward(arrays))])
            elif op == "export_onnx":
                send_frame(out, {"ok": True, **server.export(header, arrays)})
            else:
                send_frame(out, {"ok": False, "error": f"unknown op {op!r}"})
        except MemoryError as exc:
            send_frame(out, {"ok": False, "error": f"out of memory in the sandbox ({exc})"})
        except Exception as exc:  # the user's model failed: report it, keep serving
            send_frame(out, {"ok": False, "error": _error(exc)})


if __name__ == "__main__":
    main()
