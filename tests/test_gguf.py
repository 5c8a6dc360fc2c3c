"""store.gguf: the bounded GGUF header parser.

Valid files come from the ``gguf`` package's GGUFWriter (via ``ggufgen``) and are
cross-checked against its GGUFReader. The malformed corpus is every structural
boundary of a small valid file (taken from GGUFReader's own field layout, so the
parser under test does not choose its own cut points), plus hand-built headers with
absurd counts and lengths. Each must be refused with one GGUFError line naming the
file, and the giant-length cases within a small memory peak.

No test here measures time (a loaded machine makes any bound flaky):
``bench/gguf_header.py`` times refusing this corpus and parsing a big vocabulary,
as ratios against valid headers parsed in the same run (docs/performance.md).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import struct
import tempfile
import tracemalloc
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFEndian, GGUFValueType, GGUFWriter

import modelfs_store.gguf as sg
from modelfs_store.errors import FormatError, GGUFError
from modelfs_store.gguf import (
    ArraySummary,
    GGUFInfo,
    looks_like_gguf,
    parse_gguf,
    parse_gguf_bytes,
    parse_gguf_file,
)

try:
    import ggufgen
except ImportError:  # tests/ collected as a package
    from tests import ggufgen  # type: ignore[no-redef]

write_model = ggufgen.write_model
write_mmproj = ggufgen.write_mmproj

GIANT_PEAK_BYTES = 16 * 1024 * 1024


# --- valid files -----------------------------------------------------------------


def _write_rich(path: Path) -> Path:
    """Every value type, nested arrays, a custom alignment, three tensor types."""
    w = GGUFWriter(path, "llama")
    w.add_custom_alignment(64)
    w.add_name("rich")
    w.add_file_type(7)
    w.add_uint32("llama.context_length", 2048)
    w.add_key_value("t.u8", 200, GGUFValueType.UINT8)
    w.add_key_value("t.i8", -100, GGUFValueType.INT8)
    w.add_key_value("t.u16", 60000, GGUFValueType.UINT16)
    w.add_key_value("t.i16", -30000, GGUFValueType.INT16)
    w.add_key_value("t.u32", 4_000_000_000, GGUFValueType.UINT32)
    w.add_key_value("t.i32", -2_000_000_000, GGUFValueType.INT32)
    w.add_key_value("t.f32", 1.5, GGUFValueType.FLOAT32)
    w.add_key_value("t.bool", True, GGUFValueType.BOOL)
    w.add_key_value("t.str", "héllo", GGUFValueType.STRING)
    w.add_key_value("t.u64", 2**64 - 1, GGUFValueType.UINT64)
    w.add_key_value("t.i64", -(2**63), GGUFValueType.INT64)
    w.add_key_value("t.f64", -2.25, GGUFValueType.FLOAT64)
    w.add_key_value("t.arr_u8", [1, 2, 3], GGUFValueType.ARRAY, sub_type=GGUFValueType.UINT8)
    w.add_key_value("t.arr_str", ["a", "bc"], GGUFValueType.ARRAY)
    w.add_key_value("t.arr_bool", [True, False], GGUFValueType.ARRAY)
    w.add_key_value("t.nested", [[1, 2], [3]], GGUFValueType.ARRAY)
    w.add_tensor("norm.weight", np.arange(64, dtype=np.float32))
    w.add_tensor("proj.weight", np.ones((4, 64), dtype=np.float16))
    w.add_tensor("q8.weight", np.zeros((2, 34), dtype=np.uint8), raw_dtype=GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@functools.cache
def _rich_bytes() -> bytes:
    with tempfile.TemporaryDirectory() as d:
        return _write_rich(Path(d) / "rich.gguf").read_bytes()


def test_model_header(tmp_path: Path) -> None:
    path = write_model(tmp_path / "m.gguf", arch="qwen2", name="tiny-q", file_type=15, context_length=32768)
    info = parse_gguf(path)
    assert isinstance(info, GGUFInfo)
    assert (info.version, info.architecture, info.name) == (3, "qwen2", "tiny-q")
    assert (info.file_type, info.quantization, info.context_length) == (15, "Q4_K_M", 32768)
    assert info.is_mmproj is False
    reader = gguf.GGUFReader(path)
    assert info.tensor_count == len(reader.tensors) == 2
    assert info.kv_count == len(info.metadata)
    assert info.file_size == path.stat().st_size
    assert info.data_offset + info.data_size == info.file_size


def test_mmproj_detected(tmp_path: Path) -> None:
    info = parse_gguf(write_mmproj(tmp_path / "mmproj-tiny-f16.gguf"))
    assert info.is_mmproj is True
    assert (info.architecture, info.quantization, info.context_length) == ("clip", "F16", None)
    assert info.metadata["clip.has_vision_encoder"] is True
    assert info.metadata["clip.vision.image_mean"] == [0.5, 0.5, 0.5]


def test_mmproj_detected_by_clip_keys_alone(tmp_path: Path) -> None:
    extra = {"clip.has_vision_encoder": (True, GGUFValueType.BOOL)}
    assert parse_gguf(write_model(tmp_path / "m.gguf", extra_kv=extra)).is_mmproj is True
    assert parse_gguf(write_model(tmp_path / "n.gguf")).is_mmproj is False


@pytest.mark.parametrize(
    ("file_type", "label"),
    [(0, "F32"), (1, "F16"), (2, "Q4_0"), (7, "Q8_0"), (10, "Q2_K"), (15, "Q4_K_M"),
     (18, "Q6_K"), (30, "IQ4_XS"), (32, "BF16"), (37, "TQ2_0"), (1024 | 17, "Q5_K_M"),
     (999, "ftype999")],
    ids=lambda v: str(v),
)
def test_quantization_label(tmp_path: Path, file_type: int, label: str) -> None:
    info = parse_gguf(write_model(tmp_path / "m.gguf", file_type=file_type))
    assert (info.file_type, info.quantization) == (file_type, label)


def test_quantization_guessed_from_tensors_without_file_type(tmp_path: Path) -> None:
    info = parse_gguf(write_model(tmp_path / "m.gguf", file_type=None, context_length=None))
    assert (info.file_type, info.quantization, info.context_length) == (None, "F32", None)


@pytest.mark.parametrize("alignment", [None, 1, 64, 4096])
def test_data_offset_matches_gguf_reader(tmp_path: Path, alignment: int | None) -> None:
    path = write_model(tmp_path / "m.gguf", alignment=alignment, vocab_size=100)
    info = parse_gguf(path)
    reader = gguf.GGUFReader(path)
    assert (info.alignment, info.data_offset) == (reader.alignment, reader.data_offset)
    for mine, theirs in zip(info.tensors, reader.tensors, strict=True):
        assert mine.name == theirs.name
        assert info.data_offset + mine.offset == theirs.data_offset
        assert list(mine.shape) == [int(d) for d in theirs.shape]
        assert mine.nbytes == theirs.n_bytes


def test_every_value_type_and_nested_arrays() -> None:
    info = parse_gguf_bytes(_rich_bytes(), name="rich.gguf")
    md = info.metadata
    assert (md["t.u8"], md["t.i8"], md["t.u16"], md["t.i16"]) == (200, -100, 60000, -30000)
    assert (md["t.u32"], md["t.i32"]) == (4_000_000_000, -2_000_000_000)
    assert (md["t.u64"], md["t.i64"]) == (2**64 - 1, -(2**63))
    assert (md["t.f32"], md["t.f64"], md["t.bool"], md["t.str"]) == (1.5, -2.25, True, "héllo")
    assert md["t.arr_u8"] == [1, 2, 3]
    assert md["t.arr_str"] == ["a", "bc"]
    assert md["t.arr_bool"] == [True, False]
    assert md["t.nested"] == [[1, 2], [3]]
    assert (info.quantization, info.context_length, info.alignment) == ("Q8_0", 2048, 64)
    assert [t.type_name for t in info.tensors] == ["F32", "F16", "Q8_0"]
    with tempfile.NamedTemporaryFile(suffix=".gguf") as f:
        f.write(_rich_bytes())
        f.flush()
        assert info.data_offset == gguf.GGUFReader(f.name).data_offset


def test_long_arrays_are_summarised(tmp_path: Path) -> None:
    info = parse_gguf(write_model(tmp_path / "m.gguf", vocab_size=1000))
    assert info.metadata["tokenizer.ggml.tokens"] == ArraySummary("STRING", 1000)
    assert info.metadata["tokenizer.ggml.scores"] == ArraySummary("FLOAT32", 1000)
    assert info.metadata["tokenizer.ggml.token_type"] == ArraySummary("INT32", 1000)


def test_big_vocabulary_is_summarised_in_little_memory(tmp_path: Path) -> None:
    """Its parse time is measured by bench/gguf_header.py, not asserted here."""
    path = write_model(tmp_path / "m.gguf", vocab_size=128_256)  # llama3's vocabulary
    info = parse_gguf(path)
    assert info.metadata["tokenizer.ggml.tokens"] == ArraySummary("STRING", 128_256)
    tracemalloc.start()
    try:
        parse_gguf(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < GIANT_PEAK_BYTES


def test_bytes_stream_and_path_agree(tmp_path: Path) -> None:
    path = write_model(tmp_path / "m.gguf")
    data = path.read_bytes()
    by_path = parse_gguf(path)
    assert parse_gguf_bytes(data, name="m.gguf") == by_path
    assert parse_gguf_file(io.BytesIO(data), name="m.gguf") == by_path


def test_header_prefix_parses_without_data_check(tmp_path: Path) -> None:
    data = write_model(tmp_path / "m.gguf").read_bytes()
    whole = parse_gguf_bytes(data)
    prefix = parse_gguf_bytes(data[: whole.data_offset], check_data=False)
    assert (prefix.tensor_count, prefix.data_offset, prefix.name) == (2, whole.data_offset, "tiny")
    with pytest.raises(GGUFError, match="tensor data ends"):
        parse_gguf_bytes(data[: whole.data_offset])


class _Unseekable(io.RawIOBase):
    def __init__(self, data: bytes) -> None:
        self._inner = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray) -> int:  # type: ignore[override]
        chunk = self._inner.read(min(len(b), 1000))  # short reads on purpose
        b[: len(chunk)] = chunk
        return len(chunk)


def test_unseekable_stream_with_short_reads(tmp_path: Path) -> None:
    data = write_model(tmp_path / "m.gguf", vocab_size=500).read_bytes()
    info = parse_gguf_file(_Unseekable(data), name="pipe")
    assert info.file_size is None
    assert info == dataclasses.replace(parse_gguf_bytes(data, name="pipe"), file_size=None)


def test_version_2_accepted() -> None:
    data = bytearray(_rich_bytes())
    data[4:8] = struct.pack("<I", 2)
    assert parse_gguf_bytes(bytes(data)).version == 2


def test_header_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sg, "MAX_HEADER_BYTES", 256)
    with pytest.raises(GGUFError, match="header exceeds the 256-byte limit"):
        parse_gguf_bytes(_rich_bytes(), name="rich.gguf")


def test_looks_like_gguf(tmp_path: Path) -> None:
    assert looks_like_gguf(write_model(tmp_path / "m.gguf"))
    (tmp_path / "e").write_bytes(b"")
    (tmp_path / "g").write_bytes(b"GGUF\x09\x00\x00\x00")
    (tmp_path / "h").write_bytes(b"<html>hello</html>")
    assert not looks_like_gguf(tmp_path / "e")
    assert not looks_like_gguf(tmp_path / "g")
    assert not looks_like_gguf(tmp_path / "h")
    assert not looks_like_gguf(tmp_path / "missing")
    assert not looks_like_gguf(tmp_path)


def test_missing_file_is_a_gguf_error(tmp_path: Path) -> None:
    with pytest.raises(GGUFError, match="missing.gguf: cannot open"):
        parse_gguf(tmp_path / "missing.gguf")
    assert issubclass(GGUFError, FormatError)


# --- ggufgen ---------------------------------------------------------------------


def test_generator_is_deterministic_per_seed(tmp_path: Path) -> None:
    a = write_model(tmp_path / "a.gguf", seed=1).read_bytes()
    b = write_model(tmp_path / "b.gguf", seed=1).read_bytes()
    c = write_model(tmp_path / "c.gguf", seed=2).read_bytes()
    assert a == b
    assert a != c and len(a) == len(c)


def test_generator_splits_large_tensors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ggufgen, "CHUNK_BYTES", 64 * 1024)
    path = write_model(tmp_path / "m.gguf", tensor_bytes=200 * 1024 + 1)
    info = parse_gguf(path)
    assert info.tensor_count == 1 + 4  # the norm, then 64+64+64+8.25 KiB
    assert info.data_size is not None and info.data_size >= 200 * 1024 + 1
    assert [t.n_bytes for t in gguf.GGUFReader(path).tensors] == [t.nbytes for t in info.tensors]


# --- malformed corpus ------------------------------------------------------------

_PART_NAMES_KV = ("keylen", "key", "type")
_PART_NAMES_TI = ("namelen", "name", "n_dims", "dims", "type", "offset")


def _truncation_points() -> list[tuple[str, int]]:
    """(label, length) for every structural boundary of the rich file and the
    middle of every multi-byte part, from GGUFReader's field layout."""
    data = _rich_bytes()
    with tempfile.NamedTemporaryFile(suffix=".gguf") as f:
        f.write(data)
        f.flush()
        reader = gguf.GGUFReader(f.name)
        fields = [(fld, "kv") for fld in reader.fields.values()] + [(t.field, "ti") for t in reader.tensors]
        points: dict[int, str] = {0: "empty", 2: "magic-mid", 4: "after-magic"}
        for fld, kind in fields:
            offset = fld.offset
            for i, part in enumerate(fld.parts):
                if fld.name.startswith("GGUF."):
                    what = fld.name[5:]
                elif kind == "kv":
                    what = f"kv-{fld.name}-" + (_PART_NAMES_KV[i] if i < 3 else f"value{i - 3}")
                else:
                    what = f"ti-{fld.name}-{_PART_NAMES_TI[i]}"
                if part.nbytes >= 2:
                    points.setdefault(offset + part.nbytes // 2, f"mid-{what}")
                offset += int(part.nbytes)
                points.setdefault(offset, f"after-{what}")
        data_offset = reader.data_offset
        data_end = max(t.data_offset + int(t.n_bytes) for t in reader.tensors)
    points[data_offset] = "header-whole-no-data"
    points[data_offset + 100] = "mid-tensor-data"
    points[data_end - 1] = "last-data-byte-missing"
    return sorted(((label, n) for n, label in points.items() if n < len(data)), key=lambda p: p[1])


def _s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def _hdr(n_tensors: int, n_kv: int, version: int = 3) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)


