"""Bounded GGUF header parser: what a weights or mmproj file claims to be.

This module owns reading a GGUF header (magic, version, counts, every key/value
pair, every tensor info) and turning it into a small :class:`GGUFInfo`: the
architecture, name, quantization label, context length, mmproj-ness, whether a chat
template is present, and where the tensor data starts. The catalog's metadata card
and the import/pull gate use it.

It must never trust a number from the file. Every declared count or length is
checked against a module limit *and* against the bytes that remain before any
allocation or loop, so a hostile or truncated file is refused quickly with one
:class:`~store.errors.GGUFError` line naming the file, the place and the offset,
never with a hang, a crash, a multi-GB allocation or unbounded recursion. It never
reads tensor data, never writes, and never imports the third-party ``gguf`` package
(tests use that package to write files; the store does not depend on it).

Layout (little-endian only; GGUF v2 and v3 share it)::

    magic "GGUF" | u32 version | u64 n_tensors | u64 n_kv
    n_kv    x  (string key, u32 value_type, value)
    n_tensors x (string name, u32 n_dims, u64 dims[n_dims], u32 ggml_type, u64 offset)
    padding to general.alignment (default 32) | tensor data

where ``string`` is ``u64 length`` + UTF-8 bytes and an ``ARRAY`` value is
``u32 item_type`` + ``u64 count`` + items (arrays may nest, up to
:data:`MAX_ARRAY_DEPTH` levels here).

Tensor offsets are checked the way llama.cpp's ``gguf_init_from_file`` checks them:
each tensor of a known ggml type must start exactly where the previous one (padded
to the alignment) ended, and a row must be a whole number of quantization blocks.
Tensor types newer than this table are accepted; offsets after one are then only
checked for alignment, and ``GGUFInfo.data_size`` is ``None``.
"""

from __future__ import annotations

import io
import logging
import os
import struct
from collections import Counter
from dataclasses import dataclass, field
from typing import IO, Final

from .errors import GGUFError

__all__ = [
    "ArraySummary",
    "CHAT_TEMPLATE_KEY",
    "GGUFInfo",
    "GGUFTensor",
    "MAX_ARRAY_DEPTH",
    "MAX_ARRAY_LEN",
    "MAX_HEADER_BYTES",
    "MAX_KEPT_ARRAY_LEN",
    "MAX_KEPT_ITEMS_PER_KV",
    "MAX_KEY_BYTES",
    "MAX_KV_COUNT",
    "MAX_N_DIMS",
    "MAX_STRING_BYTES",
    "MAX_TENSOR_COUNT",
    "MAX_TENSOR_NAME_BYTES",
    "ftype_label",
    "looks_like_gguf",
    "parse_gguf",
    "parse_gguf_bytes",
    "parse_gguf_file",
]

logger = logging.getLogger(__name__)

# --- Hard limits -----------------------------------------------------------------
# Real models sit far below each of these; a file beyond one is refused, not parsed.

#: Tensor infos. Large MoE checkpoints carry about 1-3k tensors.
MAX_TENSOR_COUNT: Final = 65_536
#: Key/value pairs. Real files carry 20-100.
MAX_KV_COUNT: Final = 8_192
#: A metadata key. Real keys are under 100 bytes.
MAX_KEY_BYTES: Final = 64 * 1024
#: A string value. Chat templates are tens of KiB; an embedded
#: ``tokenizer.huggingface.json`` can be a few MiB.
MAX_STRING_BYTES: Final = 8 * 1024 * 1024
#: A tensor name (ggml itself caps names at 63 bytes).
MAX_TENSOR_NAME_BYTES: Final = 1024
#: Items in one array. The largest vocabularies are ~262k tokens.
MAX_ARRAY_LEN: Final = 1 << 21
#: Levels of array nesting (an array of arrays is 2). llama.cpp reads only 1.
MAX_ARRAY_DEPTH: Final = 4
#: Dimensions of a tensor (GGML_MAX_DIMS).
MAX_N_DIMS: Final = 4
#: Everything before the tensor data. A 262k-token vocabulary with scores, types
#: and merges is ~10 MiB.
MAX_HEADER_BYTES: Final = 64 * 1024 * 1024
#: Arrays longer than this are kept as an :class:`ArraySummary` (type and length):
#: the store never needs a tokenizer vocabulary in memory.
MAX_KEPT_ARRAY_LEN: Final = 64
#: Items kept per key across nested arrays, so nesting cannot multiply memory.
MAX_KEPT_ITEMS_PER_KV: Final = 256

