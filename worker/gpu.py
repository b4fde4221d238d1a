"""A worker that consumes the ``gpu`` queue must have CUDA: its jobs asked for a GPU (``device:
cuda``, or ``auto`` on a job big enough, `service.core.routing`). `kdq worker --queues gpu` on a
host without one refuses to start and says why, instead of taking GPU jobs and running them on
a CPU (or failing them one by one)."""

from __future__ import annotations

import os


def cuda_status() -> tuple[bool, str]:
    """(usable, what was found), e.g. ``(False, "this torch build has no CUDA (torch 2.13.0+cpu)")``."""
    import torch  # (the worker imports torch anyway; kept out of `kdq worker`'s import when unneeded)

    if os.environ.get("KDQ_FAKE_NO_CUDA") == "1":  # tests: a CUDA host behaving as one without
        return False, "KDQ_FAKE_NO_CUDA=1"
    if torch.version.cuda is None:
        return False, f"this torch build has no CUDA (torch {torch.__version__})"
    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        hint = f"CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else "no NVIDIA driver or device visible"
        return False, f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU: {hint}"
    names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    return True, f"CUDA {torch.version.cuda}: {names}"


def refusal(queues: list[str], gpu_queue: str, cpu_queue: str) -> tuple[str | None, str | None]:
    """(why a worker for ``queues`` must not start, a warning to print): a dedicated GPU worker
    without CUDA is refused; one that also consumes the ``cpu`` queue (the all-in-one worker of a
    small deployment) starts with a warning, and its GPU jobs end FAILED with the engine's "no GPU"
    problem instead of waiting for a GPU that this deployment does not have."""
    if gpu_queue not in queues:
        return None, None
    ok, found = cuda_status()
    if ok:
        return None, None
    if cpu_queue in queues:
        return None, (f"kdq worker: consuming the {gpu_queue!r} queue without CUDA ({found}): jobs that ask "
                      "for a GPU will fail here. Give GPU jobs workers with CUDA (--queues gpu).")
    others = [q for q in queues if q != gpu_queue]
    instead = f"--queues {','.join(others)}" if others else "--queues cpu"
    return (f"kdq worker: refusing to consume the {gpu_queue!r} queue without CUDA ({found}). Its jobs asked "
            f"for a GPU; start this worker on a host with one (and a CUDA build of torch), or use {instead}."), None
