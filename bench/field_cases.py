"""Generated data and teachers trained in seconds for the fields of use (forecasting, policies), shared
by the tests and `bench.fields`: each function writes files a team would upload."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from worker.compression.io.teachers import save_zoo_model
from worker.compression.students import zoo


def sine_series(n: int = 3000, seed: int = 0) -> pd.DataFrame:
    """Two periods (24 and 168 steps), a trend, noise; a covariate that leads the load by 3 steps."""
    rng = np.random.default_rng(seed)
    t = np.arange(n, dtype=np.float64)
    load = (50 + 0.01 * t + 10 * np.sin(2 * math.pi * t / 24) + 4 * np.sin(2 * math.pi * t / 168)
            + rng.normal(0, 0.8, n))
    temp = 20 + 5 * np.sin(2 * math.pi * (t + 3) / 24) + rng.normal(0, 0.3, n)
    return pd.DataFrame({"ts": pd.date_range("2026-01-01", periods=n, freq="h").astype(str), "load": load,
                         "temp": temp})


def forecast_problem(folder: Path, *, window: int = 48, horizon: int = 12, n: int = 3000,
                     epochs: int = 300, arch: str = "mlp") -> dict[str, Path]:
    """``series.csv`` and a zoo teacher (``teacher/``) mapping a window of load and temp to the next
    ``horizon`` loads, trained on the first 80 % of the windows (the rest is what the job holds out):
    an MLP on the flat window (channel-major, 2 × ``window``), or a temporal CNN (``cnn1d``, flatten
    pooling) on the ``(2, window)`` signal."""
    folder.mkdir(parents=True, exist_ok=True)
    df = sine_series(n)
    df.to_csv(folder / "series.csv", index=False)
    values = torch.tensor(df[["load", "temp"]].to_numpy(), dtype=torch.float32)
    count = n - window - horizon + 1
    starts = torch.arange(count)
    x = values[starts[:, None] + torch.arange(window)].permute(0, 2, 1).reshape(count, -1)
    y = values[starts[:, None] + window + torch.arange(horizon), 0]
    train = int(count * 0.8) - window - horizon
    mu, sd = x[:train].mean(0), x[:train].std(0) + 1e-6
    ym = float(y[:train].mean())
    torch.manual_seed(0)
    if arch == "cnn1d":
        cfg = {"architecture": "cnn1d", "task": "regression", "in_channels": 2, "input_length": window,
               "channels": [32, 32, 32], "kernel_size": 5, "hidden": 128, "pool": "flatten", "output_dim": horizon}
        mu, sd = torch.zeros(1), torch.ones(1)  # raw values: its BatchNorm after the first conv scales them (the
        x = x.reshape(count, 2, window)          # zero padding would not survive folding a standardisation in)
    else:
        cfg = {"architecture": "mlp", "task": "regression", "input_dim": 2 * window, "hidden": [256, 256],
               "output_dim": horizon}
    net = zoo.build(cfg)
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    xs = (x[:train] - mu) / sd
    for _ in range(epochs):
        net.train()
        loss = nn.functional.mse_loss(net(xs), y[:train] - ym)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():  # the standardisation folded into the first layer: the teacher takes raw values
        if arch != "cnn1d":
            first = next(m for m in net.modules() if isinstance(m, nn.Linear))
            first.bias -= (first.weight * (mu / sd)).sum(1)
            first.weight /= sd
        last = [m for m in net.modules() if isinstance(m, nn.Linear)][-1]
        last.bias += ym
    save_zoo_model(net, cfg, folder / "teacher")
    return {"teacher": folder / "teacher", "data": folder / "series.csv"}


def cartpole_controller(obs: np.ndarray) -> np.ndarray:
    """A hand-written balancing rule (pole angle and angular velocity, a little of the cart's drift):
    push right when ``score > 0``; it keeps CartPole-v1 up for its 500 steps."""
    score = obs[:, 2] * 10.0 + obs[:, 3] * 2.0 + obs[:, 1] * 0.5 + obs[:, 0] * 0.1
    return np.stack([-score, score], 1)


def policy_problem(folder: Path, *, n: int = 4000, epochs: int = 300) -> dict[str, Path]:
    """``log.csv`` of CartPole-like observations (uniform over the states the controller visits) with the
    logged action, and a zoo MLP teacher (``teacher/``) that imitates `cartpole_controller`."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    scale = np.array([1.0, 1.0, 0.12, 1.2])
    obs = (rng.uniform(-1, 1, (n, 4)) * scale).astype(np.float32)
    logits = cartpole_controller(obs)
    action = logits.argmax(1)
    pd.DataFrame({"cart_x": obs[:, 0], "cart_v": obs[:, 1], "pole_a": obs[:, 2], "pole_w": obs[:, 3],
                  "action": action}).to_csv(folder / "log.csv", index=False)
    cfg = {"architecture": "mlp", "task": "classification", "input_dim": 4, "hidden": [128, 128], "output_dim": 2}
    torch.manual_seed(0)
    net = zoo.build(cfg)
    x, y = torch.from_numpy(obs), torch.from_numpy(action)
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    for _ in range(epochs):
        loss = nn.functional.cross_entropy(net(x / torch.from_numpy(scale).float()), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        first = next(m for m in net.modules() if isinstance(m, nn.Linear))
        first.weight /= torch.from_numpy(scale).float()
    save_zoo_model(net.eval(), cfg, folder / "teacher")
    return {"teacher": folder / "teacher", "data": folder / "log.csv"}


AUDIO_RATE = 8000
AUDIO_LENGTH = 4000  # 0.5 s


def tone_clips(folder: Path, *, per_class: int = 60, seed: int = 0) -> Path:
    """``tones.zip``: class folders ``low`` (a 300–500 Hz tone), ``high`` (1.2–1.8 kHz) and ``chirp``
    (a sweep up from 300 Hz to 2.5 kHz), in noise, of 0.4–0.7 s; every fifth file at 11,025 Hz and stereo
    (resampled, mixed to mono, cut or padded by the loader)."""
    import zipfile

    import soundfile as sf

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    archive = folder / "tones.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for label in ("chirp", "high", "low"):
            for i in range(per_class):
                rate = 11025 if i % 5 == 0 else AUDIO_RATE
                seconds = rng.uniform(0.4, 0.7)
                t = np.arange(int(rate * seconds)) / rate
                if label == "chirp":
                    f0, f1 = 300.0, 2500.0
                    phase = 2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * seconds))
                else:
                    f = rng.uniform(300, 500) if label == "low" else rng.uniform(1200, 1800)
                    phase = 2 * np.pi * f * t + rng.uniform(0, 2 * np.pi)
                wave = rng.uniform(0.2, 0.8) * np.sin(phase) + rng.normal(0, 0.05, len(t))
                data = np.stack([wave, wave], 1) if i % 5 == 0 else wave
                path = folder / f"{label}_{i}.wav"
                sf.write(path, data.astype(np.float32), rate, subtype="PCM_16")
                zf.write(path, f"{label}/{i:03d}.wav")
                path.unlink()
    return archive


def audio_problem(folder: Path, *, per_class: int = 60, epochs: int = 60) -> dict[str, Path]:
    """``tones.zip`` and a zoo cnn1d teacher with a log-mel front end (waveforms in) trained on them."""
    from worker.compression.io.datasets import load_dataset
    from worker.compression.spec import DataSpec

    archive = tone_clips(folder, per_class=per_class)
    data = load_dataset(archive, DataSpec(sample_rate=AUDIO_RATE, audio_length=AUDIO_LENGTH))
    cfg = {"architecture": "cnn1d", "task": "classification", "in_channels": 1, "input_length": AUDIO_LENGTH,
           "channels": [32, 32, 32], "kernel_size": 3, "hidden": 32, "output_dim": 3, "classes": data.classes,
           "frontend": {"sample_rate": AUDIO_RATE, "n_fft": 256, "hop": 128, "n_mels": 32}}
    torch.manual_seed(0)
    net = zoo.build(cfg)
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    x, y = data.inputs["x"], data.y
    for _ in range(epochs):
        net.train()
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 32):
            idx = perm[i:i + 32]
            loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    save_zoo_model(net.eval(), cfg, folder / "teacher")
    return {"teacher": folder / "teacher", "data": archive}
