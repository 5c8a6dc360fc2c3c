"""Zip extraction rejects, never sanitises: a corpus of malicious archives (built with
``zipfile`` and, for what ``zipfile`` will not write, by hand with ``struct``), each
refused with its reason and nothing left behind; and a good archive extracted exactly."""

from __future__ import annotations

import io
import os
import stat
import struct
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from conftest import sha
from modelfs_store.archive import (
    DEFAULT_LIMITS,
    ExtractedFile,
    Limits,
    extract_zip,
    inspect_zip,
)
from modelfs_store.errors import ArchiveError, Conflict

SMALL = Limits(max_entries=50, max_total_size=50 * 1024 * 1024, max_ratio=100, ratio_min_size=64 * 1024)


# ---------------------------------------------------------------- a hand-made zip writer


@dataclass
class Member:
    name: bytes
    data: bytes  # the bytes as stored (already compressed for method 8)
    method: int = 0
    crc: int = 0
    file_size: int = 0
    flags: int = 0
    external_attr: int = 0
    create_system: int = 3
    local_name: bytes | None = None
    offset: int = field(default=0)


def member(name: str | bytes, content: bytes = b"", *, deflate: bool = False, **kw: Any) -> Member:
    raw_name = name.encode("utf-8") if isinstance(name, str) else name
    if deflate:
        c = zlib.compressobj(9, zlib.DEFLATED, -15)
        stored = c.compress(content) + c.flush()
    else:
        stored = content
    m = Member(name=raw_name, data=stored, method=8 if deflate else 0, crc=zlib.crc32(content),
               file_size=len(content))
    if isinstance(name, str) and not name.isascii():
        m.flags |= 0x800
    for k, v in kw.items():
        setattr(m, k, v)
    return m


def build_zip(members: list[Member], central: list[Member] | None = None) -> bytes:
    """Local headers for ``members``, then a central directory for ``central``
    (default: the same members), which may point several entries at one header."""
    out = io.BytesIO()
    for m in members:
        m.offset = out.tell()
        lname = m.local_name if m.local_name is not None else m.name
        out.write(struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, m.flags, m.method, 0, 0x21,
                              m.crc, len(m.data), m.file_size, len(lname), 0))
        out.write(lname)
        out.write(m.data)
    cd_start = out.tell()
    entries = central if central is not None else members
    for m in entries:
        out.write(struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", (m.create_system << 8) | 20, 20,
                              m.flags, m.method, 0, 0x21, m.crc, len(m.data), m.file_size,
                              len(m.name), 0, 0, 0, 0, m.external_attr, m.offset))
        out.write(m.name)
    cd_size = out.tell() - cd_start
    out.write(struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, len(entries), len(entries),
                          cd_size, cd_start, 0))
    return out.getvalue()


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    d = tmp_path / "dest"
    d.mkdir()
    return d


def write(tmp_path: Path, data: bytes, name: str = "a.zip") -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def assert_refused(path: Path, dest: Path, reason: str, limits: Limits = SMALL) -> ArchiveError:
    with pytest.raises(ArchiveError) as info:
        extract_zip(path, dest, "out", limits)
    exc = info.value
    assert exc.fields["reason"] == reason, str(exc)
    assert "\n" not in str(exc) and str(exc).startswith("archive 'a.zip' refused: ")
    assert list(dest.iterdir()) == [], "a refusal left something behind"
    return exc



# ---------------------------------------------------------------- the good archive


