"""Teacher outputs computed once per run and kept on disk (safetensors) and in memory.

Without input augmentation the teacher sees the same inputs every epoch, so one pass
replaces ``epochs`` passes. Large output spaces keep only the top-k logits per sample.
A file left by an earlier attempt of the same run (same data, teacher and top-k) is reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import Cancelled
from ..types import CancelFn, Teacher, TensorData, never_cancel

TOPK_ABOVE = 1024
"""Output spaces wider than this are cached as top-k logits even when no ``top_k`` is given."""
DEFAULT_TOP_K = 64


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    return f"{t.dtype}:{list(t.shape)}".encode() + t.view(-1).view(torch.uint8).numpy().tobytes()


def _fingerprint(teacher: Teacher, data: TensorData, top_k: int | None, probe: torch.Tensor) -> str:
    """The data's bytes, the teacher's summary and its outputs on a few samples, and top-k."""
    h = hashlib.sha256(json.dumps({"teacher": teacher.summary(), "top_k": top_k}, sort_keys=True).encode())
    for key in sorted(data.inputs):
        h.update(key.encode() + _tensor_bytes(data.inputs[key]))
    h.update(_tensor_bytes(probe))
    return h.hexdigest()


@dataclass
class TeacherCache:
    path: Path
    outputs: torch.Tensor | None
    """Full teacher outputs (N, D), or None when top-k."""
    topk_values: torch.Tensor | None
    topk_indices: torch.Tensor | None
    seconds_to_build: float
    bytes: int
    reused: bool = False

    @property
    def top_k(self) -> int | None:
        return None if self.topk_values is None else self.topk_values.shape[1]

    def to(self, device: torch.device | str) -> TeacherCache:
        """Move the cached tensors (once) to the training device."""
        for name in ("outputs", "topk_values", "topk_indices"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, tensor.to(device))
        return self

    def targets(self, indices: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The teacher targets of a batch: full outputs, or (top-k values, top-k indices)."""
        if self.outputs is not None:
            return self.outputs[indices]
        assert self.topk_values is not None and self.topk_indices is not None
        return self.topk_values[indices], self.topk_indices[indices]

    @classmethod
    def build(
        cls,
        teacher: Teacher,
        data: TensorData,
        *,
        batch_size: int,
        top_k: int | None,
        path: Path,
        device: torch.device | str = "cpu",
        cancel: CancelFn = never_cancel,
    ) -> TeacherCache:
        """Run the teacher over ``data`` once and write its outputs to ``path``.

        Top-k is used for classification teachers when ``top_k`` is given or the output
        space is wider than ``TOPK_ABOVE``; other tasks always keep full outputs.
        """
        if teacher.task != "classification":
            top_k = None
        elif top_k is None and teacher.output_dim > TOPK_ABOVE:
            top_k = DEFAULT_TOP_K
        if top_k is not None and top_k >= teacher.output_dim:
            top_k = None
        onnx = teacher.run_onnx is not None

        def predict(lo: int, hi: int) -> torch.Tensor:
            batch = {k: v[lo:hi] if onnx else v[lo:hi].to(device) for k, v in data.inputs.items()}
            return teacher.predict(batch).float()

        fingerprint = _fingerprint(teacher, data, top_k, predict(0, 4))
        cached = cls._load(path, fingerprint)
        if cached is not None:
            return cached

        start = time.perf_counter()
        chunks: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        indices: list[torch.Tensor] = []
        for lo in range(0, len(data), batch_size):
            if cancel():
                raise Cancelled("cancelled while caching teacher outputs")
            out = predict(lo, lo + batch_size)
            if top_k is None:
                chunks.append(out.cpu())
            else:
                v, i = out.topk(top_k, dim=-1)
                values.append(v.cpu())
                indices.append(i.to(torch.int32).cpu())
        tensors = (
            {"outputs": torch.cat(chunks)}
            if top_k is None
            else {"topk_values": torch.cat(values), "topk_indices": torch.cat(indices)}
        )
        seconds = time.perf_counter() - start
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"fingerprint": fingerprint, "seconds_to_build": repr(seconds)})
        os.replace(tmp, path)
        return cls._from_tensors(path, tensors, seconds, reused=False)

    @classmethod
    def _from_tensors(
        cls, path: Path, tensors: dict[str, torch.Tensor], seconds: float, *, reused: bool
    ) -> TeacherCache:
        idx = tensors.get("topk_indices")
        return cls(
            path=path,
            outputs=tensors.get("outputs"),
            topk_values=tensors.get("topk_values"),
            topk_indices=None if idx is None else idx.long(),
            seconds_to_build=seconds,
            bytes=path.stat().st_size,
            reused=reused,
        )

    @classmethod
    def _load(cls, path: Path, fingerprint: str) -> TeacherCache | None:
        """An earlier attempt's cache for exactly this data, teacher and top-k, else None."""
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("fingerprint") != fingerprint:
                    return None
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (OSError, SafetensorError):  # an unreadable or foreign file: rebuild it
            return None
        return cls._from_tensors(path, tensors, float(meta.get("seconds_to_build", "0")), reused=True)
