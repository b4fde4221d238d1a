"""What a teacher says about its outputs beyond their shape: the names of its classes, in output
order, from wherever its format keeps them (a zoo config's ``classes``, a transformers
``id2label``, ONNX metadata ``classes`` or ``id2label``, a code checkpoint's ``kdq.json``)."""

from __future__ import annotations

import json
import re
from typing import Any

from ..errors import ModelFileError

GENERIC_LABEL = re.compile(r"^LABEL_\d+$")
"""transformers' placeholder names (``LABEL_0``…): no names at all."""
MAX_NAME = 200


def class_names(raw: Any, output_dim: int, where: str) -> list[str] | None:
    """``raw`` (a list, a ``{index: name}`` mapping, or those as JSON text, or comma-separated names)
    as the class names in output order; None when absent or generic. A list of the wrong length for
    ``output_dim`` outputs is an error that names ``where`` it came from."""
    if raw is None or raw == "" or raw == [] or raw == {}:
        return None
    if isinstance(raw, str):
        text = raw.strip()
        try:
            raw = json.loads(text)
        except ValueError:
            raw = [part.strip() for part in text.split(",")]
    if isinstance(raw, dict):
        try:
            by_index = {int(k): v for k, v in raw.items()}
        except (TypeError, ValueError):
            raise ModelFileError(f"{where}: class names keyed by {list(raw)[:3]}, not by output index") from None
        if sorted(by_index) != list(range(len(by_index))):
            raise ModelFileError(f"{where}: class names must be keyed 0..{len(by_index) - 1}")
        raw = [by_index[i] for i in range(len(by_index))]
    if not isinstance(raw, list) or not all(isinstance(v, (str, int)) for v in raw):
        raise ModelFileError(f"{where}: class names must be a list of strings")
    names = [str(v) for v in raw]
    if all(GENERIC_LABEL.match(n) for n in names):
        return None
    if len(names) != output_dim:
        raise ModelFileError(f"{where}: {len(names)} class names for {output_dim} outputs")
    if len(set(names)) != len(names) or any(not n or len(n) > MAX_NAME for n in names):
        raise ModelFileError(f"{where}: class names must be distinct, non-empty, at most {MAX_NAME} characters")
    return names