def test_good_archive_extracts_exactly(tmp_path: Path, dest: Path) -> None:
    files = {
        "Model.mlmodelc/model.mil": b"program(1.0)\n" * 50,
        "Model.mlmodelc/weights/weight.bin": os.urandom(200_000),
        "Model.mlmodelc/analytics/coremldata.bin": b"\x00\x01" * 10,
        "Model.mlmodelc/metadata.json": b"{}",
        "Model.mlmodelc/empty.txt": b"",
    }
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(zipfile.ZipInfo("Model.mlmodelc/"), b"")
        for i, (name, content) in enumerate(files.items()):
            zf.writestr(name, content, compress_type=zipfile.ZIP_DEFLATED if i % 2 else zipfile.ZIP_STORED)
        zf.writestr(zipfile.ZipInfo("Model.mlmodelc/unused/"), b"")
    path = write(tmp_path, buf.getvalue())

    entries = inspect_zip(path, SMALL)
    assert [e.path for e in entries][:2] == ["Model.mlmodelc", "Model.mlmodelc/model.mil"]
    assert {e.method for e in entries if not e.is_dir} == {"stored", "deflate"}

    seen: list[ExtractedFile] = []
    result = extract_zip(path, dest, "Model", SMALL, on_file=seen.append)
    assert result.path == dest / "Model"
    assert sorted(p.name for p in dest.iterdir()) == ["Model"]  # temp dir renamed away
    expected = [ExtractedFile(path=n, size=len(c), sha256=sha(c)) for n, c in files.items()]
    assert list(result.files) == expected == seen
    for name, content in files.items():
        target = dest / "Model" / name
        assert target.read_bytes() == content
        assert stat.S_IMODE(target.stat().st_mode) == 0o444
    assert (dest / "Model" / "Model.mlmodelc" / "unused").is_dir()
    assert stat.S_IMODE((dest / "Model").stat().st_mode) == 0o755


def test_existing_destination_is_a_conflict(tmp_path: Path, dest: Path) -> None:
    path = write(tmp_path, build_zip([member("a.txt", b"hi")]))
    (dest / "out").mkdir()
    with pytest.raises(Conflict) as info:
        extract_zip(path, dest, "out", SMALL)
    assert info.value.fields["reason"] == "exists"
    assert [p.name for p in dest.iterdir()] == ["out"]


@pytest.mark.parametrize("name", ["", "..", "a/b", ".extract-x"])
def test_bad_destination_name(tmp_path: Path, dest: Path, name: str) -> None:
    path = write(tmp_path, build_zip([member("a.txt", b"hi")]))
    with pytest.raises(ArchiveError) as info:
        extract_zip(path, dest, name, SMALL)
    assert info.value.fields["reason"] == "bad-destination"
    assert list(dest.iterdir()) == []


# ---------------------------------------------------------------- the malicious corpus


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("../evil.txt", "traversal"),
        ("a/../../evil.txt", "traversal"),
        ("a/./b.txt", "traversal"),
        ("/etc/passwd", "absolute-path"),
        ("a\\..\\evil.txt", "backslash"),
        ("C:/evil.txt", "drive-letter"),
        ("c:evil.txt", "drive-letter"),
        ("a//b.txt", "empty-component"),
        ("a\x07b.txt", "control-char"),
        ("model\u202efugg.exe", "invisible-char"),
        ("dir\u200b/b.txt", "invisible-char"),
        ("a/b\u2029.txt", "invisible-char"),
        ("a/b.txt. ", "bad-name"),
        ("a./b.txt", "bad-name"),
        ("-rf/b.txt", "bad-name"),
        ("/".join(["d"] * 40) + "/f", "too-deep"),
        ("x" * 300, "name-too-long"),
    ],
)
def test_bad_names_are_refused(tmp_path: Path, dest: Path, name: str, reason: str) -> None:
    path = write(tmp_path, build_zip([member("ok.txt", b"fine"), member(name, b"evil")]))
    assert_refused(path, dest, reason)


