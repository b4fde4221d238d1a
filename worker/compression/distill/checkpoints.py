"""Training checkpoints: ``step-N/{weights.safetensors,state.pt}`` folders written atomically, a pointer
to the latest, and the run configuration's fingerprint (a checkpoint of another configuration is
never resumed)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

LATEST = "latest.json"


class Checkpoints:
    """``step-N/{weights.safetensors,state.pt}`` directories written atomically, plus a pointer."""

    def __init__(self, root: Path, fingerprint: dict[str, Any]) -> None:
        self.root = root
        self.fingerprint = json.loads(json.dumps(fingerprint))  # as it reads back (int keys → str)

    def save(self, step: int, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        """Write a new folder, then switch the pointer to it, then drop the older ones."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.root))
        save_file(tensors, str(tmp / "weights.safetensors"))
        torch.save(state, tmp / "state.pt")
        name = f"step-{step:09d}-{tmp.name.removeprefix('.tmp-')}"
        os.replace(tmp, self.root / name)
        pointer = self.root / (LATEST + ".tmp")
        pointer.write_text(json.dumps({"dir": name, "fingerprint": self.fingerprint}))
        os.replace(pointer, self.root / LATEST)
        for old in [*self.root.glob("step-*"), *self.root.glob(".tmp-*")]:
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)

    def load(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """The latest checkpoint of this same run configuration, else None (start afresh)."""
        try:
            pointer = json.loads((self.root / LATEST).read_text())
        except (OSError, ValueError):
            return None
        name = str(pointer.get("dir"))
        if pointer.get("fingerprint") != self.fingerprint or not name.startswith("step-") or "/" in name:
            return None
        folder = self.root / name
        tensors = load_file(str(folder / "weights.safetensors"))
        state = torch.load(folder / "state.pt", weights_only=True)
        return tensors, state


def split_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def host_copy(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Detached CPU copies (cloned: breaks storage sharing, which safetensors refuses)."""
    return {prefix + k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}