GGUF_MAGIC: Final = b"GGUF"
#: The key of the default chat template (named variants add ``.<name>``).
CHAT_TEMPLATE_KEY: Final = "tokenizer.chat_template"
SUPPORTED_VERSIONS: Final = (2, 3)
DEFAULT_ALIGNMENT: Final = 32

_CHUNK = 1 << 20  # read granularity of the bounded reader
_INT64_MAX = (1 << 63) - 1

# GGUF metadata value types.
_UINT8, _INT8, _UINT16, _INT16, _UINT32, _INT32, _FLOAT32, _BOOL = range(8)
_STRING, _ARRAY, _UINT64, _INT64, _FLOAT64 = range(8, 13)

_TYPE_NAMES: Final = (
    "UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "FLOAT32", "BOOL",
    "STRING", "ARRAY", "UINT64", "INT64", "FLOAT64",
)
_SCALARS: Final[dict[int, struct.Struct]] = {
    _UINT8: struct.Struct("<B"),
    _INT8: struct.Struct("<b"),
    _UINT16: struct.Struct("<H"),
    _INT16: struct.Struct("<h"),
    _UINT32: struct.Struct("<I"),
    _INT32: struct.Struct("<i"),
    _FLOAT32: struct.Struct("<f"),
    _BOOL: struct.Struct("<B"),
    _UINT64: struct.Struct("<Q"),
    _INT64: struct.Struct("<q"),
    _FLOAT64: struct.Struct("<d"),
}
# Fewest bytes one item of each type can occupy: bounds a declared count by the
# bytes that remain before anything is looped over.
_MIN_ITEM_BYTES: Final[dict[int, int]] = {
    **{t: s.size for t, s in _SCALARS.items()},
    _STRING: 8,
    _ARRAY: 12,
}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

# ggml tensor types: id -> (name, elements per block, bytes per block).
# From ggml.h / gguf-py GGML_QUANT_SIZES; gaps are types removed from ggml.
_GGML_TYPES: Final[dict[int, tuple[str, int, int]]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
    40: ("NVFP4", 64, 36),
    41: ("Q1_0", 128, 18),
}
# A u32 type id beyond this is garbage, not a ggml type from the future.
_MAX_GGML_TYPE_ID = 1023

# llama.cpp's llama_ftype (general.file_type) -> label, as in quantized filenames.
_FTYPE_LABELS: Final[dict[int, str]] = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    4: "Q4_1_SOME_F16",
    7: "Q8_0",
    8: "Q5_0",
    9: "Q5_1",
    10: "Q2_K",
    11: "Q3_K_S",
    12: "Q3_K_M",
    13: "Q3_K_L",
    14: "Q4_K_S",
    15: "Q4_K_M",
    16: "Q5_K_S",
    17: "Q5_K_M",
    18: "Q6_K",
    19: "IQ2_XXS",
    20: "IQ2_XS",
    21: "Q2_K_S",
    22: "IQ3_XS",
    23: "IQ3_XXS",
    24: "IQ1_S",
    25: "IQ4_NL",
    26: "IQ3_S",
    27: "IQ3_M",
    28: "IQ2_S",
    29: "IQ2_M",
    30: "IQ4_XS",
    31: "IQ1_M",
    32: "BF16",
    33: "Q4_0_4_4",
    34: "Q4_0_4_8",
    35: "Q4_0_8_8",
    36: "TQ1_0",
    37: "TQ2_0",
    38: "MXFP4_MOE",
    39: "NVFP4",
    40: "Q1_0",
}
_FTYPE_GUESSED = 1024  # llama.cpp ORs this in when it inferred the type