def _kv(key: str, vtype: int, payload: bytes) -> bytes:
    return _s(key) + struct.pack("<I", vtype) + payload


def _arr(itype: int, count: int) -> bytes:
    return struct.pack("<IQ", itype, count)


def _ti(name: str, dims: tuple[int, ...], ggml_type: int = 0, offset: int = 0) -> bytes:
    return _s(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ggml_type, offset)


_STR, _ARR, _U8, _U32, _U64, _I64, _BOOL = 8, 9, 0, 4, 10, 11, 7
_NAME = _kv("general.name", _STR, _s("x"))
_PAD = b"\0" * 64


def _nested(levels: int) -> bytes:
    body = _arr(_ARR, 1) * (levels - 1) + _arr(_U8, 1) + b"\x07"
    return _hdr(0, 1) + _kv("deep", _ARR, body)


def _big_endian_file() -> bytes:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "be.gguf"
        w = GGUFWriter(path, "llama", endianess=GGUFEndian.BIG)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path.read_bytes()


def _tensor_file(*infos: bytes, kvs: bytes = b"", n_kv: int = 0, data: bytes = _PAD) -> bytes:
    header = _hdr(len(infos), n_kv) + kvs + b"".join(infos)
    return header + b"\0" * (-len(header) % 32) + data


