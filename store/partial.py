"""Partial downloads on disk: their format, their lock, listing and discarding them.

    partial/<expected sha256>/
        data         the bytes received so far, unverified, 0600 in a 0700 directory
        state.json   redacted URL, validators, bytes present, expected size
        written      8 bytes, little-endian: how much of ``data`` the writer has written

The same three files may sit beside the file they become instead (:class:`PartialFiles`:
``NAME.part``, ``NAME.part.json``, ``NAME.part.written``, locked by their directory):
an app-local cache in llamadart's layout (``modelfs.client``) keeps its partials so.

``state.json`` is replaced atomically (write, fsync, rename, fsync dir) only after the
data it describes was fsynced, so after ``kill -9`` or a power cut ``state.json`` never
claims bytes the disk does not hold. The writer (:mod:`store.sink`) rewrites it at least
every :data:`CHECKPOINT_BYTES`, and writes it once as a transfer begins (0 bytes, with
the validators), so a transfer is resumable from its first bytes.

``written`` is rewritten in place after every batch the writer writes, never fsynced:
after ``kill -9`` the page cache still holds every byte written, so a resume keeps
them (:func:`usable_bytes`): a kill costs what was received but not yet written, never
a checkpoint's worth. Those bytes are not vouched for by ``state.json``: they are
re-hashed on resume like the rest and checked by the final SHA-256 before the blob is
committed (after a power cut they may be lost; the commit then quarantines the file and
fetches it again). Bytes beyond ``written`` and ``state.json`` (what no writer of ours
claims) are cut off on resume. Nothing here runs at start-up: a partial stays until it
is resumed to completion or discarded with :func:`discard_partial`.

The directory itself is the lock: a writer holds an exclusive ``flock`` on it for its
whole life, so two processes never fill the same partial, and :func:`discard_partial`
refuses one that is in use.

No trio, no network here, so ``modelfs status`` stays cheap. This module never touches
the catalog and never sees a URL with secrets: callers pass the redacted form.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .durable import atomic_write, fsync_dir
from .errors import Conflict, NotFound
from .layout import Layout, check_sha256
from .owner import open_dir, open_file, read_small

log = logging.getLogger(__name__)

CHECKPOINT_BYTES = 64 << 20  # the most a crash may lose
STATE_VERSION = 1

DATA = "data"
STATE = "state.json"
WRITTEN = "written"


class HasLayout(Protocol):
    """Whatever knows where its store lives: a ``Store`` or a ``BlobStore``."""

    @property
    def layout(self) -> Layout: ...


@dataclass(frozen=True)
class PartialInfo:
    """One partial download, as ``modelfs status`` shows it."""
    sha256: str
    url: str | None            # redacted
    bytes_present: int
    expected_size: int | None
    etag: str | None
    last_modified: str | None
    updated_at: float | None
    active: bool               # a live writer holds it right now

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class PartialState:
    sha256: str
    url: str | None = None
    size: int | None = None
    bytes: int = 0
    etag: str | None = None
    last_modified: str | None = None
    updated_at: float | None = None

    @classmethod
    def load(cls, path: Path, sha256: str) -> PartialState | None:
        try:
            raw = json.loads(read_small(path))
        except (FileNotFoundError, ValueError):
            return None
        if not isinstance(raw, dict) or raw.get("version") != STATE_VERSION or raw.get("sha256") != sha256:
            return None
        try:
            return cls(sha256, raw.get("url"), raw.get("size"), int(raw.get("bytes", 0)),
                       raw.get("etag"), raw.get("last_modified"), raw.get("updated_at"))
        except (TypeError, ValueError):
            return None

    def save(self, path: Path) -> None:
        """Atomic, durable replace of ``state.json``."""
        self.updated_at = time.time()
        doc = {"version": STATE_VERSION, "sha256": self.sha256, "url": self.url, "size": self.size,
               "bytes": self.bytes, "etag": self.etag, "last_modified": self.last_modified,
               "updated_at": self.updated_at}
        atomic_write(path, json.dumps(doc, sort_keys=True).encode())


@dataclass(frozen=True)
class PartialFiles:
    """Where one partial download lives: ``lock`` is the directory its writer flocks,
    ``data``, ``state`` and ``written`` the three files of the module docstring."""
    lock: Path
    data: Path
    state: Path
    written: Path

    @classmethod
    def in_dir(cls, directory: Path) -> PartialFiles:
        """The store's layout: ``partial/<sha256>/{data,state.json,written}``."""
        return cls(directory, directory / DATA, directory / STATE, directory / WRITTEN)

    @classmethod
    def beside(cls, final: Path) -> PartialFiles:
        """Next to the file they become: ``NAME.part``, ``NAME.part.json``,
        ``NAME.part.written``, locked by the file's directory."""
        part = final.with_name(final.name + ".part")
        return cls(final.parent, part, part.with_name(part.name + ".json"), part.with_name(part.name + ".written"))

    def all(self) -> list[Path]:
        """Every file it may hold, the temps of an interrupted state write included
        (``atomic_write`` names them ``.<state>.*.tmp``)."""
        state = self.state.name
        return [self.data, self.state, self.written, self.state.with_name(state + ".tmp"),
                *self.lock.glob(f".{state}.*.tmp")]


