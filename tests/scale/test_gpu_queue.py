"""The gpu queue: which jobs go there, and a GPU worker that refuses to start without CUDA (checked
here on a CPU machine; ``KDQ_FAKE_NO_CUDA`` makes a CUDA host answer the same)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from service.core.routing import job_queue, training_work
from service.core.settings import Settings
from tests.service.conftest import REPO, base_env, kdq
from worker.compression.spec import CompressSpec

TEACHER = {"num_parameters": 2_000_000}
DATA = {"samples": 50_000}


def _settings(**kw: object) -> Settings:
    return Settings(database_url="postgresql+psycopg://unused/x", broker_url="redis://unused", **kw)  # type: ignore[arg-type]


def _spec(device: str, epochs: int = 10) -> CompressSpec:
    return CompressSpec.model_validate({"distillation": {"device": device, "epochs": epochs}})


@pytest.mark.parametrize(("device", "min_work", "queue"), [
    ("cuda", None, "gpu"),
    ("cpu", None, "cpu"),
    ("auto", None, "cpu"),  # no KDQ_GPU_AUTO_MIN_WORK: auto stays on the CPU workers
    ("auto", 1e12, "gpu"),  # 2e6 params x 5e4 samples x 10 epochs = 1e12
    ("auto", 2e12, "cpu"),
    ("cpu", 1.0, "cpu"),  # an explicit cpu is never moved
])  # fmt: skip
def test_jobs_go_to_the_gpu_queue_when_they_ask_for_cuda_or_are_big_enough(
    device: str, min_work: float | None, queue: str
) -> None:
    spec = _spec(device)
    assert training_work(spec, TEACHER, DATA) == 1e12
    assert job_queue(_settings(gpu_auto_min_work=min_work), spec, TEACHER, DATA) == queue


def test_a_gpu_worker_without_cuda_refuses_to_start_and_says_why(tmp_path: Path) -> None:
    env = base_env(KDQ_FAKE_NO_CUDA="1", KDQ_DATA_DIR=str(tmp_path))
    done = subprocess.run(kdq("worker", "--queues", "gpu"), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 3, done.stderr
    assert "refusing to consume the 'gpu' queue without CUDA" in done.stderr
    assert "--queues cpu" in done.stderr and "Traceback" not in done.stderr
