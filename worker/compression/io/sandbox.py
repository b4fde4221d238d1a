"""Code-bearing teachers (TorchScript, ExportedProgram), loaded and run only in a sandboxed child.

They are off unless the operator sets ``KDQ_ALLOW_CODE_CHECKPOINTS=1`` (the engine's
``allow_code=True``). Then the file is copied into a private scratch folder and a child
process (`sandbox_child`, started with ``python -I``, a clean environment, no inherited
descriptors but its two pipes) puts up its walls before importing torch: die with the
parent, a network namespace where the kernel allows, Landlock where the kernel has it
(read only the Python installation and system libraries, write only the scratch folder,
no TCP), rlimits on memory, CPU time, open files and file size. It then proves the walls
with a probe (connect to a listener of ours, write beside its scratch folder) and reports
what applied; that report is kept in the teacher's config.

Only then does it ``torch.jit.load`` / ``torch.export.load`` the file and serve forward
passes over a pipe: JSON headers and raw array bytes that the parent checks (dtype, shape,
size) before use; nothing crosses as a pickle. The parent wraps it as a black-box teacher,
like an ONNX teacher: outputs only, no hidden states. A call that hangs past its timeout
kills the child; a child that dies (memory, CPU time) fails the call with the reason.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ModelFileError, SpecError
from ..students.zoo import TASKS
from ..types import TOKEN_KEYS, InputKind, Teacher
from .sandbox_child import recv_frame, send_frame
from .sniff import DESCRIPTIONS
from .teacher_meta import class_names

log = logging.getLogger(__name__)
CHILD = Path(__file__).with_name("sandbox_child.py")
CODE_KINDS = ("torchscript", "exported_program")
META_FILE = "kdq.json"
"""Extra file in the archive (``_extra_files`` / ``extra_files``): task, input_shape, input_kind."""
RANK_KINDS: dict[int, InputKind] = {1: "vector", 2: "signal", 3: "image"}
_SYSTEM_READ_ROOTS = ("/usr", "/lib", "/lib32", "/lib64", "/bin", "/sys/devices/system/cpu", "/proc/cpuinfo",
                      "/dev/null", "/dev/zero", "/dev/urandom", "/dev/random")
"""Not the rest of /proc (other processes' environments), nor all of /dev (raw disks), nor /etc, /home,
/tmp or /var (where stores and other uploads live)."""


@dataclass(frozen=True)
class SandboxLimits:
    memory_bytes: int = 4 << 30
    """RLIMIT_AS of the child (torch itself takes about 0.6 GiB of address space)."""
    cpu_seconds: int = 3600
    """RLIMIT_CPU of the child over its whole life (load, every forward pass, the ONNX export)."""
    open_files: int = 256
    file_bytes: int = 2 << 30
    """RLIMIT_FSIZE: the largest file the child may write (into its scratch folder)."""
    call_timeout_s: float = 600.0
    """Wall-clock limit of one call; past it the child is killed."""
    start_timeout_s: float = 120.0
    threads: int = 1
    max_frame_bytes: int = 1 << 30
    """Largest array payload accepted from the child in one reply."""


def _read_roots() -> list[str]:
    """What the child may read: the Python installation, the packages it imports, system libraries."""
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, *_SYSTEM_READ_ROOTS}
    roots |= {os.path.realpath(p) for p in sysconfig.get_paths().values()}
    for name in ("numpy", "torch", "onnx", "onnxscript"):
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin:
            roots.add(os.path.realpath(Path(spec.origin).parent.parent))
    return sorted(r for r in roots if os.path.exists(r))


def _env(scratch: Path, threads: int) -> dict[str, str]:
    """A clean environment: none of the worker's settings or credentials."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(scratch), "TMPDIR": str(scratch), "LANG": "C.UTF-8"}
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    if "LD_LIBRARY_PATH" in os.environ:
        env["LD_LIBRARY_PATH"] = os.environ["LD_LIBRARY_PATH"]
    return env


def _shutdown(proc: subprocess.Popen[bytes], pipes: list[Any], root: Path) -> None:
    for pipe in pipes:
        try:
            pipe.close()
        except OSError:
            pass
    if proc.poll() is None:
        try:
            proc.wait(timeout=2)  # the child exits when its input pipe closes
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    shutil.rmtree(root, ignore_errors=True)


class SandboxProcess:
    """One sandboxed child holding one loaded model; calls are serialised.

    The child dies with the thread that started it (``PR_SET_PDEATHSIG``): start it from the
    thread that runs the job (a Celery task does), not from a short-lived helper thread.
    """

    def __init__(self, model_file: Path, kind: str, limits: SandboxLimits = SandboxLimits()) -> None:
        if kind not in CODE_KINDS:
            raise ValueError(f"unknown code checkpoint kind {kind!r}")
        self.kind, self.limits, self.name = kind, limits, Path(model_file).name
        self.root = Path(tempfile.mkdtemp(prefix="kdq-sandbox-"))
        self.scratch = self.root / "scratch"
        self.scratch.mkdir(mode=0o700)
        self._lock = threading.Lock()
        self._timed_out = False
        self._timeout = limits.start_timeout_s
        # a copy, never a link: the child may write its scratch folder, never the stored upload
        self.model_path = self.scratch / ("model.pt2" if kind == "exported_program" else "model.pt")
        shutil.copyfile(model_file, self.model_path)
        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)
        outside = self.root / "probe-outside"
        from_child, to_parent = os.pipe()
        from_parent, to_child = os.pipe()
        args = {
            "parent_pid": os.getpid(), "fd_in": from_parent, "fd_out": to_parent, "scratch": str(self.scratch),
            "read_roots": _read_roots(), "threads": limits.threads, "max_bytes": limits.max_frame_bytes,
            "limits": {"memory_bytes": limits.memory_bytes, "cpu_seconds": limits.cpu_seconds,
                       "open_files": limits.open_files, "file_bytes": limits.file_bytes},
            "probe_connect": list(listener.getsockname()[:2]), "probe_write": str(outside),
        }
        try:
            with open(self.root / "stderr.log", "wb") as stderr:
                self.proc = subprocess.Popen(
                    [sys.executable, "-I", str(CHILD), json.dumps(args)], pass_fds=(from_parent, to_parent),
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr, cwd=self.scratch,
                    env=_env(self.scratch, limits.threads), start_new_session=True)
        except BaseException:
            for fd in (from_child, to_parent, from_parent, to_child):
                os.close(fd)
            listener.close()
            shutil.rmtree(self.root, ignore_errors=True)
            raise
        os.close(from_parent)
        os.close(to_parent)
        self._in = os.fdopen(from_child, "rb")
        self._out = os.fdopen(to_child, "wb")
        self._finalizer = weakref.finalize(self, _shutdown, self.proc, [self._out, self._in], self.root)
        try:
            ready, _ = self._call({}, [], limits.start_timeout_s, "start", send=False)
            self.isolation: dict[str, Any] = ready["isolation"]
            probe = self.isolation["probe"]
            self.isolation["network_isolated"] = _refused(listener) and probe["connect"].startswith("blocked")
            self.isolation["writes_confined"] = not outside.exists()
            if not (self.isolation["network_isolated"] and self.isolation["writes_confined"]):
                walls = {k: self.isolation[k] for k in ("network", "landlock_abi", "probe")}
                log.warning("sandbox walls incomplete on this kernel (%s); the rlimits and the clean "
                            "environment still apply", walls)
        except BaseException:
            self.close()
            raise
        finally:
            listener.close()

    # --- calls ----------------------------------------------------------------------------------

    def _failure(self, what: str, detail: str | None = None) -> ModelFileError:
        label = DESCRIPTIONS.get(self.kind, self.kind)
        if detail is None:
            code = self.proc.poll()
            if self._timed_out:
                detail = f"it did not answer within {self._timeout:g} s and was stopped"
            elif code in (-signal.SIGXCPU, -signal.SIGKILL):
                detail = (f"it was stopped ({signal.Signals(-code).name}): over its CPU time limit of "
                          f"{self.limits.cpu_seconds} s or killed")
            elif code is not None and code < 0:
                detail = f"it was killed by {signal.Signals(-code).name}"
            else:
                detail = f"it exited ({code})"
            tail = self._stderr_tail()
            if tail:
                detail += f"; its last output: {tail}"
        return ModelFileError(f"the sandboxed {label} teacher {self.name!r} failed to {what}: {detail}")

    def _stderr_tail(self) -> str:
        try:
            lines = (self.root / "stderr.log").read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return lines[-1][:300] if lines else ""

    def _call(self, header: dict[str, Any], arrays: list[tuple[str, np.ndarray]], timeout: float, what: str, *,
              send: bool = True) -> tuple[dict[str, Any], list[tuple[str, np.ndarray]]]:
        with self._lock:
            if not self._finalizer.alive:
                raise self._failure(what, "the sandbox is closed")
            self._timeout = timeout
            watchdog = threading.Timer(timeout, self._stop)
            watchdog.daemon = True
            watchdog.start()
            try:
                if send:
                    send_frame(self._out, header, arrays)
                reply, out = recv_frame(self._in, self.limits.max_frame_bytes)
            except (EOFError, BrokenPipeError, ConnectionResetError):
                self.proc.wait()
                raise self._failure(what) from None
            except (ValueError, OSError) as exc:  # a malformed frame: the child is not trusted
                self._stop()
                raise self._failure(what, f"it sent a malformed reply ({exc})") from None
            finally:
                watchdog.cancel()
        if not send:
            return reply, out
        if not reply.get("ok"):
            raise self._failure(what, str(reply.get("error", "no reason given"))[:2000])
        return reply, out

    def _stop(self) -> None:
        if self.proc.poll() is None:
            self._timed_out = True
            self.proc.kill()

    def load(self) -> dict[str, Any]:
        reply, _ = self._call({"op": "load", "kind": self.kind, "file": str(self.model_path)}, [],
                              self.limits.call_timeout_s, "load")
        return reply

    def forward(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        _, arrays = self._call({"op": "forward"}, list(inputs.items()), self.limits.call_timeout_s, "run a batch")
        if len(arrays) != 1 or arrays[0][1].dtype != np.float32:
            raise self._failure("run a batch", "it did not answer with one float32 array")
        return arrays[0][1]

    def export_onnx(self, dest: Path, sample: dict[str, np.ndarray]) -> Path:
        """Export the model to ONNX inside the child (it writes its scratch folder), then copy it out."""
        inside = self.scratch / "export.onnx"
        inside.unlink(missing_ok=True)
        self._call({"op": "export_onnx", "dest": str(inside)}, list(sample.items()), self.limits.call_timeout_s,
                   "export to ONNX")
        if not inside.is_file() or inside.is_symlink():
            raise self._failure("export to ONNX", "it wrote no ONNX file")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(inside, dest)
        inside.unlink(missing_ok=True)
        return dest

    def close(self) -> None:
        if self._finalizer.alive and self.proc.poll() is None:
            try:
                with self._lock:
                    send_frame(self._out, {"op": "close"})
            except OSError:
                pass
        self._finalizer()


def _refused(listener: socket.socket) -> bool:
    """True when nothing reached the probe listener."""
    try:
        conn, _ = listener.accept()
    except BlockingIOError:
        return True
    except OSError as exc:
        return exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK)
    conn.close()
    return False


