"""Safe zip extraction: escapes, links and bombs are refused while extracting."""

import stat
import zipfile

import pytest

from worker.compression.archives import ArchiveLimits, safe_extract_zip
from worker.compression.errors import UnsafeFileError, UnsupportedFormatError


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
