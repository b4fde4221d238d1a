"""The malicious corpus (tests/malicious) against the engine's validation entry points: each input
is refused with a typed error that says what is wrong, and no pickle is ever unpickled."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.malicious import corpus
from worker.compression.errors import (
    DatasetError,
    InputError,
    NonFiniteWeightsError,
    ShapeMismatchError,
    TruncatedFileError,
    UnsafeFileError,
)
from worker.compression.io.validate import MODEL_FORMATS, validate_dataset, validate_model
from worker.compression.spec import DataSpec


@pytest.fixture
def canary(tmp_path: Path) -> Path:
    path = tmp_path / "canary"
    yield path
    assert not path.exists(), "an upload was unpickled"


@pytest.mark.parametrize("fmt", MODEL_FORMATS)
@pytest.mark.parametrize("allow_code", [False, True])
def test_pickles_as_models_in_every_format(tmp_path: Path, canary: Path, fmt: str, allow_code: bool) -> None:
    for make in (corpus.pickle_canary, corpus.torch_save_canary):
        path = make(tmp_path / f"{make.__name__}.bin", canary)
        with pytest.raises(UnsafeFileError, match="pickle") as err:
            validate_model(path, fmt, allow_code=allow_code)
        assert "never loaded" in str(err.value)


def test_zoo_zip_holding_only_a_pickle(tmp_path: Path, canary: Path) -> None:
    with pytest.raises(UnsafeFileError, match="pickle"):
        validate_model(corpus.zoo_zip_with_pickle(tmp_path / "m.zip", canary), "zoo_zip")


@pytest.mark.parametrize("fmt", ["auto", "npz"])
def test_npz_with_object_arrays(tmp_path: Path, canary: Path, fmt: str) -> None:
    path = corpus.npz_object_canary(tmp_path / "d.npz", canary)
    with pytest.raises(DatasetError, match="object array.*never loaded"):
        validate_dataset(path, DataSpec(format=fmt))


@pytest.mark.parametrize("fmt", ["npz", "csv", "safetensors", "jsonl", "parquet", "image_zip"])
def test_a_pickle_is_no_dataset_either(tmp_path: Path, canary: Path, fmt: str) -> None:
    path = corpus.pickle_canary(tmp_path / "d.bin", canary)
    with pytest.raises(InputError):
        validate_dataset(path, DataSpec(format=fmt))


def test_archive_escapes_and_links(tmp_path: Path) -> None:
    for path, message in [(corpus.zip_slip(tmp_path / "slip.zip"), "escapes its folder"),
                          (corpus.zip_symlink(tmp_path / "link.zip"), "symbolic link"),
                          (corpus.tar_symlink(tmp_path / "link.tgz"), "symbolic link"),
                          (corpus.tar_hardlink(tmp_path / "hard.tar"), "hard link"),
                          (corpus.tar_device(tmp_path / "dev.tar"), "device or fifo")]:
        with pytest.raises(UnsafeFileError, match=message):
            validate_model(path, "zoo_zip")
        with pytest.raises(DatasetError, match=message):
            validate_dataset(path, DataSpec(format="image_zip"))
    assert not (tmp_path.parent / "kdq-zip-slip.txt").exists()


def test_archive_bombs(tmp_path: Path) -> None:
    with pytest.raises(UnsafeFileError, match="compression ratio"):
        validate_model(corpus.zip_bomb(tmp_path / "bomb.zip", mib=16), "zoo_zip")
    with pytest.raises(DatasetError, match="compression ratio"):
        validate_dataset(corpus.tar_gz_bomb(tmp_path / "bomb.tgz", mib=16), DataSpec(format="image_zip"))


def test_safetensors_that_lie(tmp_path: Path) -> None:
    weights = corpus.truncated_safetensors(tmp_path / "w.safetensors").read_bytes()
    with pytest.raises(TruncatedFileError, match="truncated"):
        validate_model(corpus.zoo_zip(tmp_path / "t.zip", weights), "zoo_zip")
    lying = corpus.lying_offsets_safetensors(tmp_path / "lie.safetensors").read_bytes()
    with pytest.raises(TruncatedFileError, match="ends at byte 1099511627776"):
        validate_model(corpus.zoo_zip(tmp_path / "l.zip", lying), "zoo_zip")
    with pytest.raises(DatasetError, match="not a valid safetensors file"):
        validate_dataset(tmp_path / "lie.safetensors", DataSpec(format="safetensors"))


def test_onnx_external_data_outside_its_folder(tmp_path: Path) -> None:
    (tmp_path / "secret.bin").write_bytes(b"\0" * 16)
    with pytest.raises(UnsafeFileError, match=r"'\.\./secret\.bin' leaves the model folder"):
        validate_model(corpus.onnx_external_escape(tmp_path / "m.zip"), "auto")


def test_nan_weights_and_wrong_shapes(tmp_path: Path) -> None:
    nan = corpus.zoo_zip(tmp_path / "nan.zip", corpus.zoo_safetensors(corpus.mlp_weights(nan=True)))
    with pytest.raises(NonFiniteWeightsError, match="'head.weight' has 1 NaN"):
        validate_model(nan, "zoo_zip")
    wrong = corpus.zoo_zip(tmp_path / "shape.zip", corpus.zoo_safetensors(corpus.mlp_weights(wrong_shape=True)))
    with pytest.raises(ShapeMismatchError, match=r"'layers.0.weight' has shape \[8, 7\], expected \[8, 6\]"):
        validate_model(wrong, "zoo_zip")
    good = corpus.zoo_zip(tmp_path / "good.zip", corpus.zoo_safetensors(corpus.mlp_weights()))
    assert validate_model(good, "zoo_zip")["output_dim"] == 3  # the corpus' own weights are otherwise fine


def test_non_utf8_csv(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"not UTF-8 text: byte 0xe9 .*line 2"):
        validate_dataset(corpus.non_utf8_csv(tmp_path / "d.csv"), DataSpec(format="csv"))


def test_png_declaring_fifty_thousand_squared_pixels(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"b/bomb\.png.*(50000x50000|decompression bomb)"):
        validate_dataset(corpus.png_bomb_zip(tmp_path / "imgs.zip"), DataSpec(format="image_zip"))
