"""Audio datasets: a zip (or tar) of class folders of WAV / FLAC files, extracted with the
`archives.safe_extract` rules, decoded with soundfile (libsndfile: no code in the file runs), mixed to
mono, resampled to ``DataSpec.sample_rate`` (band-limited, by FFT) and cut or zero-padded at the end to
``audio_length`` samples: signals ``(N, 1, L)`` a model with a front end (`students.zoo_audio`) takes
as they are. Each file's length is read from its header and capped before it is decoded."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..errors import DatasetError, UnsafeFileError, UnsupportedFormatError
from ..types import TensorData
from .archives import safe_extract
from .data_common import ReadContext, class_folders, too_large
from .sniff import AUDIO_SUFFIXES

MAX_SECONDS = 600.0
"""Longest file decoded (its header says how long it is)."""
DEFAULT_SECONDS = 1.0


def load_audio(path: Path, ctx: ReadContext) -> TensorData:
    import soundfile as sf

    spec, limits = ctx.spec, ctx.limits
    rate = spec.sample_rate
    want = ctx.input_shape if ctx.input_shape is not None and len(ctx.input_shape) == 2 else None
    if spec.audio_length is not None:
        length = spec.audio_length
    elif want is not None and want[1] > 0:
        length = int(want[1])
    else:
        length = int(rate * DEFAULT_SECONDS)
    if want is not None and (want[0] not in (1, -1, 0) or (want[1] > 0 and want[1] != length)):
        raise DatasetError(f"the teacher takes {tuple(want)} but the clips are (1, {length}) "
                           f"(mono, {length} samples at {rate} Hz): set data.audio_length to {want[1]}")
    with tempfile.TemporaryDirectory(prefix="kdq-audio-") as tmp:
        try:
            root = safe_extract(path, tmp, limits.archive)
        except (UnsafeFileError, UnsupportedFormatError) as exc:
            raise DatasetError(f"{path.name}: {exc}") from exc
        samples, classes = class_folders(root, AUDIO_SUFFIXES, example="class_name/clip.wav", noun="audio files")
        if spec.classes is not None:
            index = {c: i for i, c in enumerate(spec.classes)}
            unknown = [c for c in classes if c not in index]
            if unknown:
                raise DatasetError(f"class folder(s) {', '.join(unknown[:5])} are not among the classes "
                                   f"{', '.join(spec.classes[:20])}")
            samples = [(f, index[classes[label]]) for f, label in samples]
            classes = list(spec.classes)
        need = len(samples) * length * 4
        if need > limits.array_bytes:
            raise too_large(f"{len(samples)} clips of {length} samples", need, limits)
        x = np.zeros((len(samples), 1, length), dtype=np.float32)
        for i, (file, _) in enumerate(samples):
            x[i, 0] = _clip(sf, file, root, rate, length)
    y = torch.tensor([label for _, label in samples], dtype=torch.long)
    meta = {"sample_rate": rate, "audio_length": length, "seconds": round(length / rate, 4)}
    return TensorData({"x": torch.from_numpy(x)}, y, "signal", classes, meta=meta)


def _clip(sf: object, file: Path, root: Path, rate: int, length: int) -> np.ndarray:
    """One file as ``length`` mono samples at ``rate`` Hz."""
    name = file.relative_to(root).as_posix()
    try:
        info = sf.info(str(file))  # type: ignore[attr-defined]
        if info.frames / max(info.samplerate, 1) > MAX_SECONDS:
            raise DatasetError(f"audio {name} lasts {info.frames / info.samplerate:.0f} s, over the limit of "
                               f"{MAX_SECONDS:.0f} s")
        # read only what is used: the clip's length in the file's own rate, plus a margin for resampling
        keep = min(info.frames, math.ceil(length * info.samplerate / rate) + 64)
        wave, file_rate = sf.read(str(file), frames=keep, dtype="float32", always_2d=True)  # type: ignore[attr-defined]
    except DatasetError:
        raise
    except (RuntimeError, TypeError, ValueError, OSError) as exc:  # soundfile: LibsndfileError is a RuntimeError
        raise DatasetError(f"audio {name} is corrupt or not a WAV/FLAC file: {exc}") from exc
    mono = wave.mean(1)
    if not np.isfinite(mono).all():
        raise DatasetError(f"audio {name} holds NaN or infinite samples")
    if file_rate != rate:
        mono = resample(mono, int(file_rate), rate)
    out = np.zeros(length, dtype=np.float32)
    out[: min(length, len(mono))] = mono[:length]
    return out


def resample(wave: np.ndarray, source: int, target: int) -> np.ndarray:
    """Band-limited resampling by the FFT (as ``scipy.signal.resample``, without scipy): the spectrum
    truncated (down) or zero-extended (up) to the new length."""
    n = len(wave)
    if n == 0 or source == target:
        return wave.astype(np.float32)
    m = max(1, round(n * target / source))
    spectrum = np.fft.rfft(wave.astype(np.float64))
    keep = min(len(spectrum), m // 2 + 1)
    out = np.fft.irfft(spectrum[:keep], m) * (m / n)
    return out.astype(np.float32)