def read_written(fd: int) -> int:
    """The count in a ``written`` file (0 when it is empty or short)."""
    raw = os.pread(fd, 8, 0)
    return int.from_bytes(raw, "little") if len(raw) == 8 else 0


def usable_bytes(state: PartialState, written: int, data_size: int) -> int:
    """How many bytes of ``data`` a resume keeps: what ``state.json`` vouches for, and
    what the writer wrote after it (module docstring), never more than ``data`` holds."""
    return min(max(state.bytes, written), data_size)


def _bytes_present(entry: Path, st: PartialState) -> int:
    try:
        size = (entry / DATA).stat().st_size
    except FileNotFoundError:
        return 0
    try:
        fd = open_file(entry / WRITTEN, os.O_RDONLY)
    except FileNotFoundError:
        return min(st.bytes, size)
    try:
        return usable_bytes(st, read_written(fd), size)
    finally:
        os.close(fd)


# -- the directory lock ------------------------------------------------------------
class PartialLock:
    """An exclusive flock on ``partial/<sha256>/``, held by the one writer of that partial."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd

    @classmethod
    def try_acquire(cls, path: Path) -> PartialLock | None:
        path.mkdir(mode=0o700, exist_ok=True)
        fd = open_dir(path)  # a link planted in a partial's place is refused, never written through
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            # Discarded (and maybe recreated) between our open and our lock: try again.
            os.close(fd)
            return cls.try_acquire(path)
        return cls(path, fd)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _partial_dir(layout: Layout, sha256: str) -> Path:
    return layout.partial / check_sha256(sha256)


def list_partials(store: HasLayout) -> list[PartialInfo]:
    """Every partial download of ``store``, sorted by SHA-256."""
    out = []
    for entry in sorted(store.layout.partial.iterdir()):
        if not entry.is_dir() or entry.is_symlink() or len(entry.name) != 64:
            continue
        st = PartialState.load(entry / STATE, entry.name)
        lock = PartialLock.try_acquire(entry) if entry.exists() else None
        active = lock is None
        if lock is not None:
            lock.release()
        if st is None and not (entry / DATA).exists():
            if not active:
                remove_empty(entry)  # an empty directory left by a writer that never wrote
            continue
        out.append(PartialInfo(entry.name, st.url if st else None, _bytes_present(entry, st) if st else 0,
                               st.size if st else None, st.etag if st else None,
                               st.last_modified if st else None, st.updated_at if st else None, active))
    return out


def discard_partial(store: HasLayout, sha256: str) -> int:
    """Delete one partial download; returns the bytes freed. Refuses one in use."""
    path = _partial_dir(store.layout, sha256)
    if not path.is_dir():
        raise NotFound(f"no partial download for sha256 {sha256[:16]}…", sha256=sha256)
    lock = PartialLock.try_acquire(path)
    if lock is None:
        raise Conflict(f"the download of {sha256[:16]}… is in progress; stop it first", sha256=sha256)
    try:
        freed = 0
        for p in files_of(path):
            try:
                freed += p.stat().st_size
                p.unlink()
            except FileNotFoundError:
                pass
        path.rmdir()
        fsync_dir(path.parent)
        return freed
    finally:
        lock.release()


def files_of(path: Path) -> list[Path]:
    """The files a partial directory may hold: its data, its state, the writer's count, and
    the temps of state writes a crash interrupted (``atomic_write`` names them
    ``.state.json.*.tmp``)."""
    return PartialFiles.in_dir(path).all()


def remove_empty(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.rmdir()


def unlink_quiet(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
