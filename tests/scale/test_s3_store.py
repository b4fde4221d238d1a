"""The S3 store in-process against moto: the streamed upload's bounded footprint, the mirror's
parity with the whole file for the upload checks, content addressing, cleanup, and an unreachable
store raised as `StoreUnavailable`."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import tracemalloc
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.api.inspection import InspectionLimits, inspect_upload
from service.api.problems import ProblemError
from service.core.s3mirror import Mirror, RangedReader, prefetch_for_inspection
from service.core.s3store import S3Store
from service.core.settings import Settings
from service.core.store import StoreUnavailable
from tests.malicious import corpus
from tests.service.assets import write_assets

from .s3 import CREDENTIALS, keys, multipart_uploads, new_bucket, s3_client

PART = 5 << 20


@pytest.fixture
def store(moto_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Store]:
    for k, v in CREDENTIALS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_endpoint)
    bucket = new_bucket(moto_endpoint)
    s = S3Store(f"s3://{bucket}/p", tmp_dir=tmp_path / "staging", part_bytes=PART, addressing_style="path")
    yield s
    s.parts.shutdown()


def _big_zip(path: Path, mib: int) -> Path:
    rng = np.random.default_rng(1)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for i in range(mib):
            zf.writestr(f"chunk{i:03d}.bin", rng.bytes(1 << 20))
    return path


def test_a_large_upload_streams_in_parts_with_bounded_memory_and_disk(store: S3Store, tmp_path: Path) -> None:
    data_path = _big_zip(tmp_path / "big.zip", 96)
    data = data_path.read_bytes()
    tracemalloc.start()
    w = store.writer()
    with open(data_path, "rb") as f:
        while chunk := f.read(1 << 20):
            w.write(chunk)
    staged = w.staged_path()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    held = staged.stat().st_blocks * 512
    assert staged.stat().st_size == len(data)
    assert held <= 3 * PART, f"{held} bytes on disk for a {len(data)}-byte upload"
    # parts in flight, the one filling, the tail kept for the checks, boto's copies: not the file
    assert peak <= 9 * PART < len(data), f"peak {peak} bytes in memory for a {len(data)}-byte upload"
    with zipfile.ZipFile(staged) as zf:  # the checks can read the archive's directory
        assert len(zf.infolist()) == 96
    assert keys(store.client.meta.endpoint_url, store.bucket, "p/sha256/") == []  # nothing listed yet
    ref = w.commit()
    assert ref.sha256 == hashlib.sha256(data).hexdigest() and ref.size == len(data)
    assert keys(store.client.meta.endpoint_url, store.bucket, "p/") == [store.key(ref.sha256)]
    assert not staged.exists()
    got = store.fetch(ref.sha256, tmp_path / "back.zip")
    assert got.read_bytes() == data
    assert b"".join(store.stream(ref.sha256, 100, 200)) == data[100:200]


def test_same_bytes_twice_is_one_object_and_abort_leaves_nothing(store: S3Store, tmp_path: Path) -> None:
    endpoint = store.client.meta.endpoint_url
    for _ in range(2):
        w = store.writer()
        w.write(b"x" * 100)
        ref = w.commit()
    assert keys(endpoint, store.bucket, "p/") == [store.key(ref.sha256)]
    w = store.writer()
    for _ in range(3):
        w.write(b"y" * (3 << 20))
    w.staged_path()
    w.abort()
    assert keys(endpoint, store.bucket, "p/") == [store.key(ref.sha256)]
    assert multipart_uploads(endpoint, store.bucket) == []
    assert list((tmp_path / "staging").iterdir()) == []


def test_the_staging_sweep_leaves_an_upload_in_progress_alone(store: S3Store) -> None:
    """moto dates every multipart upload 2010-11-10: by its date alone, a sweep would abort one still
    being written (the API sweeps every retention interval)."""
    endpoint = store.client.meta.endpoint_url
    w = store.writer()
    w.write(b"z" * (2 * PART + 1))  # two parts sent: a multipart upload under staging/
    assert len(multipart_uploads(endpoint, store.bucket)) == 1
    assert store.sweep_staging(older_than_s=0) == 0
    ref = w.commit()
    assert keys(endpoint, store.bucket, "p/") == [store.key(ref.sha256)]


def test_an_unreachable_store_raises_store_unavailable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.service.conftest import free_port

    for k, v in CREDENTIALS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")
    s = S3Store("s3://nowhere/p", tmp_dir=tmp_path, addressing_style="path", timeout_s=1)
    with pytest.raises(StoreUnavailable):
        s.exists("0" * 64)
    w = s.writer()
    w.write(b"z" * (9 << 20))  # the first part (8 MiB) fails; write() keeps going
    w.write(b"z" * 100)
    with pytest.raises(StoreUnavailable):
        w.staged_path()
    w.abort()
    small = s.writer()
    small.write(b"tiny")
    assert small.staged_path().read_bytes() == b"tiny"  # checked locally: nothing sent yet
    with pytest.raises(StoreUnavailable):
        small.commit()
    assert list(tmp_path.iterdir()) == []


# --- the mirror's parity with the whole file ------------------------------------------------------


def _cases(folder: Path) -> Iterator[tuple[str, str, Path]]:
    canary = folder / "canary"
    assets = write_assets(folder / "assets")
    yield "model", "zoo_zip", assets["teacher"]
    yield "model", "zoo_zip", assets["truncated"]
    yield "dataset", "npz", assets["data"]
    yield "dataset", "npz", corpus.npz_object_canary(folder / "objects.npz", canary)
    yield "model", "auto", corpus.pickle_canary(folder / "p.pkl", canary)
    yield "model", "zoo_zip", corpus.zoo_zip_with_pickle(folder / "zp.zip", canary)
    yield "model", "zoo_zip", corpus.zip_slip(folder / "slip.zip")
    yield "model", "zoo_zip", corpus.zip_symlink(folder / "link.zip")
    yield "model", "zoo_zip", corpus.zip_bomb(folder / "bomb.zip", mib=8)
    yield "dataset", "image_zip", corpus.tar_symlink(folder / "link.tar")
    yield "dataset", "image_zip", corpus.tar_device(folder / "dev.tar")
    yield "model", "auto", corpus.truncated_safetensors(folder / "t.safetensors")
    yield "model", "auto", corpus.lying_offsets_safetensors(folder / "l.safetensors")
    # the interesting members far from both ends
    rng = np.random.default_rng(2)
    big = {"a": rng.random(40_000), "obj": np.array([{"k": 1}], dtype=object), "b": rng.random(40_000)}
    np.savez(folder / "middle.npz", **big)
    yield "dataset", "npz", folder / "middle.npz"
    weights = corpus.zoo_safetensors(corpus.mlp_weights())
    with zipfile.ZipFile(folder / "pad.zip", "w") as zf:
        zf.writestr("padding.txt", rng.bytes(300_000))
        zf.writestr("config.json", json.dumps(corpus.TEACHER_CONFIG))
        zf.writestr("model.safetensors", weights[:40] + b"\xff" * 8 + weights[48:])
        zf.writestr("tail.txt", rng.bytes(300_000))
    yield "model", "zoo_zip", folder / "pad.zip"
    with tarfile.open(folder / "imgs.tar", "w") as tf:
        for i in range(40):
            payload = rng.bytes(20_000)
            info = tarfile.TarInfo(f"cls{i % 2}/img{i}.bin")
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
        huge = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + (100_000).to_bytes(4, "big") * 2 + b"\x08\x02"
        info = tarfile.TarInfo("cls0/huge.png")
        info.size = len(huge)
        tf.addfile(info, io.BytesIO(huge))
        for i in range(40):
            payload = rng.bytes(20_000)
            info = tarfile.TarInfo(f"cls1/late{i}.bin")
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    yield "dataset", "image_zip", folder / "imgs.tar"


def _verdict(kind: str, fmt: str, path: Path, limits: InspectionLimits) -> Any:
    try:
        inspect_upload(kind, fmt, path, limits)  # type: ignore[arg-type]
    except ProblemError as exc:  # (a detail may name the staged file: the same name for both)
        return exc.problem.status, exc.problem.code, (exc.problem.detail or "").replace(path.name, "FILE")
    return None


def test_the_checks_judge_the_mirror_exactly_as_the_whole_file(tmp_path: Path) -> None:
    """Each file through a `Mirror` keeping only 4 KiB at each end: after the prefetch, every
    check gives the same verdict as on the whole file."""
    limits = InspectionLimits.of(Settings(database_url="postgresql://unused/x", broker_url="redis://unused"))
    verdicts = []
    for kind, fmt, path in _cases(tmp_path / "cases"):
        data = path.read_bytes()
        mirror = Mirror(tmp_path / "m", keep=4096)
        for i in range(0, len(data), 1000):
            mirror.write(i, data[i : i + 1000])
        mirror.finish(len(data))
        reader = RangedReader(mirror, lambda a, b, data=data: data[a:b])
        prefetch_for_inspection(reader, scan_bytes=limits.scan_bytes, max_entries=limits.archive.max_entries)
        whole, mirrored = _verdict(kind, fmt, path, limits), _verdict(kind, fmt, mirror.path, limits)
        assert mirrored == whole, (path.name, whole, mirrored)
        if len(data) > 64 << 10:
            assert mirror.held_bytes() < len(data), path.name  # it did not just fetch everything
        verdicts.append(whole)
        mirror.close()
    assert sum(v is not None for v in verdicts) >= 10  # the corpus is refused, for the right reasons
