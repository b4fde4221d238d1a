"""Code-bearing teachers (TorchScript, ExportedProgram): off by default; when the operator turns
them on, loaded and run only in a sandboxed child whose walls hold against hostile modules."""

from __future__ import annotations

import io
import json
import os
import struct
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests.malicious import corpus
from worker.compression.compress import compress
from worker.compression.errors import ModelFileError, UnsafeFileError
from worker.compression.io.sandbox import SandboxLimits, load_sandboxed_teacher
from worker.compression.io.sandbox_child import recv_frame
from worker.compression.io.teachers import load_teacher
from worker.compression.io.validate import validate_model
from worker.compression.spec import CompressSpec

META = {"kdq.json": json.dumps({"input_shape": [4], "task": "classification"})}


class Writer(nn.Module):
    """Its forward writes a file wherever it is told (TorchScript's own ``torch.save``)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.path = path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch.save(x, self.path)
        return self.lin(x)


class Reader(nn.Module):
    """Its forward maps a file it was never given (``torch.from_file``) into its output."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.path = path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        secret = torch.from_file(self.path, False, 8, dtype=torch.uint8)
        return self.lin(x) + secret[:3].float()


class Hog(nn.Module):
    """Its forward asks for 8 GiB."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        big = torch.empty(1 << 31)
        return self.lin(x) + big[:1] * 0


class Spinner(nn.Module):
    """Its forward never ends."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        for _ in range(1 << 50):
            y = y * 1.0000001
        return self.lin(y)


def _script(module: nn.Module, path: Path) -> Path:
    torch.jit.script(module).save(str(path), _extra_files=META)
    return path


def _sandbox_dirs() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("kdq-sandbox-*")}


