"""Image datasets: a zip (or tar, tar.gz) of class folders of PNG / JPEG images, extracted with the
`archives.safe_extract` rules, capped in pixels before decoding, resized and normalised."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import DatasetError, SpecError, UnsafeFileError, UnsupportedFormatError
from ..spec import DataSpec
from ..types import TensorData
from .archives import safe_extract
from .data_common import DataLimits, ReadContext, class_folders, target_shape, too_large

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
IMAGE_SCALES: dict[str, tuple[list[float], list[float]]] = {
    "0-1": ([0.0], [1.0]),
    "0-255": ([0.0], [1.0 / 255.0]),
    "-1-1": ([0.5], [0.5]),
    "imagenet": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
}
"""``DataSpec.image_scale`` as the (mean, std) applied to pixels in [0, 1]: ``(pixels - mean) / std``."""


# --- images (.zip of class folders) -------------------------------------------------------

def load_images(path: Path, ctx: ReadContext) -> TensorData:
    spec, limits = ctx.spec, ctx.limits
    with tempfile.TemporaryDirectory(prefix="kdq-images-") as tmp:
        try:
            root = safe_extract(path, tmp, limits.archive)
        except (UnsafeFileError, UnsupportedFormatError) as exc:
            raise DatasetError(f"{path.name}: {exc}") from exc
        samples, classes = class_folders(root, IMAGE_SUFFIXES, example="class_name/image.png", noun="images",
                                         loose_suffixes=IMAGE_SUFFIXES)
        if spec.classes is not None:  # folders named as the teacher's classes, numbered in its order
            samples, classes = _in_order(samples, classes, spec.classes)
        want = ctx.input_shape if ctx.input_shape is not None and len(ctx.input_shape) == 3 else None
        gray = spec.grayscale if spec.grayscale is not None else (want is not None and want[0] == 1)
        mode, channels = ("L", 1) if gray else ("RGB", 3)
        if spec.image_size is not None:
            size = tuple(spec.image_size)
        elif want is not None and want[1] > 0 and want[2] > 0:
            size = (want[1], want[2])
        else:
            size = _header_size(samples[0][0], root, limits)
        target_shape((channels, *size), ctx.input_shape, reshape=False)
        need = len(samples) * channels * size[0] * size[1] * 4
        if need > limits.array_bytes:
            raise too_large(f"{len(samples)} images of {channels}x{size[0]}x{size[1]}", need, limits)
        mean, std, scale = _normaliser(spec, channels)
        x = np.empty((len(samples), channels, *size), dtype=np.float32)
        for i, (file, _) in enumerate(samples):
            pixels = _decode(file, root, mode, size, limits)
            x[i] = ((pixels[None] if gray else pixels.transpose(2, 0, 1)) - mean) / std
    y = torch.tensor([label for _, label in samples], dtype=torch.long)
    meta = {"image_size": list(size), "channels": channels, "image_mean": mean.ravel().tolist(),
            "image_std": std.ravel().tolist(), "image_scale": scale}
    return TensorData({"x": torch.from_numpy(x)}, y, "image", classes, meta=meta)


def _header_size(file: Path, root: Path, limits: DataLimits) -> tuple[int, int]:
    """(H, W) of an image from its header alone (decoding it could be the very cost refused next)."""
    name = file.relative_to(root).as_posix()
    try:
        with Image.open(file, formats=("PNG", "JPEG")) as img:
            w, h = img.size
    except (Image.DecompressionBombError, OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(f"image {name} is corrupt or not a PNG/JPEG: {exc}") from exc
    if w * h > limits.max_image_pixels:
        raise DatasetError(f"image {name} is {w}x{h} pixels, over the limit of {limits.max_image_pixels:,} "
                           f"(decompression bomb?)")  # fmt: skip
    return h, w


def _decode(file: Path, root: Path, mode: str, size: tuple[int, ...] | None,
            limits: DataLimits) -> np.ndarray:
    """One image as float32 in [0, 1], (H, W) or (H, W, 3), resized to ``size`` (H, W) if given."""
    name = file.relative_to(root).as_posix()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(file, formats=("PNG", "JPEG")) as img:  # reads the header only
                w, h = img.size
                if w * h > limits.max_image_pixels:
                    raise DatasetError(f"image {name} is {w}x{h} pixels, over the limit of "
                                       f"{limits.max_image_pixels:,} (decompression bomb?)")
                out = img.convert(mode)
                if size is not None and out.size != (size[1], size[0]):
                    out = out.resize((size[1], size[0]), Image.Resampling.BILINEAR)
                return np.asarray(out, dtype=np.float32) / 255.0
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DatasetError(f"image {name}: {exc}") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(f"image {name} is corrupt or not a PNG/JPEG: {exc}") from exc


def _in_order(samples: list[tuple[Path, int]], folders: list[str],
              order: list[str]) -> tuple[list[tuple[Path, int]], list[str]]:
    index = {c: i for i, c in enumerate(order)}
    unknown = [f for f in folders if f not in index]
    if unknown:
        raise DatasetError(f"class folder(s) {', '.join(unknown[:5])} are not among the classes "
                           f"{', '.join(order[:20])}")
    return [(f, index[folders[label]]) for f, label in samples], list(order)


def _normaliser(spec: DataSpec, channels: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Mean and std shaped (C or 1, 1, 1) to broadcast over a (C, H, W) image, and the scale's name
    (``auto`` decodes to [0, 1]: the job then picks the scale with the teacher, `measure.teacher_check`)."""
    if spec.image_mean is not None or spec.image_std is not None:
        scale = "custom"
        mean = np.asarray(spec.image_mean or [0.0], dtype=np.float32)
        std = np.asarray(spec.image_std or [1.0], dtype=np.float32)
    else:
        scale = "0-1" if spec.image_scale == "auto" else spec.image_scale
        preset_mean, preset_std = IMAGE_SCALES[scale]
        if channels != 3 and scale == "imagenet":
            raise SpecError("data.image_scale 'imagenet' needs RGB images (3 channels)")
        mean, std = np.asarray(preset_mean, dtype=np.float32), np.asarray(preset_std, dtype=np.float32)
    for name, values in (("image_mean", mean), ("image_std", std)):
        if len(values) not in (1, channels):
            raise SpecError(f"data.{name} has {len(values)} values; give 1 or {channels} (one per channel)")
    if (std <= 0).any():
        raise SpecError("data.image_std values must be positive")
    return mean.reshape(-1, 1, 1), std.reshape(-1, 1, 1), scale
