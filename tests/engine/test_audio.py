"""Audio: class folders of WAV clips decoded, mixed, resampled and cut; a log-mel front end inside the model."""

from __future__ import annotations

import zipfile

import numpy as np
import onnxruntime as ort
import pytest
import soundfile as sf
import torch

from bench.field_cases import AUDIO_LENGTH, AUDIO_RATE, audio_problem, tone_clips
from worker.compression.compress import compress
from worker.compression.errors import DatasetError
from worker.compression.io.datasets import load_dataset
from worker.compression.spec import CompressSpec, DataSpec
from worker.compression.spec.frontend import frames
from worker.compression.students.zoo_audio import LogMel, mel_filterbank


def test_clips_are_mono_resampled_and_cut_or_padded(tmp_path):
    archive = tone_clips(tmp_path, per_class=5)
    data = load_dataset(archive, DataSpec(sample_rate=AUDIO_RATE, audio_length=AUDIO_LENGTH))
    assert data.meta["format"] == "audio_zip"  # auto-detected from the members
    assert data.inputs["x"].shape == (15, 1, AUDIO_LENGTH) and data.classes == ["chirp", "high", "low"]
    assert data.input_kind == "signal" and data.y.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    long = load_dataset(archive, DataSpec(sample_rate=AUDIO_RATE, audio_length=8000))
    tail = long.inputs["x"][:, 0, 6000:]
    assert (tail == 0).all()  # clips of at most 0.7 s are padded with silence to 1 s
    # a 440 Hz stereo file at 11,025 Hz comes out as 440 Hz at 8 kHz
    folder = tmp_path / "one"
    t = np.arange(11025) / 11025
    wave = np.sin(2 * np.pi * 440 * t).astype(np.float32)
    (folder / "a").mkdir(parents=True)
    sf.write(folder / "a" / "x.wav", np.stack([wave, wave], 1), 11025)
    with zipfile.ZipFile(tmp_path / "one.zip", "w") as zf:
        zf.write(folder / "a" / "x.wav", "a/x.wav")
    x = load_dataset(tmp_path / "one.zip", DataSpec(sample_rate=8000, audio_length=8000)).inputs["x"][0, 0].numpy()
    spectrum = np.abs(np.fft.rfft(x))
    assert abs(np.argmax(spectrum) * 8000 / len(x) - 440) < 2


@pytest.mark.parametrize(("members", "message"), [
    ({"loose.wav": b"RIFF"}, "not inside a class folder"),
    ({"a/x.txt": b"hello"}, "unsupported file type"),
    ({"a/x.wav": b"RIFF\x00\x00\x00\x00WAVEjunk"}, "corrupt or not a WAV"),
])
def test_bad_archives_say_what_is_wrong(tmp_path, members, message):
    path = tmp_path / "bad.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for name, body in members.items():
            zf.writestr(name, body)
    with pytest.raises(DatasetError, match=message):
        load_dataset(path, DataSpec(format="audio_zip", sample_rate=8000))


def test_the_front_end_is_the_mel_power_spectrogram():
    cfg = {"sample_rate": 8000, "n_fft": 256, "hop": 128, "n_mels": 32}
    x = torch.randn(2, 1, 4000)
    ours = LogMel(cfg)(x)
    spec = torch.stft(x[:, 0], 256, 128, window=torch.hann_window(256), center=True, pad_mode="constant",
                      return_complex=True).abs() ** 2
    expected = torch.log(torch.einsum("mf,bft->bmt", torch.from_numpy(mel_filterbank(8000, 256, 32)), spec) + 1e-6)
    assert ours.shape == (2, 32, frames(cfg, 4000)) and torch.allclose(ours, expected, atol=1e-3)


def test_an_audio_teacher_is_distilled_and_its_graph_takes_waveforms(tmp_path):
    made = audio_problem(tmp_path, per_class=30, epochs=15)
    spec = CompressSpec.model_validate({
        "data": {"sample_rate": AUDIO_RATE}, "student": {"kind": "auto", "max_params_ratio": 0.3},
        "distillation": {"epochs": 8, "batch_size": 32, "lr": 3e-3},
        "evaluation": {"latency_batch_sizes": [1, 8], "repeats": 3, "warmup": 1}})
    res = compress(spec, teacher_path=made["teacher"], dataset_path=made["data"], output_dir=tmp_path / "out")
    rows = {r["name"]: r["metric"] for r in res.metrics["models"]}
    assert rows["teacher"]["accuracy"] >= 0.9 and rows["student"]["accuracy"] >= 0.9, rows
    session = ort.InferenceSession(str(tmp_path / "out" / "model.onnx"))
    assert session.get_inputs()[0].shape[1:] == [1, AUDIO_LENGTH]
    t = np.arange(AUDIO_LENGTH) / AUDIO_RATE
    high = (0.5 * np.sin(2 * np.pi * 1500 * t)).astype(np.float32).reshape(1, 1, -1)
    assert int(session.run(None, {session.get_inputs()[0].name: high})[0].argmax()) == 1  # "high"
