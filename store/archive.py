"""Safe extraction of zip artifacts (e.g. a CoreML ``.mlmodelc`` directory).

This module owns the decision whether a zip may be unpacked, and the unpacking. It
rejects, it never sanitises: a name that would need fixing, a link, a special file,
an encrypted or exotically compressed entry, a collision, an overlap, or a size that
does not add up refuses the whole archive. It must never write outside a private
temporary directory under ``dest_parent`` until the finished tree is renamed into
place, never leave anything behind after a refusal, and never trust either zip
header: the central directory is checked against the local headers, and the bytes
actually inflated are counted and CRC-checked against what both claim.

Python 3.11's ``zipfile`` lacks the CVE-2024-0450 overlap check and silently
truncates names at NUL, so ``zipfile`` is used only to read the central directory;
every check and every byte of decompression is done here.

    inspect_zip(path, limits)                        -> list[Entry]
    extract_zip(path, dest_parent, name, limits)     -> Extracted(path, files)

``ArchiveError`` reasons: ``bad-zip``, ``too-many-entries``, ``bad-name``,
``absolute-path``, ``traversal``, ``backslash``, ``nul``, ``control-char``, ``invisible-char``,
``empty-component``, ``drive-letter``, ``name-too-long``, ``too-deep``, ``link``,
``special-file``, ``type-mismatch``, ``encrypted``, ``unsupported-compression``,
``size-mismatch``, ``ratio``, ``too-large``, ``duplicate-name``, ``path-conflict``,
``header-mismatch``, ``overlap``, ``past-central-directory``, ``size-lie``,
``truncated``, ``trailing-data``, ``bad-crc``, ``bad-deflate``, ``bad-destination``.
A destination that already exists is a ``Conflict`` (``reason="exists"``); running
out of disk is a ``SpaceError`` (``reason="no-space"``).
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import os
import shutil
import stat
import struct
import tempfile
import unicodedata
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from .durable import fsync_dir, fsync_file
from .errors import ArchiveError, Conflict, SpaceError
from .names import edge_problem, invisible_problem

_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")
_LOCAL_SIG = b"PK\x03\x04"
_FLAG_ENCRYPTED = 0x0001
_FLAG_STRONG_ENCRYPTION = 0x0040
_FLAG_MASKED_HEADERS = 0x2000
_FLAG_UTF8 = 0x0800
_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate"}
_READ_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """Refusal thresholds. Ratio applies only to entries larger than ``ratio_min_size``:
    small files (configs, JSON) legitimately compress far better than 100:1."""

    max_entries: int = 10_000
    max_total_size: int = 64 * 1024**3
    max_ratio: int = 100
    ratio_min_size: int = 1024 * 1024
    max_depth: int = 32
    max_path_bytes: int = 4096


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class Entry:
    """One checked central-directory entry. ``path`` has no trailing slash."""

    path: str
    is_dir: bool
    size: int
    compressed_size: int
    method: str
    crc: int
    header_offset: int
    data_offset: int


@dataclass(frozen=True)
class ExtractedFile:
    path: str  # relative, '/'-separated, as in the archive
    size: int
    sha256: str


@dataclass(frozen=True)
class Extracted:
    path: Path
    files: tuple[ExtractedFile, ...]


def _refuse(archive: str, reason: str, message: str, **fields: Any) -> ArchiveError:
    return ArchiveError(f"archive {archive} refused: {message}", reason=reason, **fields)


def _show(name: str) -> str:
    return repr(name if len(name) <= 80 else name[:80] + "...")


def _caseless(name: str) -> str:
    """Canonical caseless key: NFC/NFD spellings and case variants collide."""
    return unicodedata.normalize("NFD", unicodedata.normalize("NFD", name).casefold())


def _name_problem(raw: str, limits: Limits) -> tuple[str, str] | None:
    """(reason, description) if an archive member name is unacceptable."""
    if "\x00" in raw:
        return "nul", "contains a NUL byte"
    if "\\" in raw:
        return "backslash", "contains a backslash"
    if raw.startswith("/"):
        return "absolute-path", "is an absolute path"
    if len(raw) >= 2 and raw[1] == ":" and raw[0].isascii() and raw[0].isalpha():
        return "drive-letter", "starts with a drive letter"
    if ":" in raw:
        # Drive-relative names and NTFS alternate data streams.
        return "drive-letter", "contains a colon"
    if any(unicodedata.category(c) == "Cc" for c in raw):
        return "control-char", "contains a control character"
    try:
        encoded = raw.encode("utf-8")
    except UnicodeEncodeError:
        return "bad-name", "is not valid Unicode"
    if len(encoded) > limits.max_path_bytes:
        return "name-too-long", f"is longer than {limits.max_path_bytes} bytes"
    body = raw[:-1] if raw.endswith("/") else raw
    if not body:
        return "empty-component", "is empty"
    parts = body.split("/")
    for part in parts:
        if part == "":
            return "empty-component", "has an empty path component"
        if part in (".", ".."):
            return "traversal", f"has a {part!r} path component"
        if len(part.encode("utf-8")) > 255:
            return "name-too-long", "has a component longer than 255 bytes"
        invisible = invisible_problem(part)
        if invisible is not None:
            return "invisible-char", invisible
        edge = edge_problem(part)
        if edge is not None:
            return "bad-name", f"has a component that {edge}"
    if len(parts) > limits.max_depth:
        return "too-deep", f"is nested deeper than {limits.max_depth} levels"
    return None


def _entry_kind(info: zipfile.ZipInfo) -> tuple[str, str] | None:
    """(reason, description) if the entry is not a plain file or directory."""
    mode = info.external_attr >> 16
    fmt = stat.S_IFMT(mode)
    if fmt == 0:
        return None  # no Unix type recorded (e.g. created on Windows): plain entry
    if fmt == stat.S_IFLNK:
        return "link", "is a symbolic link"
    if fmt not in (stat.S_IFREG, stat.S_IFDIR):
        return "special-file", f"is a special file (type {fmt >> 12:o})"
    if (fmt == stat.S_IFDIR) != info.filename.endswith("/"):
        return "type-mismatch", "has a file type that disagrees with its name"
    return None


def _read_local_header(f: BinaryIO, info: zipfile.ZipInfo) -> tuple[int, bytes]:
    """(offset of the entry's data, local header filename bytes), or raise ValueError."""
    if info.header_offset < 0:
        raise ValueError("negative header offset")
    f.seek(info.header_offset)
    fixed = f.read(_LOCAL_HEADER.size)
    if len(fixed) != _LOCAL_HEADER.size:
        raise ValueError("local header is past the end of the file")
    fields = _LOCAL_HEADER.unpack(fixed)
    if fields[0] != _LOCAL_SIG:
        raise ValueError("no local header signature")
    name_len, extra_len = fields[9], fields[10]
    name = f.read(name_len)
    if len(name) != name_len:
        raise ValueError("local header name is past the end of the file")
    return info.header_offset + _LOCAL_HEADER.size + name_len + extra_len, name


def _check_entry(info: zipfile.ZipInfo, shown: str, limits: Limits) -> tuple[str, bool]:
    """Refuse one central-directory entry on its own merits: name, type, encryption,
    compression, declared sizes. Returns (method, is_dir)."""
    raw = info.orig_filename  # the name before zipfile truncated it at a NUL
    problem = _name_problem(raw, limits)
    if problem is not None:
        raise _refuse(shown, problem[0], f"entry {_show(raw)} {problem[1]}", entry=raw)
    name = info.filename
    kind = _entry_kind(info)
    if kind is not None:
        raise _refuse(shown, kind[0], f"entry {_show(name)} {kind[1]}", entry=name)
    if info.flag_bits & (_FLAG_ENCRYPTED | _FLAG_STRONG_ENCRYPTION | _FLAG_MASKED_HEADERS):
        raise _refuse(shown, "encrypted", f"entry {_show(name)} is encrypted", entry=name)
    method = _METHODS.get(info.compress_type)
    if method is None:
        raise _refuse(shown, "unsupported-compression",
                      f"entry {_show(name)} uses compression method {info.compress_type} "
                      "(only stored and deflate)", entry=name)
    is_dir = name.endswith("/")
    if is_dir and (info.file_size or info.compress_size):
        raise _refuse(shown, "size-mismatch", f"directory entry {_show(name)} has data", entry=name)
    if method == "stored" and info.compress_size != info.file_size:
        raise _refuse(shown, "size-mismatch",
                      f"stored entry {_show(name)} declares {info.compress_size} bytes stored "
                      f"but {info.file_size} bytes of content", entry=name)
    if (info.file_size > limits.ratio_min_size
            and info.file_size > limits.max_ratio * max(info.compress_size, 1)):
        raise _refuse(shown, "ratio",
                      f"entry {_show(name)} expands {info.compress_size} bytes to {info.file_size} "
                      f"(more than {limits.max_ratio}:1)", entry=name)
    return method, is_dir


@dataclass
class _Census:
    """What the entries claim together: names (caseless), which are files and which
    directories, and the byte ranges of their headers and data. Refuses collisions as
    entries are added, and conflicts, overlaps and renamed headers at the end."""

    shown: str
    seen: dict[str, str] = field(default_factory=dict)     # caseless path -> entry name
    files: set[str] = field(default_factory=set)
    dirs: dict[str, str] = field(default_factory=dict)     # caseless dir -> entry that needs it
    ranges: list[tuple[int, int, str]] = field(default_factory=list)
    misnamed: list[str] = field(default_factory=list)

    def add_name(self, name: str, path: str, is_dir: bool) -> None:
        key = _caseless(path)
        if key in self.seen:
            raise _refuse(self.shown, "duplicate-name",
                          f"entry {_show(name)} collides with {_show(self.seen[key])}", entry=name)
        self.seen[key] = name
        parts = key.split("/")
        for depth in range(1, len(parts)):
            self.dirs.setdefault("/".join(parts[:depth]), name)
        if is_dir:
            self.dirs.setdefault(key, name)
        else:
            self.files.add(key)

    def finish(self) -> None:
        clash = self.files & self.dirs.keys()
        if clash:
            key = sorted(clash)[0]
            raise _refuse(self.shown, "path-conflict", f"entry {_show(self.seen[key])} is a file but "
                          f"{_show(self.dirs[key])} needs it as a directory", entry=self.seen[key])
        self.ranges.sort()
        for (_, prev_end, prev_name), (start, _, name) in itertools.pairwise(self.ranges):
            if start < prev_end:
                raise _refuse(self.shown, "overlap",
                              f"entries {_show(prev_name)} and {_show(name)} overlap", entry=name)
        if self.misnamed:
            # Judged after the overlap check: an alias of another entry's header is
            # reported as the overlap it is.
            raise _refuse(self.shown, "header-mismatch",
                          f"entry {_show(self.misnamed[0])} has a different name in its local header",
                          entry=self.misnamed[0])


def _inspect(zf: zipfile.ZipFile, f: BinaryIO, shown: str, limits: Limits) -> list[tuple[Entry, zipfile.ZipInfo]]:
    infos = zf.infolist()
    if len(infos) > limits.max_entries:
        raise _refuse(shown, "too-many-entries", f"{len(infos)} entries (limit {limits.max_entries})",
                      count=len(infos))
    entries: list[tuple[Entry, zipfile.ZipInfo]] = []
    census = _Census(shown)
    total = 0
    for info in infos:
        method, is_dir = _check_entry(info, shown, limits)
        name = info.filename
        path = name[:-1] if is_dir else name
        total += info.file_size
        if total > limits.max_total_size:
            raise _refuse(shown, "too-large",
                          f"uncompressed total exceeds {limits.max_total_size} bytes", size=total)
        census.add_name(name, path, is_dir)
        try:
            data_offset, local_name = _read_local_header(f, info)
        except ValueError as exc:
            raise _refuse(shown, "header-mismatch", f"entry {_show(name)}: {exc}", entry=name) from None
        encoding = "utf-8" if info.flag_bits & _FLAG_UTF8 else "cp437"
        if local_name != info.orig_filename.encode(encoding):
            census.misnamed.append(name)
        end = data_offset + info.compress_size
        if end > zf.start_dir:
            raise _refuse(shown, "past-central-directory",
                          f"entry {_show(name)} data extends past the central directory", entry=name)
        census.ranges.append((info.header_offset, end, name))
        entries.append((Entry(path=path, is_dir=is_dir, size=info.file_size,
                              compressed_size=info.compress_size, method=method, crc=info.CRC,
                              header_offset=info.header_offset, data_offset=data_offset), info))
    census.finish()
    return entries


def _open(path: Path) -> tuple[BinaryIO, zipfile.ZipFile]:
    f = open(path, "rb")  # noqa: SIM115 - returned open, with the ZipFile that reads it
    try:
        return f, zipfile.ZipFile(f)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, struct.error,
            NotImplementedError, OverflowError, UnicodeDecodeError) as exc:
        f.close()
        raise _refuse(_show(path.name), "bad-zip", f"not a readable zip ({type(exc).__name__})") from None
    except BaseException:
        f.close()
        raise