_MMPROJ_KEYS: Final = (
    "clip.has_vision_encoder",
    "clip.has_audio_encoder",
    "clip.projector_type",
    "clip.has_llava_projector",
)


@dataclass(frozen=True, slots=True)
class ArraySummary:
    """A metadata array too long to keep (e.g. a vocabulary): its type and length."""

    item_type: str
    length: int


@dataclass(frozen=True, slots=True)
class GGUFTensor:
    """One tensor info. ``shape`` is in file order (ggml ``ne``: innermost first)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int  # relative to GGUFInfo.data_offset

    @property
    def type_name(self) -> str:
        known = _GGML_TYPES.get(self.ggml_type)
        return known[0] if known else f"type{self.ggml_type}"

    @property
    def nbytes(self) -> int | None:
        """Bytes of data, or ``None`` for a ggml type this module does not know."""
        known = _GGML_TYPES.get(self.ggml_type)
        if known is None:
            return None
        _, block, block_bytes = known
        n = (self.shape[0] if self.shape else 1) // block * block_bytes
        for d in self.shape[1:]:
            n *= d
        return n


@dataclass(frozen=True, slots=True)
class GGUFInfo:
    """What a GGUF header says. Built only by the parse functions below."""

    version: int
    tensor_count: int
    kv_count: int
    #: Every key. Scalars and strings as Python values, short arrays as lists,
    #: long arrays as :class:`ArraySummary`.
    metadata: dict[str, object] = field(repr=False)
    architecture: str | None
    name: str | None
    file_type: int | None
    #: ``general.file_type`` as a label (``Q4_K_M``, ``F16``...); without it, the
    #: ggml type most matrices use (``Q4_K``...); ``None`` when neither is known.
    quantization: str | None
    context_length: int | None
    is_mmproj: bool
    alignment: int
    #: Absolute offset of the tensor data (header end padded to ``alignment``).
    data_offset: int
    #: Bytes from ``data_offset`` to the end of the last tensor, or ``None`` when
    #: a tensor has a ggml type this module does not know.
    data_size: int | None
    file_size: int | None
    tensors: tuple[GGUFTensor, ...] = field(repr=False)

    @property
    def has_chat_template(self) -> bool:
        """Whether the file carries a default chat template (a non-empty string under
        ``tokenizer.chat_template``), which runtimes use to format a conversation."""
        template = self.metadata.get(CHAT_TEMPLATE_KEY)
        return isinstance(template, str) and template != ""


# --- The bounded reader ----------------------------------------------------------


def _show(text: str) -> str:
    """A key or tensor name for an error line: quoted, escaped, short."""
    shown = repr(text)
    return shown if len(shown) <= 80 else shown[:77] + "..."


class _Reader:
    """Buffered little-endian reads that refuse to pass the end of the file or
    :data:`MAX_HEADER_BYTES`. ``where`` names the structure being read, for errors."""

    __slots__ = ("_f", "_name", "_buf", "_pos", "_base", "_size", "_end", "where")

    def __init__(self, f: IO[bytes], name: str, size: int | None) -> None:
        self._f = f
        self._name = name
        self._buf = b""
        self._pos = 0  # read position inside _buf
        self._base = 0  # file offset of _buf[0]
        self._size = size
        self._end = MAX_HEADER_BYTES if size is None else min(size, MAX_HEADER_BYTES)
        self.where = "magic"

    @property
    def offset(self) -> int:
        return self._base + self._pos

    @property
    def size(self) -> int | None:
        return self._size

    def remaining(self) -> int:
        """Bytes the header may still use: to EOF or to the header limit."""
        return self._end - self.offset

    def error(self, reason: str, offset: int | None = None, *, locate: bool = True) -> GGUFError:
        at = self.offset if offset is None else offset
        place = f" in {self.where} at offset {at}" if locate else ""
        return GGUFError(
            f"{self._name}: {reason}{place}",
            path=self._name,
            offset=at,
            where=self.where,
        )

    def short(self, need: int) -> GGUFError:
        """The error for ``need`` bytes that are not there."""
        left = self.remaining()
        if self._size is not None and self.offset + need > self._size:
            return self.error(f"truncated: needs {need} bytes, {max(left, 0)} remain")
        return self.error(
            f"header exceeds the {MAX_HEADER_BYTES}-byte limit (needs {need} more bytes)"
        )

    def check_fits(self, count: int, item_bytes: int, what: str) -> None:
        """Refuse a declared count whose smallest encoding cannot fit."""
        need = count * item_bytes
        if need <= self.remaining():
            return
        left = max(self.remaining(), 0)
        if self._size is not None and self.offset + need > self._size:
            raise self.error(f"truncated: {what} needs at least {need} bytes, {left} remain")
        raise self.error(
            f"header exceeds the {MAX_HEADER_BYTES}-byte limit: {what} needs at least {need} bytes"
        )

    def _fill(self, n: int) -> None:
        """Make ``n`` bytes available at ``_pos``, or raise."""
        have = len(self._buf) - self._pos
        if have >= n:
            return
        if n > self.remaining():
            raise self.short(n)
        self._base += self._pos
        tail = self._buf[self._pos :]
        self._pos = 0
        want = min(max(n, _CHUNK), self._end - self._base) - len(tail)
        parts = [tail]
        got = len(tail)
        while got < n:
            data = self._f.read(want - (got - len(tail)))
            if not data:
                self._buf = b"".join(parts)
                raise self.error(f"truncated: file ended, needs {n} bytes, {got} remain")
            parts.append(data)
            got += len(data)
        self._buf = b"".join(parts)

    def take(self, n: int) -> bytes:
        self._fill(n)
        start = self._pos
        self._pos = start + n
        return self._buf[start : start + n]

    def unpack(self, st: struct.Struct) -> int:
        self._fill(st.size)
        (value,) = st.unpack_from(self._buf, self._pos)
        self._pos += st.size
        return value  # type: ignore[no-any-return]

    def unpack_many(self, st: struct.Struct) -> tuple[int, ...]:
        self._fill(st.size)
        values = st.unpack_from(self._buf, self._pos)
        self._pos += st.size
        return values

    def skip(self, n: int) -> None:
        have = len(self._buf) - self._pos
        if n <= have:
            self._pos += n
            return
        if n > self.remaining():
            raise self.short(n)
        target = self.offset + n
        file_pos = self._base + len(self._buf)
        self._buf, self._pos, self._base = b"", 0, target
        if self._f.seekable():
            self._f.seek(target - file_pos, io.SEEK_CUR)
            return
        left = target - file_pos
        while left > 0:
            data = self._f.read(min(left, _CHUNK))
            if not data:
                raise self.error("truncated: file ended while skipping")
            left -= len(data)

    def string(self, limit: int, what: str) -> str:
        n = self.unpack(_U64)
        if n > limit:
            raise self.error(f"{what} length {n} exceeds the {limit}-byte limit", self.offset - 8)
        if n > self.remaining():
            raise self.short(n)
        start = self.offset
        return self.text(self.take(n), what, start)

    def text(self, raw: bytes, what: str, offset: int) -> str:
        """``raw`` decoded as UTF-8, or refused: a name is never repaired."""
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.error(f"{what} is not valid UTF-8 (byte {exc.start})", offset) from None

    def bools(self, count: int, what: str) -> list[bool]:
        """``count`` bool bytes, each 0 or 1 (anything else is outside the type)."""
        start = self.offset
        raw = self.take(count)
        if raw.translate(None, b"\x00\x01"):
            bad = next(i for i, b in enumerate(raw) if b > 1)
            raise self.error(f"{what} holds {raw[bad]}, which is not a bool (0 or 1)", start + bad)
        return [b == 1 for b in raw]

    def skip_strings(self, count: int) -> None:
        """Skip ``count`` strings without decoding them (a vocabulary, say)."""
        buf, pos = self._buf, self._pos
        for _ in range(count):
            if pos + 8 > len(buf):
                self._pos = pos
                self._fill(8)
                buf, pos = self._buf, self._pos
            (n,) = _U64.unpack_from(buf, pos)
            if n > MAX_STRING_BYTES:
                self._pos = pos
                raise self.error(f"string length {n} exceeds the {MAX_STRING_BYTES}-byte limit")
            pos += 8 + n
            if pos > len(buf):  # runs past the buffer: read it whole (at most MAX_STRING_BYTES)
                self._pos = pos - n
                if n > self.remaining():
                    raise self.short(n)
                start = self.offset
                if not _is_utf8(self.take(n), 0, n):
                    raise self.error("string is not valid UTF-8", start)
                buf, pos = self._buf, self._pos
            elif not _is_utf8(buf, pos - n, pos):
                self._pos = pos - n
                raise self.error("string is not valid UTF-8")
        self._pos = pos


# --- Values ----------------------------------------------------------------------


def _is_utf8(buf: bytes, start: int, end: int) -> bool:
    try:
        buf[start:end].decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _value_type(r: _Reader, what: str) -> int:
    vtype = r.unpack(_U32)
    if vtype >= len(_TYPE_NAMES):
        raise r.error(f"unknown {what} {vtype}", r.offset - 4)
    return vtype


def _array_header(r: _Reader, level: int) -> tuple[int, int]:
    """Read an array's item type and count (``level`` 1 = not nested) and check both."""
    start = r.offset
    itype = _value_type(r, "array item type")
    if itype == _ARRAY and level + 1 > MAX_ARRAY_DEPTH:
        raise r.error(f"arrays nested deeper than {MAX_ARRAY_DEPTH} levels", start)
    count = r.unpack(_U64)
    if count > MAX_ARRAY_LEN:
        raise r.error(f"array length {count} exceeds the limit {MAX_ARRAY_LEN}", start)
    r.check_fits(count, _MIN_ITEM_BYTES[itype], f"array of {count} {_TYPE_NAMES[itype]}")
    return itype, count