def _one_kv(key: str, vtype: int, payload: bytes, tail: bytes = b"") -> bytes:
    return _hdr(0, 1) + _kv(key, vtype, payload) + tail


def _u64(n: int) -> bytes:
    return struct.pack("<Q", n)


def _align(value: int, vtype: int = _U32) -> bytes:
    fmt = "<I" if vtype == _U32 else "<q"
    return _one_kv("general.alignment", vtype, struct.pack(fmt, value))


_LFS = b"version https://git-lfs.github.com/spec/v1\nsize 1\n"
_DEEP_IN_LONG = _arr(_ARR, 100) + (_arr(_ARR, 1) * 3 + _arr(_U8, 0)) * 100
_GIANT_IN_LONG = _arr(_STR, 100) + _u64(2**60)
_FAR_STRING = _arr(_STR, 100) + _s("a") * 99 + _u64(5000)

# (id, file bytes, expected fragment of the reason). Ids with "giant" also run
# under tracemalloc.
_HANDMADE: list[tuple[str, bytes, str]] = [
    ("empty-file", b"", "empty file"),
    ("three-bytes", b"GGU", "truncated"),
    ("magic-zeros", b"\0" * 64, "not a GGUF file"),
    ("magic-html-page", b"<!DOCTYPE html><html>denied</html>", "HTML page"),
    ("magic-git-lfs-pointer", _LFS, "git-lfs pointer"),
    ("magic-legacy-ggjt", struct.pack("<I", 0x67676A74) + _PAD, "legacy GGML"),
    ("magic-only", b"GGUF", "truncated"),
    ("version-0", _hdr(0, 0, version=0), "unsupported GGUF version 0"),
    ("version-1", _hdr(0, 0, version=1), "GGUF v1"),
    ("version-4", _hdr(0, 0, version=4), "unsupported GGUF version 4"),
    ("version-0xffffffff", _hdr(0, 0, version=0xFFFFFFFF), "unsupported GGUF version"),
    ("big-endian-handmade", b"GGUF" + struct.pack(">IQQ", 3, 0, 0), "big-endian"),
    ("big-endian-gguf-writer", _big_endian_file(), "big-endian"),
    ("giant-tensor-count-2^63", _hdr(2**63, 0), "tensor count 9223372036854775808 exceeds"),
    ("giant-tensor-count-2^64-1", _hdr(2**64 - 1, 0), "exceeds the limit"),
    ("giant-kv-count-2^63", _hdr(0, 2**63), "KV count 9223372036854775808 exceeds"),
    ("kv-count-beyond-file", _hdr(0, 8000) + _NAME, "truncated: "),
    ("tensor-count-beyond-file", _hdr(60000, 0) + _PAD, "truncated: "),
    ("giant-key-length-2^63", _hdr(0, 1) + _u64(2**63) + _PAD, "key length"),
    ("key-length-over-limit", _hdr(0, 1) + _u64(64 * 1024 + 1) + _PAD, "65536-byte limit"),
    ("key-length-beyond-file", _hdr(0, 1) + _u64(1000) + b"general", "truncated"),
    ("giant-string-length-2^63", _one_kv("general.name", _STR, _u64(2**63)), "string length"),
    ("giant-string-length-2^40", _one_kv("general.name", _STR, _u64(2**40)), "string length"),
    ("string-length-over-limit", _one_kv("general.name", _STR, _u64(8 * 2**20 + 1)), "string length"),
    ("string-length-beyond-file", _one_kv("general.name", _STR, _u64(10_000) + b"abc"), "truncated"),
    ("giant-array-length-2^62-u8", _one_kv("a", _ARR, _arr(_U8, 2**62)), "array length"),
    ("giant-array-length-2^40-strings", _one_kv("a", _ARR, _arr(_STR, 2**40)), "array length"),
    ("array-length-over-limit", _one_kv("a", _ARR, _arr(_U32, 2**21 + 1)), "array length"),
    ("giant-array-beyond-file-u64", _one_kv("a", _ARR, _arr(_U64, 10**6), _PAD), "truncated: "),
    ("giant-array-beyond-file-strings", _one_kv("a", _ARR, _arr(_STR, 2 * 10**6), _PAD), "truncated: "),
    ("giant-string-in-long-array", _one_kv("v", _ARR, _GIANT_IN_LONG, _PAD * 13), "string length"),
    ("string-in-long-array-beyond-file", _one_kv("v", _ARR, _FAR_STRING), "truncated"),
    ("unknown-value-type-13", _one_kv("k", 13, _PAD), "unknown value type 13"),
    ("unknown-value-type-0xffffffff", _one_kv("k", 0xFFFFFFFF, _PAD), "unknown value type"),
    ("unknown-array-item-type", _one_kv("k", _ARR, _arr(42, 1), _PAD), "unknown array item type 42"),
    ("nested-arrays-depth-5", _nested(5), "nested deeper than 4"),
    ("nested-arrays-depth-1000", _nested(1000), "nested deeper than 4"),
    ("nested-arrays-depth-5-in-long-array", _one_kv("d", _ARR, _DEEP_IN_LONG), "nested deeper than 4"),
    ("duplicate-key", _hdr(0, 2) + _NAME + _NAME, "duplicate key 'general.name'"),
    ("alignment-zero", _align(0), "not a power of two"),
    ("alignment-three", _align(3), "not a power of two"),
    ("alignment-wrong-type", _align(32, _I64), "expected UINT32"),
    ("n-dims-5", _tensor_file(_ti("t", (1, 1, 1, 1, 1))), "n_dims 5 exceeds"),
    ("n-dims-2^32-1", _hdr(1, 0) + _s("t") + struct.pack("<I", 2**32 - 1) + _PAD, "n_dims 4294967295"),
    ("dim-negative", _tensor_file(_ti("t", (2**63,))), "negative"),
    ("elements-overflow", _tensor_file(_ti("t", (2**40, 2**40))), "2**63-1 elements"),
    ("tensor-type-garbage", _tensor_file(_ti("t", (4,), ggml_type=2**31)), "invalid ggml type"),
    ("tensor-row-not-whole-blocks", _tensor_file(_ti("t", (33,), ggml_type=2)), "Q4_0 blocks"),
    ("tensor-offset-unexpected", _tensor_file(_ti("t", (4,), offset=32)), "offset 32, expected 0"),
    (
        "tensor-offset-misaligned-unknown-type",
        _tensor_file(_ti("a", (64,)), _ti("u", (4,), 500, 256), _ti("b", (4,), 0, 300), data=_PAD * 8),
        "offset 300 is not a multiple of alignment 32",
    ),
    ("tensor-second-offset-overlaps", _tensor_file(_ti("a", (64,)), _ti("b", (64,))), "expected 256"),
    ("duplicate-tensor-name", _tensor_file(_ti("t", (8,)), _ti("t", (8,), offset=32)), "duplicate tensor"),
    ("tensor-name-over-limit", _hdr(1, 0) + _u64(1025) + b"n" * 1025 + _PAD, "tensor name length 1025"),
    ("tensor-data-beyond-eof", _tensor_file(_ti("t", (1024, 1024)), data=b""), "tensor data ends"),
    # Values outside their type's domain are refused, never repaired (decoded with
    # "replace", or read as truthy).
    ("bool-value-2", _one_kv("b", _BOOL, b"\x02", _PAD), "holds 2, which is not a bool"),
    ("bool-value-255", _one_kv("b", _BOOL, b"\xff", _PAD), "holds 255, which is not a bool"),
    ("bool-in-short-array", _one_kv("b", _ARR, _arr(_BOOL, 3) + b"\x00\x01\x07", _PAD), "not a bool"),
    ("bool-in-long-array", _one_kv("b", _ARR, _arr(_BOOL, 100) + b"\x01" * 99 + b"\x05", _PAD), "not a bool"),
    ("key-not-utf8", _hdr(0, 1) + _s(b"general.\xff") + struct.pack("<I", _U8) + b"\x00" + _PAD,
     "key is not valid UTF-8"),
    ("string-not-utf8", _one_kv("general.name", _STR, _s(b"caf\xc3\x28"), _PAD), "string is not valid UTF-8"),
    ("string-utf8-surrogate", _one_kv("general.name", _STR, _s(b"\xed\xa0\x80"), _PAD), "not valid UTF-8"),
    ("string-overlong-utf8", _one_kv("general.name", _STR, _s(b"\xc0\xaf"), _PAD), "not valid UTF-8"),
    ("string-in-long-array-not-utf8", _one_kv("v", _ARR, _arr(_STR, 100) + _s("a") * 99 + _s(b"\x80"), _PAD),
     "string is not valid UTF-8"),
    ("string-in-short-array-not-utf8", _one_kv("v", _ARR, _arr(_STR, 2) + _s("a") + _s(b"\xfe"), _PAD),
     "string is not valid UTF-8"),
    ("tensor-name-not-utf8", _hdr(1, 0) + _s(b"t\xff") + struct.pack("<IQIQ", 1, 4, 0, 0) + _PAD,
     "tensor name is not valid UTF-8"),
    ("giant-tensor-data-beyond-eof", _tensor_file(_ti("t", (2**30, 2**30))), "tensor data ends"),
]

