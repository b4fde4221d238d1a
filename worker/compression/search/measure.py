"""One measured model of a search: a candidate in one recipe (fp32 or a quantized twin), with the
checks against the goal."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Measured:
    """One measured ONNX model: a candidate in one recipe (fp32 or a quantized twin)."""

    name: str
    candidate: str
    recipe: str
    format: str
    path: Path
    metrics: dict[str, Any]
    value: float | None
    size_bytes: int
    parameters: int
    latency: dict[str, Any] = field(default_factory=dict)
    latency_ms: float | None = None
    train_s: float = 0.0
    epochs: float = 0.0
    twin: str | None = None
    eligible: bool = True
    checks: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def artifact_kind(self) -> str:
        return {"onnx fp32": "onnx_fp32", "onnx int4": "onnx_int4"}.get(self.format, "onnx_int8")

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "path"}
        out["file"] = self.path.name
        return out