def _read_value(r: _Reader, vtype: int, level: int, budget: list[int]) -> object:
    """One value. ``level`` counts enclosing arrays; ``budget`` is items left to keep."""
    if vtype == _BOOL:
        return r.bools(1, "bool value")[0]
    st = _SCALARS.get(vtype)
    if st is not None:
        return r.unpack(st)
    if vtype == _STRING:
        return r.string(MAX_STRING_BYTES, "string")
    # vtype == _ARRAY: recursion below is bounded by MAX_ARRAY_DEPTH (_array_header).
    itype, count = _array_header(r, level + 1)
    if count > MAX_KEPT_ARRAY_LEN or count > budget[0]:
        _skip_items(r, itype, count, level + 1)
        return ArraySummary(_TYPE_NAMES[itype], count)
    budget[0] -= count
    if itype == _BOOL:
        return list(r.bools(count, "bool array"))
    st = _SCALARS.get(itype)
    if st is not None and count:
        return list(r.unpack_many(struct.Struct(f"<{count}{st.format[-1]}")))
    return [_read_value(r, itype, level + 1, budget) for _ in range(count)]


def _skip_items(r: _Reader, itype: int, count: int, level: int) -> None:
    """Skip ``count`` items of an array at nesting ``level`` (depth-bounded)."""
    st = _SCALARS.get(itype)
    if itype == _BOOL:
        r.bools(count, "bool array")  # read, not skipped: every byte must be 0 or 1
    elif st is not None:
        r.skip(count * st.size)
    elif itype == _STRING:
        r.skip_strings(count)
    else:
        for _ in range(count):
            inner_type, inner_count = _array_header(r, level + 1)
            _skip_items(r, inner_type, inner_count, level + 1)


