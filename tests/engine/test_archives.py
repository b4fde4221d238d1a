"""Safe archive extraction (zip, tar, tar.gz/bz2/xz): escapes, links, devices and bombs are
refused, by their headers when listing and on the bytes actually written when extracting."""

import io
import json
import os
import shutil
import stat
import tarfile
import zipfile

import numpy as np
import pytest
from PIL import Image

from tests.malicious import corpus
from worker.compression.errors import UnsafeFileError, UnsupportedFormatError
from worker.compression.io.archives import ArchiveLimits, list_members, safe_extract, safe_extract_zip
from worker.compression.io.datasets import load_dataset
from worker.compression.io.teachers import load_teacher
from worker.compression.spec import DataSpec


def _zip(path, members):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data, mode in members:
            info = zipfile.ZipInfo(name)
            info.external_attr = mode << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
    return path


def test_plain_members_extract_including_writestr_modes(tmp_path):
    src = _zip(tmp_path / "ok.zip", [("a/b.txt", b"hello", stat.S_IFREG | 0o644), ("c.txt", b"x", 0o600)])
    out = safe_extract_zip(src, tmp_path / "out")
    assert (out / "a" / "b.txt").read_bytes() == b"hello"
    assert (out / "c.txt").read_bytes() == b"x"


@pytest.mark.parametrize("name", ["../evil.txt", "a/../../evil.txt", "/etc/evil.txt"])
def test_escaping_member_names_are_refused(tmp_path, name):
    src = _zip(tmp_path / "slip.zip", [(name, b"x", stat.S_IFREG | 0o644)])
    with pytest.raises(UnsafeFileError):
        safe_extract_zip(src, tmp_path / "out")
    assert not (tmp_path / "evil.txt").exists()


def test_symlink_member_is_refused(tmp_path):
    src = _zip(tmp_path / "link.zip", [("link", b"/etc/passwd", stat.S_IFLNK | 0o777)])
    with pytest.raises(UnsafeFileError, match="link"):
        safe_extract_zip(src, tmp_path / "out")


def test_zip_bomb_stops_on_ratio_while_extracting(tmp_path):
    src = _zip(tmp_path / "bomb.zip", [("zeros.bin", b"\0" * (20 << 20), stat.S_IFREG | 0o644)])
    with pytest.raises(UnsafeFileError, match="ratio"):
        safe_extract_zip(src, tmp_path / "out", ArchiveLimits(max_ratio=50))


def test_total_size_and_entry_caps(tmp_path):
    src = _zip(tmp_path / "many.zip", [(f"f{i}", b"abc" * 1000, stat.S_IFREG | 0o644) for i in range(5)])
    with pytest.raises(UnsafeFileError, match="entries"):
        safe_extract_zip(src, tmp_path / "a", ArchiveLimits(max_entries=4))
    with pytest.raises(UnsafeFileError, match="expands"):
        safe_extract_zip(src, tmp_path / "b", ArchiveLimits(max_total_bytes=10_000, max_ratio=1e9))


def test_not_a_zip(tmp_path):
    p = tmp_path / "x.zip"
    p.write_bytes(b"not a zip")
    with pytest.raises(UnsupportedFormatError):
        safe_extract_zip(p)


# --- tar, and the same rules for every archive shape ---------------------------------------------

def _tar(path, members, mode="w"):
    with tarfile.open(path, mode) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("mode,suffix", [("w", ".tar"), ("w:gz", ".tar.gz"), ("w:bz2", ".tar.bz2"),
                                         ("w:xz", ".tar.xz")])
def test_tars_extract_into_a_private_folder(tmp_path, mode, suffix):
    src = _tar(tmp_path / f"ok{suffix}", [("top/config.json", b"{}"), ("top/w/a.bin", b"x" * 5000)], mode)
    out = safe_extract(src)
    try:
        assert stat.S_IMODE(os.stat(out).st_mode) == 0o700
        assert (out / "top" / "config.json").read_bytes() == b"{}"
        assert (out / "top" / "w" / "a.bin").stat().st_size == 5000
        assert [m.name for m in list_members(src)] == ["top/config.json", "top/w/a.bin"]
    finally:
        shutil.rmtree(out)


def test_zip_extraction_folder_is_private_too(tmp_path):
    src = _zip(tmp_path / "ok.zip", [("a.txt", b"x", stat.S_IFREG | 0o644)])
    out = safe_extract(src, tmp_path / "dest")
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o700


@pytest.mark.parametrize("name", ["../evil.txt", "a/../../evil.txt", "/tmp/evil.txt"])
def test_tar_escaping_names_are_refused(tmp_path, name):
    src = _tar(tmp_path / "slip.tar", [(name, b"x")])
    for check in (list_members, lambda p: safe_extract(p, tmp_path / "out")):
        with pytest.raises(UnsafeFileError, match="escapes|absolute"):
            check(src)
    assert not (tmp_path / "evil.txt").exists()


