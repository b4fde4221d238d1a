"""A zoo ``cnn1d``'s ``frontend`` (a log-mel spectrogram inside the model: `students.zoo_audio`), as far as
sizes go: torch-free, so the API counts an audio student's parameters without building it."""

from __future__ import annotations

from typing import Any

DEFAULTS = {"sample_rate": 16000, "n_fft": 400, "hop": 160, "n_mels": 40}


def frontend_config(cfg: dict[str, Any] | None) -> dict[str, int] | None:
    """The front end's settings with defaults, or None (no front end)."""
    if not cfg:
        return None
    if cfg.get("type", "logmel") != "logmel":
        raise ValueError(f"frontend type {cfg.get('type')!r}: only 'logmel'")
    unknown = set(cfg) - {"type", *DEFAULTS}
    if unknown:
        raise ValueError(f"frontend keys {', '.join(sorted(unknown))} are unknown; known: {', '.join(DEFAULTS)}")
    out = {k: int(cfg.get(k, v)) for k, v in DEFAULTS.items()}
    if not (8 <= out["n_fft"] <= 8192 and 1 <= out["hop"] <= out["n_fft"] and 1 <= out["n_mels"] <= out["n_fft"] // 2):
        raise ValueError("frontend needs 8 ≤ n_fft ≤ 8192, 1 ≤ hop ≤ n_fft and 1 ≤ n_mels ≤ n_fft / 2")
    return out


def frames(cfg: dict[str, int], length: int) -> int:
    """Spectrogram frames of a ``length``-sample waveform (centred: padded by n_fft / 2 each side)."""
    return (length + 2 * (cfg["n_fft"] // 2) - cfg["n_fft"]) // cfg["hop"] + 1