# --- Header ----------------------------------------------------------------------


def _read_preamble(r: _Reader) -> tuple[int, int, int]:
    """Magic, version and both counts."""
    if r.size == 0:
        raise r.error("empty file", locate=False)
    head = r.take(4)
    if head != GGUF_MAGIC:
        raise r.error(f"not a GGUF file: magic {head!r}{_magic_hint(head)}", 0, locate=False)
    r.where = "version"
    version = r.unpack(_U32)
    if version not in SUPPORTED_VERSIONS:
        if version & 0xFFFF == 0 and version >> 24 in SUPPORTED_VERSIONS:
            reason = f"big-endian GGUF is not supported (version field reads {version:#010x})"
        elif version == 1:
            reason = "GGUF v1 is not supported"
        else:
            reason = f"unsupported GGUF version {version}"
        raise r.error(reason, 4, locate=False)
    r.where = "tensor count"
    n_tensors = r.unpack(_U64)
    if n_tensors > MAX_TENSOR_COUNT:
        raise r.error(f"tensor count {n_tensors} exceeds the limit {MAX_TENSOR_COUNT}", 8)
    r.where = "KV count"
    n_kv = r.unpack(_U64)
    if n_kv > MAX_KV_COUNT:
        raise r.error(f"KV count {n_kv} exceeds the limit {MAX_KV_COUNT}", 16)
    r.where = "header counts"
    # smallest KV: empty key, a UINT8; smallest tensor info: empty name, 0 dims
    r.check_fits(1, n_kv * 13 + n_tensors * 24, f"{n_kv} KVs and {n_tensors} tensor infos")
    return version, n_tensors, n_kv