def test_tar_links_devices_and_fifos_are_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    for src, message in [(corpus.tar_symlink(tmp_path / "sym.tgz", str(outside)), "symbolic link"),
                         (corpus.tar_hardlink(tmp_path / "hard.tar"), "hard link"),
                         (corpus.tar_device(tmp_path / "dev.tar"), "device or fifo")]:
        for check in (list_members, lambda p: safe_extract(p, tmp_path / "out")):
            with pytest.raises(UnsafeFileError, match=message):
                check(src)
    assert list(outside.iterdir()) == []


def test_fifo_alone_is_refused(tmp_path):
    with tarfile.open(tmp_path / "fifo.tar", "w") as tf:
        info = tarfile.TarInfo("pipe")
        info.type = tarfile.FIFOTYPE
        tf.addfile(info)
    with pytest.raises(UnsafeFileError, match="fifo"):
        safe_extract(tmp_path / "fifo.tar", tmp_path / "out")


def test_tar_gz_bomb_is_stopped_on_the_bytes_written(tmp_path):
    src = corpus.tar_gz_bomb(tmp_path / "bomb.tgz", mib=32)
    assert src.stat().st_size < 100_000
    with pytest.raises(UnsafeFileError, match="ratio"):
        safe_extract(src, tmp_path / "out")
    written = sum(f.stat().st_size for f in (tmp_path / "out").rglob("*") if f.is_file())
    assert written < 16 << 20  # stopped early, not after writing everything
    with pytest.raises(UnsafeFileError, match="ratio"):
        list_members(src)


def test_zip_bomb_is_refused_by_its_declared_ratio_before_extracting(tmp_path):
    src = corpus.zip_bomb(tmp_path / "bomb.zip", mib=32)
    with pytest.raises(UnsafeFileError, match="ratio"):
        list_members(src)


def test_total_cap_counts_bytes_written_not_declared(tmp_path):
    """A central directory that understates a member's size does not get more bytes past the cap:
    the member is cut at its declared size and fails its CRC check."""
    data = os.urandom(300_000)
    src = _zip(tmp_path / "lie.zip", [("a.bin", data, stat.S_IFREG | 0o644)])
    raw = bytearray(src.read_bytes())
    for sig in (b"PK\x03\x04", b"PK\x01\x02"):  # local header and central directory entry
        at = raw.find(sig)
        off = 22 if sig == b"PK\x03\x04" else 24  # uncompressed size field
        raw[at + off:at + off + 4] = (1000).to_bytes(4, "little")
    src.write_bytes(bytes(raw))
    assert list_members(src)[0].size == 1000
    with pytest.raises(UnsupportedFormatError, match="corrupt"):
        safe_extract(src, tmp_path / "out")
    assert (tmp_path / "out" / "a.bin").stat().st_size <= 1000


def test_tar_entry_count_is_capped_while_reading(tmp_path):
    src = _tar(tmp_path / "many.tar.gz", [(f"f{i}", b"a") for i in range(50)], "w:gz")
    with pytest.raises(UnsafeFileError, match="entries"):
        safe_extract(src, tmp_path / "out", ArchiveLimits(max_entries=10))
    assert len(list((tmp_path / "out").iterdir())) <= 10


def test_total_size_cap_on_tar(tmp_path):
    src = _tar(tmp_path / "big.tar", [(f"f{i}", os.urandom(4000)) for i in range(5)])
    with pytest.raises(UnsafeFileError, match="expands past"):
        safe_extract(src, tmp_path / "out", ArchiveLimits(max_total_bytes=10_000))


def test_neither_zip_nor_tar(tmp_path):
    p = tmp_path / "x.tar"
    p.write_bytes(b"hello" * 100)
    with pytest.raises(UnsupportedFormatError, match="neither a zip nor a tar"):
        safe_extract(p)


def test_every_archive_shaped_input_takes_tar_too(tmp_path):
    """A zoo folder as .tar.gz loads as a teacher and an image folder as .tar as a dataset, through
    the same extraction rules."""
    weights = corpus.zoo_safetensors(corpus.mlp_weights())
    zoo = _tar(tmp_path / "teacher.tar.gz", [("teacher/config.json", json.dumps(corpus.TEACHER_CONFIG).encode()),
                                            ("teacher/model.safetensors", weights)], "w:gz")
    teacher = load_teacher(zoo)
    assert teacher.kind == "zoo" and teacher.output_dim == 3

    images = []
    for i, cls in enumerate(["cat", "cat", "dog"]):
        buf = io.BytesIO()
        Image.fromarray(np.full((4, 4, 3), 40 * i, np.uint8)).save(buf, "PNG")
        images.append((f"pets/{cls}/{i}.png", buf.getvalue()))
    data = load_dataset(_tar(tmp_path / "pets.tar", images), DataSpec(format="image_zip"))
    assert data.classes == ["cat", "dog"] and len(data) == 3
