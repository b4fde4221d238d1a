"""The confined child every validation and job runs in: past a limit it ends with which limit, the
process that started it goes on to the next, and messages and stop requests cross both ways."""

from __future__ import annotations

import ctypes
import os
import time
from pathlib import Path
from typing import Any

import pytest

from worker.confine import ChildFailed, LimitExceeded, TaskLimits, run_confined

ROOMY = TaskLimits(memory_bytes=1 << 30, cpu_s=60, wall_s=60, scratch_bytes=64 << 20)


def test_the_result_and_the_messages_come_back() -> None:
    seen: list[dict[str, Any]] = []

    def work(channel: Any) -> dict[str, Any]:
        for i in range(3):
            channel.report({"kind": "progress", "step": i})
        return {"answer": 42, "pid": os.getpid()}

    out = run_confined(work, limits=ROOMY, scratch=None, on_message=seen.append)
    assert out["answer"] == 42 and out["pid"] != os.getpid()
    assert [m["step"] for m in seen] == [0, 1, 2]


def test_memory_past_the_cap_is_named_and_the_parent_goes_on() -> None:
    def hog(_: Any) -> dict[str, Any]:
        blocks = []
        for _ in range(64):  # up to 2 GiB, touched page by page
            block = bytearray(32 << 20)
            block[::4096] = b"\1" * len(block[::4096])
            blocks.append(block)
        return {"held": len(blocks)}

    small = TaskLimits(memory_bytes=256 << 20, cpu_s=60, wall_s=60, scratch_bytes=1 << 20)
    with pytest.raises(LimitExceeded) as caught:
        run_confined(hog, limits=small, scratch=None, on_message=lambda m: None)
    assert caught.value.which == "memory" and "0.2 GiB of memory" in str(caught.value)
    assert run_confined(lambda _: {"ok": True}, limits=ROOMY, scratch=None, on_message=lambda m: None) == {"ok": True}


def test_cpu_time_past_the_cap() -> None:
    def spin(_: Any) -> dict[str, Any]:
        while True:
            pass

    with pytest.raises(LimitExceeded) as caught:
        run_confined(spin, limits=TaskLimits(1 << 30, cpu_s=1, wall_s=60, scratch_bytes=1 << 20), scratch=None,
                     on_message=lambda m: None)  # fmt: skip
    assert caught.value.which == "cpu"


def test_wall_time_past_the_cap() -> None:
    started = time.monotonic()
    with pytest.raises(LimitExceeded) as caught:
        run_confined(lambda _: time.sleep(60) or {}, limits=TaskLimits(1 << 30, 60, wall_s=1, scratch_bytes=1 << 20),
                     scratch=None, on_message=lambda m: None)  # fmt: skip
    assert caught.value.which == "wall" and time.monotonic() - started < 10


def test_scratch_space_past_the_cap(tmp_path: Path) -> None:
    def fill(_: Any) -> dict[str, Any]:
        for i in range(1000):
            (tmp_path / f"part-{i}").write_bytes(b"\0" * (1 << 20))
            time.sleep(0.01)
        return {}

    with pytest.raises(LimitExceeded) as caught:
        run_confined(fill, limits=TaskLimits(1 << 30, 60, 60, scratch_bytes=20 << 20), scratch=tmp_path,
                     on_message=lambda m: None)  # fmt: skip
    assert caught.value.which == "scratch"


def test_one_file_past_the_scratch_cap_fails_at_once(tmp_path: Path) -> None:
    def big(_: Any) -> dict[str, Any]:
        (tmp_path / "big").write_bytes(b"\0" * (8 << 20))
        return {}

    with pytest.raises(ChildFailed) as caught:  # RLIMIT_FSIZE: the write itself fails (EFBIG / SIGXFSZ)
        run_confined(big, limits=TaskLimits(1 << 30, 60, 60, scratch_bytes=1 << 20), scratch=tmp_path,
                     on_message=lambda m: None)  # fmt: skip
    assert caught.value.kind in ("internal", "crashed")


def test_a_stop_request_reaches_the_work() -> None:
    asked: list[bool] = []

    def patient(channel: Any) -> dict[str, Any]:
        for _ in range(500):
            if channel.stop_requested():
                return {"stopped": True}
            time.sleep(0.01)
        return {"stopped": False}

    out = run_confined(patient, limits=ROOMY, scratch=None, on_message=lambda m: None,
                       should_stop=lambda: asked.append(True) or len(asked) > 2)  # fmt: skip
    assert out == {"stopped": True}


def test_errors_are_classified_and_crashes_named() -> None:
    def bad(_: Any) -> dict[str, Any]:
        raise ValueError("row 3: not a number")

    with pytest.raises(ChildFailed) as caught:
        run_confined(bad, limits=ROOMY, scratch=None, on_message=lambda m: None,
                     classify=lambda e: ("input", str(e), "invalid_dataset") if isinstance(e, ValueError) else None)
    assert (caught.value.kind, caught.value.detail, caught.value.code) == ("input", "row 3: not a number",
                                                                           "invalid_dataset")  # fmt: skip

    def segfault(_: Any) -> dict[str, Any]:
        ctypes.string_at(0)
        return {}

    with pytest.raises(ChildFailed) as caught:
        run_confined(segfault, limits=ROOMY, scratch=None, on_message=lambda m: None, name="validation")
    assert caught.value.kind == "crashed" and "SIGSEGV" in caught.value.detail
