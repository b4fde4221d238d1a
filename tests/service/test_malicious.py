"""The malicious corpus (tests/malicious) against the real API, workers, Postgres and Redis.

Every input ends in a 4xx problem with a clear reason: a synchronous 422 (then no row and no
blob is added), or ``invalid`` after validation with a 422 problem in ``error`` (then a job
naming it is a 422). No pickle is unpickled: the canary file never appears. The multipart
limits are checked here too, over real chunked requests.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from tests.malicious import corpus

from .conftest import Stack
from .flows import submit, wait_upload

PROBLEM = "application/problem+json"
BOUNDARY = "kdq-malicious"
MODEL_FORMATS = ("auto", "zoo_zip", "hf_zip", "onnx", "torchscript", "exported_program")


def stored(pg_stack: Stack, pg_url: str) -> dict[str, Any]:
    """What a rejected upload must leave as it was: row counts and every file under the store."""
    store = Path(pg_stack.env["KDQ_STORAGE_DIR"])
    with psycopg.connect(pg_url.replace("+psycopg", ""), autocommit=True) as conn:
        counts = {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                  for t in ("models", "datasets", "jobs")}
    return {**counts, "files": sorted(str(p.relative_to(store)) for p in store.rglob("*") if p.is_file())}


@pytest.fixture
def unchanged(pg_stack: Stack, pg_url: str) -> Iterator[None]:
    before = stored(pg_stack, pg_url)
    yield
    assert stored(pg_stack, pg_url) == before


@pytest.fixture
def canary(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "canary"
    yield path
    assert not path.exists(), "an upload was unpickled"


def post(api: httpx.Client, kind: str, path: Path, **fields: str) -> httpx.Response:
    with open(path, "rb") as fh:
        return api.post(f"/v1/{kind}", files={"file": (path.name, fh)}, data=fields)


def problem(r: httpx.Response, status: int = 422) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == PROBLEM
    body = r.json()
    assert body["status"] == status and body["detail"] and "Traceback" not in r.text
    return body


def multipart(parts: list[tuple[str, str | None, bytes]], extra_headers: bytes = b"") -> bytes:
    out = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n".encode() + extra_headers + b"\r\n"
        out += data + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode()


def chunked(body: bytes, size: int = 7919) -> Iterator[bytes]:
    """The body as a generator: httpx sends it with Transfer-Encoding: chunked, no Content-Length."""
    for i in range(0, len(body), size):
        yield body[i : i + size]


HEADERS = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}


# --- synchronous refusals ------------------------------------------------------------------------

def test_pickles_are_refused_in_every_format_and_never_opened(
    api: httpx.Client, unchanged: None, canary: Path, tmp_path: Path
) -> None:
    for make in (corpus.pickle_canary, corpus.torch_save_canary):
        path = make(tmp_path / "model.pt", canary)
        for fmt in MODEL_FORMATS:
            body = problem(post(api, "models", path, format=fmt))
            assert body["code"] == "unsafe_file" and "Python pickle" in body["detail"], (fmt, body)
            assert "never loaded" in body["detail"] and body["errors"][0]["pointer"] == "#/file"
    npz = corpus.npz_object_canary(tmp_path / "data.npz", canary)
    for fmt in ("auto", "npz"):
        body = problem(post(api, "datasets", npz, format=fmt))
        assert body["code"] == "unsafe_file" and "array 'x' holds Python objects" in body["detail"]
    for fmt in ("npz", "csv", "safetensors"):
        body = problem(post(api, "datasets", corpus.pickle_canary(tmp_path / "d.bin", canary), format=fmt))
        assert "Python pickle" in body["detail"]


def test_code_checkpoints_are_refused_while_the_operator_has_not_allowed_them(
    api: httpx.Client, unchanged: None, tmp_path: Path
) -> None:
    script = corpus.torchscript_mlp(tmp_path / "model.pt")
    for fmt in ("auto", "torchscript"):
        body = problem(post(api, "models", script, format=fmt))
        assert "TorchScript" in body["detail"] and "KDQ_ALLOW_CODE_CHECKPOINTS=1" in body["detail"]


def test_unsafe_archives_are_refused(api: httpx.Client, unchanged: None, tmp_path: Path) -> None:
    cases = [
        ("models", "zoo_zip", corpus.zip_slip(tmp_path / "slip.zip"), "escapes its folder"),
        ("models", "auto", corpus.zip_symlink(tmp_path / "link.zip"), "symbolic link"),
        ("models", "zoo_zip", corpus.zip_bomb(tmp_path / "bomb.zip"), "compression ratio"),
        ("models", "hf_zip", corpus.tar_symlink(tmp_path / "link.tgz"), "symbolic link"),
        ("models", "zoo_zip", corpus.tar_hardlink(tmp_path / "hard.tar"), "hard link"),
        ("datasets", "image_zip", corpus.tar_symlink(tmp_path / "link2.tgz"), "symbolic link"),
        ("datasets", "image_zip", corpus.tar_device(tmp_path / "dev.tar"), "device or fifo"),
        ("datasets", "image_zip", corpus.tar_gz_bomb(tmp_path / "bomb.tgz"), "compression ratio"),
        ("datasets", "image_zip", corpus.png_bomb_zip(tmp_path / "png.zip"), "50000x50000 pixels"),
    ]
    for kind, fmt, path, reason in cases:
        body = problem(post(api, kind, path, format=fmt))
        assert body["code"] == "unsafe_file" and reason in body["detail"], (path.name, body)


def test_lying_safetensors_headers_are_refused(api: httpx.Client, unchanged: None, tmp_path: Path) -> None:
    truncated = corpus.truncated_safetensors(tmp_path / "t.safetensors")
    body = problem(post(api, "datasets", truncated, format="safetensors"))
    assert body["code"] == "truncated_file" and "truncated" in body["detail"]
    in_zip = corpus.zoo_zip(tmp_path / "t.zip", truncated.read_bytes())
    body = problem(post(api, "models", in_zip, format="zoo_zip"))
    assert body["code"] == "truncated_file"
    lying = corpus.lying_offsets_safetensors(tmp_path / "l.safetensors")
    body = problem(post(api, "datasets", lying, format="safetensors"))
    assert "ends at byte 1099511627776" in body["detail"]


def test_checks_hold_for_chunked_bodies_too(api: httpx.Client, unchanged: None, tmp_path: Path) -> None:
    bomb = corpus.zip_bomb(tmp_path / "bomb.zip").read_bytes()
    body = multipart([("format", None, b"zoo_zip"), ("file", "bomb.zip", bomb)])
    r = api.post("/v1/models", content=chunked(body), headers=HEADERS)
    assert "content-length" not in r.request.headers and r.request.headers["transfer-encoding"] == "chunked"
    assert "compression ratio" in problem(r)["detail"]


# --- refusals after validation -------------------------------------------------------------------

def test_deeper_problems_make_the_upload_invalid_and_jobs_refuse_it(
    api: httpx.Client, pg_uploads: dict[str, Any], canary: Path, tmp_path: Path
) -> None:
    (tmp_path / "secret.bin").write_bytes(b"\0" * 16)
    cases = [
        ("models", "auto", corpus.onnx_external_escape(tmp_path / "onnx.zip"), "leaves the model folder"),
        ("models", "zoo_zip", corpus.zoo_zip(tmp_path / "nan.zip", corpus.zoo_safetensors(
            corpus.mlp_weights(nan=True))), "'head.weight' has 1 NaN"),
        ("models", "zoo_zip", corpus.zoo_zip(tmp_path / "shape.zip", corpus.zoo_safetensors(
            corpus.mlp_weights(wrong_shape=True))), "has shape [8, 7], expected [8, 6]"),
        ("datasets", "csv", corpus.non_utf8_csv(tmp_path / "data.csv"), "not UTF-8 text"),
    ]
    accepted = []
    for kind, fmt, path, reason in cases:
        r = post(api, kind, path, format=fmt)
        assert r.status_code == 201 and r.json()["state"] == "validating", r.text
        accepted.append((kind, r.json()["id"], reason))
    for kind, ident, reason in accepted:
        row = wait_upload(api, kind, ident)
        assert row["state"] == "invalid" and row["summary"] is None, row
        error = row["error"]
        assert error["status"] == 422 and error["code"] and reason in error["detail"], row
        if kind == "models":
            spec = {"teacher_model_id": ident, "dataset_id": pg_uploads["dataset"]["id"]}
            pointer = "#/teacher_model_id"
        else:
            spec = {"teacher_model_id": pg_uploads["teacher"]["id"], "dataset_id": ident}
            pointer = "#/dataset_id"
        body = problem(submit(api, spec))
        assert body["errors"][0]["pointer"] == pointer and "invalid" in body["errors"][0]["detail"]
        assert reason in body["errors"][0]["detail"]


# --- multipart limits ----------------------------------------------------------------------------

def test_multipart_limits_over_chunked_requests(pg_stack: Stack, api: httpx.Client, unchanged: None) -> None:
    small = b"x" * 100
    too_many = multipart([(f"f{i}", None, b"1") for i in range(200)] + [("file", "m.onnx", small)])
    r = api.post("/v1/models", content=chunked(too_many, 64), headers=HEADERS)
    assert problem(r, 413)["code"] == "too_many_parts"

    for flood in (b"".join(f"X-Pad-{i}: {'a' * 4000}\r\n".encode() for i in range(5)),  # 20 kB in all
                  f"X-Pad: {'a' * 9000}\r\n".encode()):  # one long header line
        r = api.post("/v1/models", content=chunked(multipart([("file", "m.onnx", small)], flood)), headers=HEADERS)
        assert problem(r, 413)["code"] == "part_headers_too_large"

    big_field = multipart([("name", None, b"n" * (1 << 20)), ("file", "m.onnx", small)])
    r = api.post("/v1/models", content=chunked(big_field), headers=HEADERS)
    assert problem(r, 413)["code"] == "field_too_large"

    cap = int(pg_stack.env["KDQ_MAX_UPLOAD_BYTES"])
    head = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="big.bin"\r\n\r\n'.encode()

    def endless() -> Iterator[bytes]:
        yield head
        for _ in range(cap // (1 << 20) * 4):
            yield b"\1" * (1 << 20)

    r = api.post("/v1/datasets", content=endless(), headers=HEADERS)
    assert "content-length" not in r.request.headers
    assert problem(r, 413)["code"] == "too_large"
    assert list((Path(pg_stack.env["KDQ_STORAGE_DIR"]) / "tmp").iterdir()) == []
