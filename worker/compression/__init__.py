"""The compression engine: a library that needs no service, database or Celery.

Entry points (imported lazily so that `import worker.compression.spec` stays torch-free):
`load_teacher`, `load_dataset`, `make_student`, `distill`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["load_teacher", "load_dataset", "make_student", "distill", "save_student"]


def __getattr__(name: str) -> Any:  # PEP 562 lazy exports
    if name == "load_teacher":
        from .io.teachers import load_teacher
        return load_teacher
    if name == "load_dataset":
        from .io.datasets import load_dataset
        return load_dataset
    if name == "make_student":
        from .students.factory import make_student
        return make_student
    if name == "save_student":
        from .students.factory import save_student
        return save_student
    if name == "distill":
        from .distill.distill import distill
        return distill
    raise AttributeError(name)
