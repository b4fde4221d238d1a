"""A Hugging Face vision teacher's image preprocessing, read from its ``preprocessor_config.json``.

transformers' image processors (``ViTImageProcessor``) resize to ``size``, multiply pixels by
``rescale_factor`` (``do_rescale``, 1/255) and normalise with ``image_mean`` / ``image_std``
(``do_normalize``). The engine decodes pixels to [0, 1] and applies ``(pixels - mean) / std``
(`data_images`), so the processor's numbers are restated in those terms: with
``r = rescale_factor * 255`` (255 without rescaling), ``(p * r - m) / s = (p - m / r) / (s / r)``.
The result sets a job's image mean and std when the job gives none (`datasets.load_for_teacher`), and
is recorded in the bundle's preprocessing.json like any other scale.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..errors import ModelFileError
from .json_file import read_json

PREPROCESSOR_FILE = "preprocessor_config.json"
SOURCE = "teacher (preprocessor_config.json)"
"""What a job's preprocessing says its image scale came from when these numbers were used."""


def _floats(value: Any, key: str, channels: int) -> list[float]:
    """1 or ``channels`` numbers; a 1-channel model's processor may repeat one number thrice (the default)."""
    values = [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    if channels == 1 and isinstance(values, list) and len(values) == 3 and len(set(values)) == 1:
        values = values[:1]
    if (not isinstance(values, list) or len(values) not in (1, channels)
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)):
        raise ModelFileError(f"{PREPROCESSOR_FILE}: {key} must be 1 or {channels} finite numbers, not {value!r}")
    return [float(v) for v in values]


def _size(value: Any) -> tuple[int, int] | None:
    """(height, width) from ``size``: ``{"height", "width"}``, an int, or None when only an edge is named."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if isinstance(value, dict) and isinstance(value.get("height"), int) and isinstance(value.get("width"), int):
        return int(value["height"]), int(value["width"])
    return None


def read_image_preprocessing(folder: Path, shape: tuple[int, int, int]) -> dict[str, Any] | None:
    """``{"image_mean", "image_std", "image_size", "source"}`` (mean and std for pixels in [0, 1]) from the
    folder's preprocessor_config.json; None without one. ``shape`` is the model's (C, H, W): a processor
    that resizes to another size than the model's position embeddings take is a broken folder."""
    path = Path(folder) / PREPROCESSOR_FILE
    if not path.is_file():
        return None
    cfg = read_json(path)
    channels, h, w = shape
    size = _size(cfg.get("size"))
    if size is not None and size != (h, w):
        raise ModelFileError(f"{PREPROCESSOR_FILE} resizes images to {size[0]}x{size[1]} but config.json's "
                             f"image_size is {h}x{w}: the two files disagree")
    factor = cfg.get("rescale_factor", 1 / 255)
    if cfg.get("do_rescale", True):
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor < math.inf:
            raise ModelFileError(f"{PREPROCESSOR_FILE}: rescale_factor must be a positive number, not {factor!r}")
        r = float(factor) * 255.0
    else:
        r = 255.0
    if cfg.get("do_normalize", True):
        mean = _floats(cfg.get("image_mean", [0.5]), "image_mean", channels)
        std = _floats(cfg.get("image_std", [0.5]), "image_std", channels)
        if any(s <= 0 for s in std):
            raise ModelFileError(f"{PREPROCESSOR_FILE}: image_std values must be positive")
    else:
        mean, std = [0.0], [1.0]
    return {"image_mean": [m / r for m in mean], "image_std": [s / r for s in std], "image_size": [h, w],
            "source": SOURCE}
