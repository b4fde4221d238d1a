"""A log-mel front end inside the model, so its ONNX graph takes waveforms.

A team deploying an audio classifier then ships one graph from samples to logits, with no feature
code to keep in step with training. The spectrogram is built from ops every ONNX runtime has: a strided
``Conv1d`` whose fixed kernels are the Hann-windowed DFT (real and imaginary rows), squares, a 1 × 1
``Conv1d`` holding the mel filterbank, and a log. Its tensors are non-persistent buffers: derived from
the config, never stored in (or loaded from) a weights file.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..spec.frontend import DEFAULTS, frames, frontend_config

__all__ = ["DEFAULTS", "LogMel", "frames", "frontend_config", "mel_filterbank"]

def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """(n_mels, n_fft // 2 + 1) triangular filters evenly spaced on the HTK mel scale, 0 Hz to Nyquist."""
    def mel(f: np.ndarray) -> np.ndarray:
        return 2595.0 * np.log10(1.0 + f / 700.0)

    def hz(m: np.ndarray) -> np.ndarray:
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)

    bins = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    edges = hz(np.linspace(mel(np.array(0.0)), mel(np.array(sample_rate / 2)), n_mels + 2))
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (bins[None] - lower) / np.maximum(centre - lower, 1e-9)
    down = (upper - bins[None]) / np.maximum(upper - centre, 1e-9)
    return np.maximum(0.0, np.minimum(up, down)).astype(np.float32)


class LogMel(nn.Module):
    """``(N, 1, L)`` waveforms → ``(N, n_mels, frames)`` log-mel power spectrograms."""

    def __init__(self, cfg: dict[str, int]) -> None:
        super().__init__()
        n_fft, n_freq = cfg["n_fft"], cfg["n_fft"] // 2 + 1
        self.hop, self.pad = cfg["hop"], n_fft // 2
        k = torch.arange(n_freq, dtype=torch.float64)[:, None]
        t = torch.arange(n_fft, dtype=torch.float64)[None, :]
        window = 0.5 - 0.5 * torch.cos(2 * math.pi * torch.arange(n_fft, dtype=torch.float64) / n_fft)
        angle = 2 * math.pi * k * t / n_fft
        dft = torch.cat([torch.cos(angle), -torch.sin(angle)]) * window  # (2 · n_freq, n_fft)
        self.register_buffer("dft", dft.float()[:, None, :], persistent=False)
        fbank = torch.from_numpy(mel_filterbank(cfg["sample_rate"], n_fft, cfg["n_mels"]))
        self.register_buffer("fbank", fbank[:, :, None], persistent=False)
        self.n_freq = n_freq

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = F.conv1d(F.pad(x, (self.pad, self.pad)), self.dft, stride=self.hop)
        power = spec[:, : self.n_freq] ** 2 + spec[:, self.n_freq :] ** 2
        return torch.log(F.conv1d(power, self.fbank) + 1e-6)