def inspect_zip(path: str | os.PathLike[str], limits: Limits = DEFAULT_LIMITS) -> list[Entry]:
    """Check every entry of the archive; return them in central-directory order."""
    path = Path(path)
    f, zf = _open(path)
    with f, zf:
        return [entry for entry, _ in _inspect(zf, f, _show(path.name), limits)]


def _copy_entry(f: BinaryIO, entry: Entry, fd: int, shown: str) -> str:
    """Inflate one entry into ``fd``; return its sha256. Trusts no declared size."""
    digest = hashlib.sha256()
    crc = 0
    written = 0
    remaining = entry.compressed_size
    inflater = zlib.decompressobj(-zlib.MAX_WBITS) if entry.method == "deflate" else None
    f.seek(entry.data_offset)

    def emit(data: bytes) -> None:
        nonlocal crc, written
        written += len(data)
        if written > entry.size:
            raise _refuse(shown, "size-lie",
                          f"entry {_show(entry.path)} inflates past its declared {entry.size} bytes",
                          entry=entry.path)
        digest.update(data)
        crc = zlib.crc32(data, crc)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]

    while remaining:
        chunk = f.read(min(_READ_CHUNK, remaining))
        if not chunk:
            raise _refuse(shown, "truncated", f"entry {_show(entry.path)} data is cut short", entry=entry.path)
        remaining -= len(chunk)
        if inflater is None:
            emit(chunk)
            continue
        try:
            # Bounded output per call: one byte over the declared size is enough to refuse.
            data = inflater.decompress(chunk, entry.size - written + 1)
            emit(data)
            while inflater.unconsumed_tail:
                emit(inflater.decompress(inflater.unconsumed_tail, entry.size - written + 1))
        except zlib.error:
            raise _refuse(shown, "bad-deflate", f"entry {_show(entry.path)} is not valid deflate data",
                          entry=entry.path) from None
        if inflater.eof and (inflater.unused_data or remaining):
            raise _refuse(shown, "trailing-data",
                          f"entry {_show(entry.path)} has data after its deflate stream", entry=entry.path)
    if inflater is not None:
        try:
            emit(inflater.flush())
        except zlib.error:  # pragma: no cover - flush after a clean stream does not fail
            raise _refuse(shown, "bad-deflate", f"entry {_show(entry.path)} is not valid deflate data",
                          entry=entry.path) from None
        if not inflater.eof:
            raise _refuse(shown, "truncated", f"entry {_show(entry.path)} deflate stream is incomplete",
                          entry=entry.path)
    if written != entry.size:
        raise _refuse(shown, "size-lie",
                      f"entry {_show(entry.path)} has {written} bytes, declared {entry.size}",
                      entry=entry.path)
    if crc != entry.crc:
        raise _refuse(shown, "bad-crc", f"entry {_show(entry.path)} fails its CRC-32", entry=entry.path)
    return digest.hexdigest()