def _magic_hint(head: bytes) -> str:
    if head in (b"lmgg", b"fmgg", b"tjgg", b"GGML", b"GGMF", b"GGJT"):
        return " (legacy GGML/GGJT format)"
    if head in (b"FUGG",):
        return " (byte-swapped GGUF magic)"
    if head.lower().startswith((b"<!do", b"<htm", b"<?xm")):
        return " (looks like an HTML page, perhaps an error or login page)"
    if head == b"vers":
        return " (looks like a git-lfs pointer, not the file itself)"
    if head[:1] == b"{":
        return " (looks like JSON)"
    return ""


def _read_kvs(r: _Reader, n_kv: int) -> tuple[dict[str, object], int | None]:
    """All key/value pairs, and the value type of ``general.alignment`` if present."""
    metadata: dict[str, object] = {}
    alignment_type: int | None = None
    for i in range(n_kv):
        r.where = f"KV {i} key"
        key = r.string(MAX_KEY_BYTES, "key")
        if key in metadata:
            raise r.error(f"duplicate key {_show(key)}")
        r.where = f"KV {i} ({_show(key)}) type"
        vtype = _value_type(r, "value type")
        r.where = f"KV {i} ({_show(key)}) value"
        metadata[key] = _read_value(r, vtype, 0, [MAX_KEPT_ITEMS_PER_KV])
        if key == "general.alignment":
            alignment_type = vtype
    return metadata, alignment_type


def _read_tensor_infos(r: _Reader, n_tensors: int) -> list[GGUFTensor]:
    tensors: list[GGUFTensor] = []
    seen: set[str] = set()
    for i in range(n_tensors):
        r.where = f"tensor info {i} name"
        name = r.string(MAX_TENSOR_NAME_BYTES, "tensor name")
        if name in seen:
            raise r.error(f"duplicate tensor name {_show(name)}")
        seen.add(name)
        label = f"tensor {i} ({_show(name)})"
        r.where = f"{label} n_dims"
        n_dims = r.unpack(_U32)
        if n_dims > MAX_N_DIMS:
            raise r.error(f"n_dims {n_dims} exceeds the limit {MAX_N_DIMS}", r.offset - 4)
        r.where = f"{label} dims"
        start = r.offset
        shape = r.unpack_many(struct.Struct(f"<{n_dims}Q")) if n_dims else ()
        elements = 1
        for d in shape:
            if d > _INT64_MAX:
                raise r.error(f"dimension {d} is negative as int64", start)
            elements *= d
        if elements > _INT64_MAX:
            raise r.error(f"shape {shape} has more than 2**63-1 elements", start)
        r.where = f"{label} type"
        ggml_type = r.unpack(_U32)
        if ggml_type > _MAX_GGML_TYPE_ID:
            raise r.error(f"invalid ggml type {ggml_type}", r.offset - 4)
        r.where = f"{label} offset"
        offset = r.unpack(_U64)
        tensors.append(GGUFTensor(name, tuple(shape), ggml_type, offset))
    return tensors


