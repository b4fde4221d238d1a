"""Reading a JSON file an upload holds (a model folder's config.json, preprocessor_config.json, …):
unreadable or of the wrong shape is a `ModelFileError` naming the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import ModelFileError


def read_json(path: Path, expected: type = dict) -> Any:
    """The JSON value in ``path``, which must be a ``expected`` (dict: an object; list: a list)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{Path(path).name} is not readable JSON: {exc}") from exc
    if not isinstance(data, expected):
        raise ModelFileError(f"{Path(path).name} must hold a JSON {'object' if expected is dict else 'list'}")
    return data