# --- the teacher -------------------------------------------------------------------------------

class _SandboxRunner:
    """Maps our input dict onto the child's forward pass; returns (N, D) float32."""

    def __init__(self, proc: SandboxProcess, input_kind: InputKind) -> None:
        self.proc = proc
        self.tokens = input_kind == "tokens"
        self.pooled = False

    def arrays(self, inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        if self.tokens:
            keys = [k for k in TOKEN_KEYS if k in inputs]
            return {k: inputs[k].detach().cpu().long().numpy() for k in keys}
        x = inputs.get("x", next(iter(inputs.values())))
        return {"x": x.detach().cpu().float().numpy()}

    def __call__(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        out = torch.from_numpy(self.proc.forward(self.arrays(inputs)).copy())
        if self.pooled:
            ids = inputs["input_ids"]
            mask = inputs.get("attention_mask", torch.ones_like(ids)).to(out.dtype)[..., None]
            out = (out * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return out[:, None] if out.ndim == 1 else out

    def export_onnx(self, dest: Path, sample: dict[str, torch.Tensor]) -> Path:
        return self.proc.export_onnx(Path(dest), self.arrays(sample))

    def close(self) -> None:
        self.proc.close()


def close_teacher(teacher: Teacher) -> None:
    """End a sandboxed teacher's child now (it also ends when the teacher is collected); a no-op
    for other teachers."""
    if isinstance(teacher.run_onnx, _SandboxRunner):
        teacher.run_onnx.close()


def _shape_from(meta: dict[str, Any], loaded: dict[str, Any], name: str) -> tuple[InputKind, tuple[int, ...]]:
    kind = meta.get("input_kind")
    shape = meta.get("input_shape")
    if shape is None and loaded.get("inputs"):  # an ExportedProgram knows its example input shapes
        first = loaded["inputs"][0]
        names = {i["name"] for i in loaded["inputs"]}
        if "input_ids" in names:
            kind = kind or "tokens"
        shape = first["shape"][1:]
    if shape is None:
        raise ModelFileError(
            f"{name}: add a {META_FILE} extra file to the archive giving the per-sample input_shape (and task), "
            f"e.g. torch.jit.save(m, path, _extra_files={{'{META_FILE}': json.dumps({{'input_shape': [16], "
            "'task': 'classification'}})}})")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise ModelFileError(f"{name}: {META_FILE} input_shape must be a list of integers, got {shape!r}")
    if kind is None:
        kind = RANK_KINDS.get(len(shape))
    if kind not in ("vector", "signal", "image", "tokens"):
        raise ModelFileError(f"{name}: cannot tell the input kind from input_shape {shape}; set input_kind in "
                             f"{META_FILE} (vector, signal, image or tokens)")
    if kind == "tokens":
        shape = [shape[0] if shape and shape[0] > 0 else 128]
    if not all(d > 0 for d in shape):
        raise ModelFileError(f"{name}: input_shape {shape} must give every per-sample dim "
                             "(only the batch is dynamic)")
    return kind, tuple(shape)


def _zero_batch(kind: InputKind, shape: tuple[int, ...], n: int = 2) -> dict[str, torch.Tensor]:
    if kind == "tokens":
        ids = torch.zeros((n, *shape), dtype=torch.long)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return {"x": torch.zeros((n, *shape))}


def load_sandboxed_teacher(path: str | os.PathLike[str], kind: str, *, task: str | None = None,
                           limits: SandboxLimits = SandboxLimits()) -> Teacher:
    """Load a TorchScript / ExportedProgram file in a sandboxed child and wrap it as a black-box teacher."""
    path = Path(path)
    proc = SandboxProcess(path, kind, limits)
    try:
        loaded = proc.load()
        meta = loaded.get("meta") or {}
        input_kind, input_shape = _shape_from(meta, loaded, path.name)
        runner = _SandboxRunner(proc, input_kind)
        probe = runner(_zero_batch(input_kind, input_shape))
        if input_kind == "tokens" and probe.ndim == 3:
            runner.pooled = True
            probe = runner(_zero_batch(input_kind, input_shape))
        if probe.ndim != 2 or probe.shape[0] != 2:
            raise ModelFileError(f"{path.name}: on a zero batch of 2 the model answered shape "
                                 f"{list(probe.shape)}; a teacher must output (N, D)")
        output_dim = int(probe.shape[1])
        declared = task or meta.get("task")
        chosen = declared or ("regression" if output_dim == 1 else "classification")
        if chosen not in TASKS:
            raise SpecError(f"unknown task {chosen!r}; known: {', '.join(TASKS)}")
    except BaseException:
        proc.close()
        raise
    teacher = Teacher(
        kind=kind,  # type: ignore[arg-type]
        task=chosen,  # type: ignore[arg-type]
        input_kind=input_kind,
        input_shape=input_shape,
        output_dim=int(probe.shape[1]),
        config={"format": kind, "file": path.name, "metadata": meta, "pooled": runner.pooled,
                "sandbox": {**proc.isolation, "limits": asdict(limits)}},
        run_onnx=runner,
        num_parameters=int(loaded.get("num_parameters", 0)),
        size_bytes=path.stat().st_size,
        classes=class_names(meta.get("classes"), output_dim, f"{META_FILE} classes") if chosen == "classification"
        else None,
        task_source="declared" if declared else "inferred",
    )
    weakref.finalize(teacher, proc.close)
    return teacher