_CORPUS: list[tuple[str, bytes, str]] = [
    (f"trunc-{n:04d}-{label}", _rich_bytes()[:n], "empty file" if n == 0 else "truncated")
    for label, n in _truncation_points()
] + _HANDMADE


def test_corpus_is_large_enough() -> None:
    assert len(_HANDMADE) >= 30
    assert len(_CORPUS) >= 100


def _refuse(path: Path) -> GGUFError:
    try:
        parse_gguf(path)
    except GGUFError as exc:
        return exc
    pytest.fail(f"{path.name} was accepted")


@pytest.mark.parametrize(("case_id", "data", "reason"), _CORPUS, ids=[c[0] for c in _CORPUS])
def test_malformed_is_refused_in_one_line(
    tmp_path: Path, case_id: str, data: bytes, reason: str
) -> None:
    """How fast is measured by bench/gguf_header.py, not asserted here."""
    path = tmp_path / f"{case_id}.gguf"
    path.write_bytes(data)
    exc = _refuse(path)
    message = str(exc)
    assert "\n" not in message and "\r" not in message
    assert message.startswith(f"{path.name}: "), message
    assert reason in message, message
    assert exc.fields["path"] == path.name
    with pytest.raises(GGUFError):
        parse_gguf_bytes(data, name=path.name)


_GIANT = [c for c in _HANDMADE if "giant" in c[0]]


@pytest.mark.parametrize(("case_id", "data", "reason"), _GIANT, ids=[c[0] for c in _GIANT])
def test_giant_lengths_allocate_little(tmp_path: Path, case_id: str, data: bytes, reason: str) -> None:
    path = tmp_path / f"{case_id}.gguf"
    path.write_bytes(data)
    tracemalloc.start()
    try:
        with pytest.raises(GGUFError, match="."):
            parse_gguf(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < GIANT_PEAK_BYTES, f"{case_id}: peak {peak} bytes"


def test_import_of_every_malformed_file_stores_nothing(tmp_path: Path) -> None:
    """At the store: a refused import leaves no blob, temp or row."""
    from modelfs_store.core import Store

    store = Store.open(tmp_path / "store")
    for case_id, data, _ in _CORPUS:
        path = tmp_path / f"{case_id}.gguf"
        path.write_bytes(data)
        with pytest.raises(GGUFError):
            store.import_model("m", path)
    assert store.blobs.iter_blobs() == []
    assert list(store.layout.tmp.iterdir()) == []
    assert store.catalog.list_models() == []
    assert store.catalog.audit_log() == []