def test_traversal_written_by_zipfile(tmp_path: Path, dest: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("good.txt", b"x")
        zf.writestr("../../outside.txt", b"x")
    assert_refused(write(tmp_path, buf.getvalue()), dest, "traversal")
    assert not (dest.parent / "outside.txt").exists()


def test_nul_in_name_is_refused(tmp_path: Path, dest: Path) -> None:
    # zipfile silently truncates at NUL ("evil.txt\0.gguf" -> "evil.txt"): refuse instead.
    path = write(tmp_path, build_zip([member(b"evil.txt\x00.gguf", b"x")]))
    assert_refused(path, dest, "nul")


def test_symlink_entry_is_refused(tmp_path: Path, dest: Path) -> None:
    link = zipfile.ZipInfo("weights.bin")
    link.create_system = 3
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(link, "/etc/shadow")
    assert_refused(write(tmp_path, buf.getvalue()), dest, "link")


@pytest.mark.parametrize("fmt", [stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK])
def test_special_file_entries_are_refused(tmp_path: Path, dest: Path, fmt: int) -> None:
    path = write(tmp_path, build_zip([member("dev", b"", external_attr=(fmt | 0o600) << 16)]))
    assert_refused(path, dest, "special-file")


def test_directory_type_on_a_file_name_is_refused(tmp_path: Path, dest: Path) -> None:
    path = write(tmp_path, build_zip([member("notadir", b"", external_attr=(stat.S_IFDIR | 0o755) << 16)]))
    assert_refused(path, dest, "type-mismatch")


def test_case_colliding_names_are_refused(tmp_path: Path, dest: Path) -> None:
    path = write(tmp_path, build_zip([member("dir/Weights.bin", b"a"), member("DIR/weights.BIN", b"b")]))
    assert_refused(path, dest, "duplicate-name")


def test_nfc_nfd_colliding_names_are_refused(tmp_path: Path, dest: Path) -> None:
    path = write(tmp_path, build_zip([member("caf\u00e9.bin", b"a"), member("cafe\u0301.bin", b"b")]))
    assert_refused(path, dest, "duplicate-name")


def test_exact_duplicate_names_are_refused(tmp_path: Path, dest: Path) -> None:
    path = write(tmp_path, build_zip([member("a.bin", b"a"), member("a.bin", b"b")]))
    assert_refused(path, dest, "duplicate-name")


def test_file_used_as_directory_is_refused(tmp_path: Path, dest: Path) -> None:
    path = write(tmp_path, build_zip([member("a", b"file"), member("A/b", b"inside")]))
    assert_refused(path, dest, "path-conflict")


def test_ratio_bomb_is_refused(tmp_path: Path, dest: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros.bin", b"\x00" * (4 * 1024 * 1024))
    exc = assert_refused(write(tmp_path, buf.getvalue()), dest, "ratio")
    assert exc.fields["entry"] == "zeros.bin"


def test_small_compressible_files_are_allowed(tmp_path: Path, dest: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("pad.bin", b"\x00" * 60_000)  # ~600:1 but under ratio_min_size
    result = extract_zip(write(tmp_path, buf.getvalue()), dest, "out", SMALL)
    assert result.files[0].size == 60_000


def test_total_size_limit(tmp_path: Path, dest: Path) -> None:
    path = write(tmp_path, build_zip([member(f"f{i}", os.urandom(1000)) for i in range(5)]))
    assert_refused(path, dest, "too-large", Limits(max_total_size=4000))


def test_too_many_entries_is_refused(tmp_path: Path, dest: Path) -> None:
    path = write(tmp_path, build_zip([member(f"f{i}", b"x") for i in range(51)]))
    exc = assert_refused(path, dest, "too-many-entries")
    assert exc.fields["count"] == 51


def test_two_central_entries_sharing_one_local_header_are_refused(tmp_path: Path, dest: Path) -> None:
    # The overlapping-file zip bomb (CVE-2024-0450): many central-directory entries,
    # one local header and one body, each entry inflating the same data again.
    shared = member("a.bin", os.urandom(1000))
    alias = member("b.bin", shared.data)
    alias.offset = 0  # shared's local header
    exc = assert_refused(write(tmp_path, build_zip([shared], central=[shared, alias])), dest, "overlap")
    assert "a.bin" in str(exc) and "b.bin" in str(exc)


def test_local_header_hidden_inside_another_entry_is_refused(tmp_path: Path, dest: Path) -> None:
    inner_body = b"inner payload"
    inner_local = struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, 0, 0, 0, 0x21, zlib.crc32(inner_body),
                              len(inner_body), len(inner_body), len(b"inner.bin"), 0)
    outer = member("outer.bin", b"prefix" + inner_local + b"inner.bin" + inner_body + b"suffix")
    inner = member("inner.bin", inner_body)
    inner.offset = 30 + len(b"outer.bin") + len(b"prefix")
    exc = assert_refused(write(tmp_path, build_zip([outer], central=[outer, inner])), dest, "overlap")
    assert "outer.bin" in str(exc) and "inner.bin" in str(exc)


def test_same_local_header_twice_under_one_name_is_refused(tmp_path: Path, dest: Path) -> None:
    shared = member("a.bin", os.urandom(100))
    twin = member("a.bin", shared.data)
    assert_refused(write(tmp_path, build_zip([shared], central=[shared, twin])), dest, "duplicate-name")


def test_data_past_central_directory_is_refused(tmp_path: Path, dest: Path) -> None:
    m = member("a.bin", b"x" * 100)
    data = bytearray(build_zip([m]))
    cd = data.index(b"PK\x01\x02")
    # Claim a compressed size that runs into the central directory (stored: both sizes).
    struct.pack_into("<II", data, cd + 20, 200, 200)
    path = write(tmp_path, bytes(data))
    assert_refused(path, dest, "past-central-directory")


def test_lying_file_size_is_caught_while_inflating(tmp_path: Path, dest: Path) -> None:
    content = os.urandom(50_000) + b"A" * 50_000
    m = member("lie.bin", content, deflate=True)
    m.file_size = 1000  # both headers understate the output; ratio check sees nothing
    path = write(tmp_path, build_zip([m]))
    assert inspect_zip(path, SMALL)[0].size == 1000
    exc = assert_refused(path, dest, "size-lie")
    assert "1000" in str(exc)


def test_overstated_file_size_is_caught(tmp_path: Path, dest: Path) -> None:
    m = member("short.bin", b"abc" * 100, deflate=True)
    m.file_size = 400
    assert_refused(write(tmp_path, build_zip([m])), dest, "size-lie")


def test_bad_crc_is_refused(tmp_path: Path, dest: Path) -> None:
    m = member("a.bin", b"hello world", deflate=True)
    m.crc ^= 1
    assert_refused(write(tmp_path, build_zip([m])), dest, "bad-crc")


def test_corrupt_deflate_is_refused(tmp_path: Path, dest: Path) -> None:
    m = member("a.bin", b"hello", deflate=True)
    m.data = b"\xff" * len(m.data)
    assert_refused(write(tmp_path, build_zip([m])), dest, "bad-deflate")


def test_stored_size_disagreement_is_refused(tmp_path: Path, dest: Path) -> None:
    m = member("a.bin", b"hello")
    m.file_size = 4
    assert_refused(write(tmp_path, build_zip([m])), dest, "size-mismatch")


def test_encrypted_entry_is_refused(tmp_path: Path, dest: Path) -> None:
    m = member("secret.bin", b"\x00" * 12 + b"ciphertext", flags=0x1)
    assert_refused(write(tmp_path, build_zip([m])), dest, "encrypted")


@pytest.mark.parametrize("method", [12, 14, 93, 99])  # bzip2, lzma, zstd, AES
def test_other_compression_methods_are_refused(tmp_path: Path, dest: Path, method: int) -> None:
    m = member("a.bin", b"data", method=method)
    assert_refused(write(tmp_path, build_zip([m])), dest, "unsupported-compression")


def test_local_header_name_mismatch_is_refused(tmp_path: Path, dest: Path) -> None:
    m = member("innocent.txt", b"x", local_name=b"../../x.txt")
    assert_refused(write(tmp_path, build_zip([m])), dest, "header-mismatch")


def test_not_a_zip_is_refused(tmp_path: Path, dest: Path) -> None:
    path = write(tmp_path, b"<html>captive portal</html>")
    assert_refused(path, dest, "bad-zip")


def test_refusal_midway_cleans_up_written_files(tmp_path: Path, dest: Path) -> None:
    good = [member(f"dir{i}/f{i}.bin", os.urandom(5000)) for i in range(3)]
    bad = member("dir9/z.bin", b"q" * 5000, deflate=True)
    bad.crc ^= 0xFFFF
    assert_refused(write(tmp_path, build_zip(good + [bad])), dest, "bad-crc")


def test_callback_failure_cleans_up(tmp_path: Path, dest: Path) -> None:
    path = write(tmp_path, build_zip([member("a.bin", b"x"), member("b.bin", b"y")]))

    def boom(_: ExtractedFile) -> None:
        raise RuntimeError("caller failed")

    with pytest.raises(RuntimeError):
        extract_zip(path, dest, "out", SMALL, on_file=boom)
    assert list(dest.iterdir()) == []


def test_default_limits_are_sane() -> None:
    assert DEFAULT_LIMITS.max_ratio == 100
    assert DEFAULT_LIMITS.max_entries >= 1000
