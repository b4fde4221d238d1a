"""The API's synchronous upload checks (service.api.inspection) on the malicious corpus, without a
stack: what they refuse (422 / 415 with the reason), and what they leave to the validate worker."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from service.api.inspection import InspectionLimits, inspect_upload
from service.api.problems import ProblemError
from service.core.settings import Settings
from tests.malicious import corpus

from .conftest import REPO

LIMITS = InspectionLimits.of(Settings())
CODE_ON = InspectionLimits.of(Settings(allow_code_checkpoints=True))
MODEL_FORMATS = ("auto", "zoo_zip", "hf_zip", "onnx", "torchscript", "exported_program")


def refused(kind: str, fmt: str, path: Path, limits: InspectionLimits = LIMITS, status: int = 422) -> str:
    with pytest.raises(ProblemError) as err:
        inspect_upload(kind, fmt, path, limits)  # type: ignore[arg-type]
    problem = err.value.problem
    assert problem.status == status, problem
    return f"{problem.code}: {problem.detail}"


@pytest.fixture
def canary(tmp_path: Path) -> Path:
    path = tmp_path / "canary"
    yield path
    assert not path.exists()


@pytest.mark.parametrize("fmt", MODEL_FORMATS)
def test_pickles_are_refused_under_every_model_format(tmp_path: Path, canary: Path, fmt: str) -> None:
    for make in (corpus.pickle_canary, corpus.torch_save_canary):
        path = make(tmp_path / "m.bin", canary)
        for limits in (LIMITS, CODE_ON):
            reason = refused("model", fmt, path, limits)
            assert reason.startswith("unsafe_file: this is a Python pickle") and "never loaded" in reason


@pytest.mark.parametrize("fmt", ["auto", "npz", "csv", "safetensors", "image_zip", "parquet"])
def test_pickles_are_refused_as_datasets(tmp_path: Path, canary: Path, fmt: str) -> None:
    assert "Python pickle" in refused("dataset", fmt, corpus.pickle_canary(tmp_path / "d.bin", canary))


@pytest.mark.parametrize("fmt", ["auto", "npz"])
def test_npz_object_arrays_are_refused(tmp_path: Path, canary: Path, fmt: str) -> None:
    reason = refused("dataset", fmt, corpus.npz_object_canary(tmp_path / "d.npz", canary))
    assert reason.startswith("unsafe_file: array 'x' holds Python objects") and "pickle" in reason


def test_npz_whose_array_header_outgrows_the_member(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x=np.zeros((10, 4), np.float32))
    with zipfile.ZipFile(tmp_path / "d.npz") as zf:
        raw = zf.read("x.npy")
    lying = raw.replace(b"(10, 4)", b"(99, 4)")
    with zipfile.ZipFile(tmp_path / "lie.npz", "w") as zf:
        zf.writestr("x.npy", lying)
    assert "truncated" in refused("dataset", "npz", tmp_path / "lie.npz")
    inspect_upload("dataset", "npz", tmp_path / "d.npz", LIMITS)  # the honest one passes


def test_code_checkpoints_need_the_operator(tmp_path: Path) -> None:
    script = corpus.torchscript_mlp(tmp_path / "m.pt")
    for fmt in ("auto", "torchscript", "zoo_zip", "onnx"):
        reason = refused("model", fmt, script)
        assert "TorchScript" in reason and "KDQ_ALLOW_CODE_CHECKPOINTS=1" in reason
    inspect_upload("model", "auto", script, CODE_ON)
    inspect_upload("model", "torchscript", script, CODE_ON)
    assert "declare format 'torchscript'" in refused("model", "exported_program", script, CODE_ON, 415)
    assert "not a TorchScript" in refused("model", "torchscript", corpus.zip_slip(tmp_path / "z.zip"),
                                          CODE_ON, 415)


def test_archive_members_that_escape_link_or_are_devices(tmp_path: Path) -> None:
    cases = [(corpus.zip_slip(tmp_path / "slip.zip"), "escapes its folder"),
             (corpus.zip_symlink(tmp_path / "link.zip"), "symbolic link"),
             (corpus.tar_symlink(tmp_path / "link.tgz"), "symbolic link"),
             (corpus.tar_hardlink(tmp_path / "hard.tar"), "hard link"),
             (corpus.tar_device(tmp_path / "dev.tar"), "device or fifo")]
    for path, message in cases:
        for kind, fmt in (("model", "zoo_zip"), ("model", "auto"), ("dataset", "image_zip")):
            assert message in refused(kind, fmt, path)


def test_bombs_by_declared_ratio_and_count(tmp_path: Path) -> None:
    assert "compression ratio" in refused("model", "zoo_zip", corpus.zip_bomb(tmp_path / "b.zip", mib=16))
    assert "compression ratio" in refused("dataset", "image_zip", corpus.tar_gz_bomb(tmp_path / "b.tgz", mib=16))
    few = InspectionLimits.of(Settings(archive_max_entries=3))
    many = corpus._zip(tmp_path / "many.zip", {f"a/{i}.png": b"x" for i in range(5)})
    assert "entries" in refused("dataset", "image_zip", many, few)


def test_safetensors_headers(tmp_path: Path) -> None:
    truncated = corpus.truncated_safetensors(tmp_path / "t.safetensors")
    lying = corpus.lying_offsets_safetensors(tmp_path / "l.safetensors")
    assert refused("dataset", "safetensors", truncated).startswith("truncated_file:")
    assert "ends at byte 1099511627776" in refused("dataset", "safetensors", lying)
    assert "ends at byte 1099511627776" in refused("model", "auto", lying)
    in_zip = corpus.zoo_zip(tmp_path / "t.zip", truncated.read_bytes())
    assert refused("model", "zoo_zip", in_zip).startswith("truncated_file:")
    lie_zip = corpus.zoo_zip(tmp_path / "l.zip", lying.read_bytes())
    assert "ends at byte" in refused("model", "zoo_zip", lie_zip)
    bad_dtype = corpus.raw_safetensors({"w": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4)
    (tmp_path / "d.safetensors").write_bytes(bad_dtype)
    assert "unsupported dtype 'F33'" in refused("dataset", "safetensors", tmp_path / "d.safetensors")


def test_png_pixel_cap(tmp_path: Path) -> None:
    reason = refused("dataset", "image_zip", corpus.png_bomb_zip(tmp_path / "i.zip"))
    assert "b/bomb.png is 50000x50000 pixels" in reason
    assert "b/bomb.png" in refused("dataset", "auto", corpus.png_bomb_zip(tmp_path / "i.zip"))


def test_plain_format_mismatches_are_415(tmp_path: Path) -> None:
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    for kind, fmt in (("model", "zoo_zip"), ("model", "hf_zip"), ("dataset", "npz"), ("dataset", "image_zip"),
                      ("dataset", "parquet")):
        assert refused(kind, fmt, other, status=415).startswith("unsupported_media_type:")
    assert "not an ONNX graph" in refused("model", "onnx", corpus.zip_slip(tmp_path / "z.zip"), status=415)


def test_what_needs_the_worker_passes(tmp_path: Path) -> None:
    """Deeper problems (and damaged archives) are the validate worker's to explain."""
    good = corpus.zoo_zip(tmp_path / "good.zip", corpus.zoo_safetensors(corpus.mlp_weights()))
    nan = corpus.zoo_zip(tmp_path / "nan.zip", corpus.zoo_safetensors(corpus.mlp_weights(nan=True)))
    cut = tmp_path / "cut.zip"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with tarfile.open(tmp_path / "good.tgz", "w:gz") as tf:
        tf.add(tmp_path / "good.zip", "folder/model.zip")
    for kind, fmt, path in [("model", "zoo_zip", good), ("model", "zoo_zip", nan), ("model", "zoo_zip", cut),
                            ("model", "auto", corpus.onnx_external_escape(tmp_path / "x.zip")),
                            ("model", "zoo_zip", tmp_path / "good.tgz"),
                            ("dataset", "csv", corpus.non_utf8_csv(tmp_path / "d.csv")),
                            ("dataset", "image_zip", corpus._zip(tmp_path / "imgs.zip", {"a/1.png": b"x"}))]:
        inspect_upload(kind, fmt, path, LIMITS)  # type: ignore[arg-type]
    (tmp_path / "cfg.json").write_text(json.dumps({"a": 1}))
    inspect_upload("model", "onnx", tmp_path / "cfg.json", LIMITS)


def test_the_api_stays_torch_free() -> None:
    code = "import service.api.app, service.api.inspection, sys; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)