@pytest.fixture(scope="module")
def problem(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sandbox")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 6, generator=g)
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 3))
    y = (x @ torch.randn(6, 3, generator=g)).argmax(1)
    opt = torch.optim.Adam(teacher.parameters(), 1e-2)
    for _ in range(100):
        loss = nn.functional.cross_entropy(teacher(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    meta = {"kdq.json": json.dumps({"input_shape": [6], "task": "classification"})}
    torch.jit.script(teacher.eval()).save(str(root / "teacher.pt"), _extra_files=meta)
    ep = torch.export.export(teacher.eval(), (x[:2],), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(ep, root / "teacher.pt2")
    np.savez(root / "data.npz", x=x.numpy(), y=y.numpy())
    return root


def test_code_checkpoints_are_refused_unless_the_operator_allows_them(problem: Path) -> None:
    before = _sandbox_dirs()
    for name, what in (("teacher.pt", "TorchScript"), ("teacher.pt2", "ExportedProgram")):
        with pytest.raises(UnsafeFileError, match=f"{what}.*KDQ_ALLOW_CODE_CHECKPOINTS=1"):
            load_teacher(problem / name)
        with pytest.raises(UnsafeFileError, match="KDQ_ALLOW_CODE_CHECKPOINTS=1"):
            validate_model(problem / name)
    assert _sandbox_dirs() == before  # no child was even started


def test_torchscript_teacher_distils_through_the_sandbox(problem: Path, tmp_path: Path) -> None:
    before = _sandbox_dirs()
    spec = CompressSpec.model_validate({
        "student": {"kind": "auto", "max_params_ratio": 0.5},
        "distillation": {"epochs": 10, "batch_size": 32, "lr": 1e-2, "baseline": False},
        "quantization": {"method": "none"},
        "evaluation": {"latency_batch_sizes": [1], "repeats": 2, "warmup": 1},
    })
    result = compress(spec, teacher_path=problem / "teacher.pt", dataset_path=problem / "data.npz",
                      output_dir=tmp_path / "out", allow_code=True)
    report = result.metrics
    assert report["teacher"]["kind"] == "torchscript" and report["teacher"]["num_parameters"] == 6 * 32 + 32 + 99
    rows = {r["name"]: r for r in report["models"]}
    assert set(rows) == {"teacher", "student"}
    assert rows["teacher"]["metric"]["accuracy"] == 1.0  # the teacher's ONNX, exported inside the sandbox
    # chance is about 0.4 here; the student learnt from the sandboxed teacher's outputs
    assert rows["student"]["metric"]["teacher_agreement"] >= 0.75, rows["student"]
    assert {a.kind for a in result.artifacts} >= {"student", "onnx_fp32", "report_json"}
    assert _sandbox_dirs() == before  # the child and its scratch folder are gone


def test_exported_program_teacher_matches_its_module(problem: Path) -> None:
    teacher = load_teacher(problem / "teacher.pt2", allow_code=True)
    assert teacher.kind == "exported_program" and teacher.input_shape == (6,) and teacher.output_dim == 3
    reference = torch.jit.load(str(problem / "teacher.pt"))
    x = torch.randn(5, 6)
    torch.testing.assert_close(teacher.predict({"x": x}), reference(x).detach())
    summary = validate_model(problem / "teacher.pt2", "exported_program", allow_code=True)
    assert summary["kind"] == "exported_program" and summary["output_dim"] == 3


def test_the_walls_are_up_and_reported(problem: Path) -> None:
    teacher = load_teacher(problem / "teacher.pt", allow_code=True)
    walls = teacher.config["sandbox"]
    # the child tried to reach a listener of ours and to write beside its scratch folder, and could not
    assert walls["network_isolated"] is True, walls
    assert walls["writes_confined"] is True, walls
    assert walls["network"] != "none" or walls["landlock_abi"] >= 4, walls
    assert walls["rlimits"]["memory_bytes"] == SandboxLimits().memory_bytes
    assert walls["rlimits"]["open_files"] == SandboxLimits().open_files


def test_hostile_modules_fail_inside_the_child_and_the_parent_carries_on(tmp_path: Path) -> None:
    outside = tmp_path / "escaped.pt"
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"TOPSECRETVALUE")
    limits = SandboxLimits(memory_bytes=2 << 30, cpu_seconds=4)
    x = {"x": torch.ones(2, 4)}

    # sanity: outside the sandbox these modules do what they say
    Writer(str(tmp_path / "control.pt"))(torch.ones(1, 4))
    torch.jit.script(Writer(str(tmp_path / "control.pt")))(torch.ones(1, 4))
    assert (tmp_path / "control.pt").exists()

    writer = load_sandboxed_teacher(_script(Writer(str(outside)), tmp_path / "w.pt"), "torchscript", limits=limits)
    writer.predict(x)
    assert not outside.exists()  # the write outside the scratch folder did not land

    with pytest.raises(ModelFileError, match="failed to run a batch: .*(Permission denied|No such file)") as err:
        load_sandboxed_teacher(_script(Reader(str(secret)), tmp_path / "r.pt"), "torchscript", limits=limits)
    assert "TOPSECRET" not in str(err.value)

    started = time.monotonic()
    with pytest.raises(ModelFileError, match="allocate"):
        load_sandboxed_teacher(_script(Hog(), tmp_path / "h.pt"), "torchscript", limits=limits)
    with pytest.raises(ModelFileError, match="CPU time limit of 4 s"):
        load_sandboxed_teacher(_script(Spinner(), tmp_path / "s.pt"), "torchscript", limits=limits)
    assert time.monotonic() - started < 60

    # the parent is unharmed: a well-behaved teacher still loads and runs
    good = load_sandboxed_teacher(corpus.torchscript_mlp(tmp_path / "good.pt", input_dim=4), "torchscript")
    assert good.predict(x).shape == (2, 3)


def test_a_call_past_its_timeout_kills_the_child(tmp_path: Path) -> None:
    limits = SandboxLimits(call_timeout_s=5, cpu_seconds=600)
    with pytest.raises(ModelFileError, match="did not answer within 5 s"):
        load_sandboxed_teacher(_script(Spinner(), tmp_path / "s.pt"), "torchscript", limits=limits)


def test_replies_are_checked_before_use() -> None:
    def frame(header: dict, payload: bytes = b"") -> io.BytesIO:
        body = json.dumps(header).encode()
        return io.BytesIO(struct.pack("<Q", len(body)) + body + payload)

    arr = np.arange(6, dtype=np.float32)
    header, arrays = recv_frame(frame({"arrays": [{"name": "o", "dtype": "float32", "shape": [2, 3]}]},
                                      arr.tobytes()), 1 << 20)
    assert arrays[0][1].shape == (2, 3)
    with pytest.raises(ValueError, match="unsupported dtype"):
        recv_frame(frame({"arrays": [{"name": "o", "dtype": "object", "shape": [1]}]}, b"\0" * 8), 1 << 20)
    with pytest.raises(ValueError, match="bytes in one frame"):
        recv_frame(frame({"arrays": [{"name": "o", "dtype": "float32", "shape": [1 << 40]}]}), 1 << 20)
    with pytest.raises(EOFError):
        recv_frame(frame({"arrays": [{"name": "o", "dtype": "float32", "shape": [4]}]}, b"\0" * 3), 1 << 20)
    with pytest.raises(ValueError, match="over the"):
        recv_frame(io.BytesIO(struct.pack("<Q", 1 << 40)), 1 << 20)


def test_no_child_outlives_its_teacher(tmp_path: Path) -> None:
    teacher = load_teacher(corpus.torchscript_mlp(tmp_path / "m.pt"), allow_code=True)
    proc = teacher.run_onnx.proc  # type: ignore[union-attr]
    pid, root = proc.proc.pid, proc.root
    assert root.is_dir() and os.path.exists(f"/proc/{pid}")
    del teacher, proc
    assert not root.exists()
    assert proc_gone(pid)


def proc_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] == "Z"  # reaped soon; a zombie has already stopped
    except FileNotFoundError:
        return True