def _destination_problem(name: str) -> str | None:
    if name in ("", ".", ".."):
        return "is not a name"
    if "/" in name or "\\" in name or "\x00" in name:
        return "is not a single path component"
    if any(unicodedata.category(c) == "Cc" for c in name):
        return "contains a control character"
    if name.startswith(".extract-"):
        return "uses the extractor's temporary prefix"
    try:
        if len(name.encode("utf-8")) > 255:
            return "is longer than 255 bytes"
    except UnicodeEncodeError:
        return "is not valid Unicode"
    return None


def _write_tree(f: BinaryIO, entries: list[Entry], tmp: Path, shown: str,
                on_file: Callable[[ExtractedFile], None] | None) -> list[ExtractedFile]:
    """Every entry into the private directory ``tmp``: files 0444 with O_EXCL and
    O_NOFOLLOW, fsynced, then every directory fsynced."""
    files: list[ExtractedFile] = []
    made: set[str] = {""}

    def ensure_dir(rel: str) -> None:
        if rel in made:
            return
        ensure_dir(rel.rpartition("/")[0])
        os.mkdir(tmp / rel, 0o755)
        made.add(rel)

    for entry in entries:
        if entry.is_dir:
            ensure_dir(entry.path)
            continue
        ensure_dir(entry.path.rpartition("/")[0])
        fd = os.open(tmp / entry.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            sha256 = _copy_entry(f, entry, fd, shown)
            os.fchmod(fd, 0o444)
            fsync_file(fd)
        finally:
            os.close(fd)
        item = ExtractedFile(path=entry.path, size=entry.size, sha256=sha256)
        files.append(item)
        if on_file is not None:
            on_file(item)
    for rel in sorted(made, key=len, reverse=True):
        fsync_dir(tmp / rel if rel else tmp)
    return files


def _rename_into_place(tmp: Path, final: Path, shown: str) -> None:
    # os.rename would silently replace an empty directory: look first. A directory
    # created in the window between look and rename is the only gap.
    if os.path.lexists(final):
        raise Conflict(f"cannot extract {shown}: {final} already exists", reason="exists")
    try:
        os.rename(tmp, final)
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise Conflict(f"cannot extract {shown}: {final} already exists", reason="exists") from None
        raise


def extract_zip(
    path: str | os.PathLike[str],
    dest_parent: str | os.PathLike[str],
    name: str,
    limits: Limits = DEFAULT_LIMITS,
    *,
    on_file: Callable[[ExtractedFile], None] | None = None,
) -> Extracted:
    """Extract into ``dest_parent/name`` atomically, or refuse and leave nothing behind.

    Files are written 0444 (directories 0755) into a private ``.extract-*`` directory
    with O_EXCL, fsynced, and the finished tree is renamed into place. The result lists
    every file with the size and SHA-256 of the bytes actually written, so the caller
    can record or content-address them; ``on_file`` sees each one as it completes.
    """
    path = Path(path)
    dest_parent = Path(dest_parent)
    shown = _show(path.name)
    problem = _destination_problem(name)
    if problem is not None:
        raise _refuse(shown, "bad-destination", f"destination name {_show(name)} {problem}")
    final = dest_parent / name
    if os.path.lexists(final):
        raise Conflict(f"cannot extract {shown}: {final} already exists", reason="exists")

    f, zf = _open(path)
    with f, zf:
        checked = _inspect(zf, f, shown, limits)
        tmp = Path(tempfile.mkdtemp(dir=dest_parent, prefix=".extract-"))
        try:
            files = _write_tree(f, [entry for entry, _ in checked], tmp, shown, on_file)
            os.chmod(tmp, 0o755)  # mkdtemp made it 0700
            _rename_into_place(tmp, final, shown)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if exc.errno == errno.ENOSPC:
                raise SpaceError(f"no space left to extract {shown}", reason="no-space") from None
            raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    fsync_dir(dest_parent)
    return Extracted(path=final, files=tuple(files))