def _pad(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def _check_tensor_layout(r: _Reader, tensors: list[GGUFTensor], alignment: int) -> int | None:
    """Offsets as llama.cpp requires them; returns the data size, or ``None``."""
    expected: int | None = 0
    end = 0
    for i, t in enumerate(tensors):
        r.where = f"tensor {i} ({_show(t.name)})"
        known = _GGML_TYPES.get(t.ggml_type)
        if known is not None and t.shape and t.shape[0] % known[1]:
            raise r.error(
                f"row of {t.shape[0]} elements is not a whole number of"
                f" {known[0]} blocks ({known[1]})"
            )
        if known is not None and not t.shape and known[1] != 1:
            raise r.error(f"scalar tensor of block type {known[0]}")
        if expected is not None and t.offset != expected:
            raise r.error(f"tensor data offset {t.offset}, expected {expected}")
        if t.offset % alignment:
            raise r.error(
                f"tensor data offset {t.offset} is not a multiple of alignment {alignment}"
            )
        nbytes = t.nbytes
        if nbytes is None or expected is None:
            expected = None
            end = max(end, t.offset)
        else:
            expected += _pad(nbytes, alignment)
            end = max(end, t.offset + nbytes)
    return end if expected is not None else None


def _quantization(file_type: int | None, tensors: list[GGUFTensor]) -> str | None:
    if file_type is not None:
        return ftype_label(file_type)
    # No general.file_type: name the ggml type most matrices use.
    counts = Counter(t.ggml_type for t in tensors if len(t.shape) >= 2)
    if not counts:
        return None
    ggml_type = counts.most_common(1)[0][0]
    known = _GGML_TYPES.get(ggml_type)
    return known[0] if known else None


def ftype_label(file_type: int) -> str:
    """``general.file_type`` (llama.cpp's ``llama_ftype``) as a label, e.g. ``Q4_K_M``."""
    return _FTYPE_LABELS.get(file_type & ~_FTYPE_GUESSED, f"ftype{file_type}")


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _alignment(r: _Reader, metadata: dict[str, object], alignment_type: int | None) -> int:
    if "general.alignment" not in metadata:
        return DEFAULT_ALIGNMENT
    r.where = "KV 'general.alignment'"
    value = metadata["general.alignment"]
    if alignment_type != _UINT32:
        type_name = _TYPE_NAMES[alignment_type] if alignment_type is not None else "?"
        raise r.error(f"general.alignment has type {type_name}, expected UINT32")
    assert isinstance(value, int)
    if value == 0 or value & (value - 1):
        raise r.error(f"general.alignment {value} is not a power of two")
    return value


def _check_data_fits(r: _Reader, tensors: list[GGUFTensor], header_end: int, data_offset: int,
                     data_size: int | None, file_size: int) -> None:
    r.where = "tensor data"
    if data_size is not None:
        last = data_offset + data_size
    else:  # unknown sizes: at least every tensor must start inside the file
        last = data_offset + max((t.offset for t in tensors), default=0)
    if last > file_size:
        raise r.error(f"truncated: tensor data ends at {last} but the file has {file_size} bytes", header_end)


def _parse(r: _Reader, check_data: bool) -> GGUFInfo:
    version, n_tensors, n_kv = _read_preamble(r)
    metadata, alignment_type = _read_kvs(r, n_kv)
    alignment = _alignment(r, metadata, alignment_type)
    tensors = _read_tensor_infos(r, n_tensors)
    header_end = r.offset
    data_offset = _pad(header_end, alignment)
    data_size = _check_tensor_layout(r, tensors, alignment)
    file_size = r.size
    if check_data and file_size is not None:
        _check_data_fits(r, tensors, header_end, data_offset, data_size, file_size)

    architecture = _str_or_none(metadata.get("general.architecture"))
    file_type = _int_or_none(metadata.get("general.file_type"))
    context_length = (
        _int_or_none(metadata.get(f"{architecture}.context_length")) if architecture else None
    )
    is_mmproj = (
        architecture == "clip"
        or metadata.get("general.type") == "mmproj"
        or any(k in metadata for k in _MMPROJ_KEYS)
    )
    return GGUFInfo(
        version=version,
        tensor_count=n_tensors,
        kv_count=n_kv,
        metadata=metadata,
        architecture=architecture,
        name=_str_or_none(metadata.get("general.name")),
        file_type=file_type,
        quantization=_quantization(file_type, tensors),
        context_length=context_length,
        is_mmproj=is_mmproj,
        alignment=alignment,
        data_offset=data_offset,
        data_size=data_size,
        file_size=file_size,
        tensors=tuple(tensors),
    )


# --- Public API ------------------------------------------------------------------


def parse_gguf_file(
    f: IO[bytes], *, name: str = "<stream>", size: int | None = None, check_data: bool = True
) -> GGUFInfo:
    """Parse the GGUF header starting at ``f``'s current position.

    ``size`` is the byte length from that position; when omitted it is measured by
    seeking (a stream that cannot seek is bounded by :data:`MAX_HEADER_BYTES` only).
    With ``check_data`` the file must be long enough to hold every tensor; pass
    ``False`` to inspect a header-only prefix (a download in progress, say).
    Raises :class:`GGUFError` with one line naming ``name``.
    """
    if size is None and f.seekable():
        start = f.tell()
        size = f.seek(0, io.SEEK_END) - start
        f.seek(start)
    r = _Reader(f, name, size)
    info = _parse(r, check_data)
    logger.debug(
        "parsed %s: GGUF v%d, %d tensors, %d KVs, arch=%s, quant=%s, data at %d",
        name, info.version, info.tensor_count, info.kv_count,
        info.architecture, info.quantization, info.data_offset,
    )
    return info


def parse_gguf(
    path: str | os.PathLike[str], *, name: str | None = None, check_data: bool = True
) -> GGUFInfo:
    """Parse the GGUF file at ``path``. Errors name ``name`` (default: the basename)."""
    shown = name if name is not None else os.path.basename(os.fspath(path))
    try:
        f = open(path, "rb", buffering=0)  # noqa: SIM115 - entered below, after the open's own errors
    except OSError as exc:
        raise GGUFError(f"{shown}: cannot open: {exc.strerror or exc}", path=shown) from exc
    with f:
        try:
            size = os.fstat(f.fileno()).st_size
            return parse_gguf_file(f, name=shown, size=size, check_data=check_data)
        except OSError as exc:
            raise GGUFError(f"{shown}: read failed: {exc.strerror or exc}", path=shown) from exc


def parse_gguf_bytes(
    buf: bytes | bytearray | memoryview, *, name: str = "<bytes>", check_data: bool = True
) -> GGUFInfo:
    """Parse a GGUF header held in memory (the whole file, or a prefix with
    ``check_data=False``)."""
    data = bytes(buf)
    return parse_gguf_file(io.BytesIO(data), name=name, size=len(data), check_data=check_data)


def looks_like_gguf(path: str | os.PathLike[str]) -> bool:
    """Cheap sniff: the GGUF magic and a supported version. Never raises."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return False
    return (
        len(head) == 8
        and head[:4] == GGUF_MAGIC
        and _U32.unpack_from(head, 4)[0] in SUPPORTED_VERSIONS
    )
