"""Files open through the mount: materialise on open, serve reads, pin blobs until release.

``open`` returns only with a descriptor on a verified blob: a local blob is opened at
once; a dehydrated one is fetched (or joined) through the downloader under a deadline,
and any failure is a store error that ``errnos`` turns into EIO / ENETUNREACH /
ETIMEDOUT. No byte is served before the whole file is verified, and no partial file is
ever opened. The server's validators of a fetched file go to the catalog through
``Store.record_validators`` (the downloader writes no SQL), and a fetched weights file
fills the card fields its signed payload left empty (``Store.record_gguf_card``).

The descriptor is held from ``open`` to ``release``. That is what pins a blob: ``rm``
and ``prune`` unlink it, but its bytes stay readable through the descriptor for every
reader (FUSE sends ``release`` only after the last ``munmap``), and the kernel frees
them at our ``close``. What is open is published (``run/open.json``) on every change,
so the CLI can say what is in use.

Reads are ``os.pread`` on the event-loop thread: a thread hop costs more than it saves
for the request sizes FUSE sends (see docs/performance.md). ``read_mode`` keeps the
alternatives for the benchmark. No pyfuse3 here; ``fuse_ops`` adapts.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import mmap
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import trio

from modelfs_store.catalog import FileRecord
from modelfs_store.errors import FetchError, FetchTimeout, NotFound, OfflineError, StoreError
from modelfs_store.owner import open_file
from modelfs_store.redact import redact_text

from .tree import Caller, Node

if TYPE_CHECKING:
    from modelfs_store.core import Store
    from modelfs_store.download import FetchResult

log = logging.getLogger(__name__)

READ_MODES = ("inline", "inline-keep", "direct", "thread", "mmap")
ALIGN = 4096                 # O_DIRECT alignment of offset, length and buffer
THREAD_MIN = 256 << 10       # in 'thread' mode, smaller requests stay on the loop thread
TOUCH_EVERY = 60.0           # seconds between last-used updates of one model


class Fetcher(Protocol):
    """What the mount needs of ``store.download.Downloader``."""

    async def ensure(self, rec: FileRecord, progress: Callable[[int], None] | None = None) -> FetchResult: ...

    async def aclose(self) -> None: ...


@dataclass
class FetchFailure:
    failed_at: float
    model: str | None
    filename: str
    sha256: str
    error: str      # exception class name
    reason: str     # one line, redacted

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Materialiser:
    """A verified local blob for a file record, fetching it when it is not local yet."""

    def __init__(self, store: Store, fetcher: Fetcher | None, *, offline: bool = False,
                 fetch_timeout: float | None = None, on_failure: Callable[[], None] | None = None,
                 on_local: Callable[[Node], None] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.fetcher = fetcher
        self.offline = offline
        self.fetch_timeout = fetch_timeout
        self.failures: deque[FetchFailure] = deque(maxlen=20)
        self._on_failure = on_failure
        self._on_local = on_local  # a fetched file may now be answered as a link: re-announce it
        self._clock = clock

    async def open_fd(self, node: Node) -> int:
        rec = node.file
        assert rec is not None
        try:
            return _open_ro(self.store.layout.blob(rec.sha256))
        except FileNotFoundError:
            pass
        try:
            path = await self._fetch(rec)
        except StoreError as exc:
            self._record(node, exc)
            raise
        fd = _open_ro(path)
        if self._on_local:
            self._on_local(node)
        return fd

    async def _fetch(self, rec: FileRecord) -> Path:
        if self.offline:
            raise OfflineError(f"{rec.filename} is not local and the store is offline", sha256=rec.sha256)
        if self.fetcher is None:
            raise FetchError(f"{rec.filename} is not local and this daemon cannot download", sha256=rec.sha256)
        deadline = self.fetch_timeout if self.fetch_timeout else math.inf
        try:
            with trio.fail_after(deadline):
                result = await self.fetcher.ensure(rec)
        except NotFound as exc:  # listed, but no bytes and no source: a failed fetch (EIO)
            raise FetchError(str(exc), sha256=rec.sha256) from exc
        except trio.TooSlowError:
            raise FetchTimeout(f"{rec.filename} was not fetched within {deadline:g}s",
                               sha256=rec.sha256, timeout=deadline) from None
        self.store.record_validators(rec, result)
        self.store.record_gguf_card(rec)
        return result.path

    def _record(self, node: Node, exc: StoreError) -> None:
        rec = node.file
        assert rec is not None
        reason = redact_text(str(exc))
        self.failures.append(FetchFailure(self._clock(), node.model, rec.filename, rec.sha256,
                                          type(exc).__name__, reason))
        log.warning("open of %s/%s failed: %s: %s", node.model, rec.filename, type(exc).__name__, reason)
        if self._on_failure:
            self._on_failure()


def _open_ro(path: Path) -> int:
    return open_file(path, os.O_RDONLY)  # a link in a blob's place is refused, never followed


DROP_LAG = 4 << 20            # bytes behind a read whose blob pages are dropped too
FOLIO = 2 << 20               # largest page-cache folio the blob may be read into


def _drop_behind(fd: int, off: int, n: int, size: int) -> None:
    """Drop the blob's page-cache copy of bytes just served: they now live in the
    mount's page cache (kept across opens), and would otherwise sit in memory twice.

    DONTNEED frees only folios wholly inside the range, and readahead fills the blob's
    cache with large folios that straddle request boundaries, so the range reaches
    back over the previous requests (an exact range freed ~10% of the pages)."""
    lo = max(0, (off - DROP_LAG) & ~(FOLIO - 1))
    end = off + n
    os.posix_fadvise(fd, lo, 0 if end >= size else end - lo, os.POSIX_FADV_DONTNEED)


def _unmap_behind(h: Handle, off: int) -> None:
    """The mmap-mode twin of :func:`_drop_behind`: pages before ``off`` were replied
    already; unmap them from the daemon, then drop them from the blob's cache."""
    assert h.map is not None
    lo = max(0, (off - DROP_LAG) & ~(FOLIO - 1))
    hi = off & ~(mmap.PAGESIZE - 1)
    if hi > lo:
        h.map.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
        os.posix_fadvise(h.fd, lo, hi - lo, os.POSIX_FADV_DONTNEED)


def _open_direct(fd: int) -> int:
    """An O_DIRECT descriptor on the same blob, or -1 where the file system has none."""
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT)
    except OSError:
        return -1


class DirectReads:
    """O_DIRECT reads into reused page-aligned buffers (thread-safe).

    The blob's bytes then live in one page cache only, the mount's: a buffered read
    would cache them twice (4 GiB of page cache for one pass over a 2 GiB model).
    The reply is a copy, so a buffer goes back to the pool before the thread returns."""

    def __init__(self) -> None:
        self._free: dict[int, list[mmap.mmap]] = {}

    def read(self, fd: int, off: int, size: int) -> bytes:
        length = -(-size // ALIGN) * ALIGN
        pool = self._free.setdefault(length, [])
        try:
            buf = pool.pop()
        except IndexError:
            buf = mmap.mmap(-1, length)
        try:
            n = os.preadv(fd, [buf], off)
            return buf[:min(n, size)]
        finally:
            pool.append(buf)


@dataclass(eq=False)
class Handle:
    fh: int
    node: Node
    fd: int                          # blob descriptor; -1 for generated files
    caller: Caller
    opened_at: float
    map: mmap.mmap | None = None     # 'mmap' read mode only
    dfd: int = -1                    # O_DIRECT descriptor ('direct' mode, where supported)
    view: memoryview | None = field(default=None, repr=False)

    def as_dict(self) -> dict[str, Any]:
        f = self.node.file
        return {"fh": self.fh, "pid": self.caller.pid, "uid": self.caller.uid, "model": self.node.model,
                "version": self.node.version, "filename": f.filename if f else "model.json",
                "sha256": self.node.sha256, "size": self.node.size, "opened_at": self.opened_at}


class OpenFiles:
    """The open-file table. Mutated only on the event-loop thread."""

    def __init__(self, materialiser: Materialiser, *, read_mode: str = "inline",
                 on_change: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        if read_mode not in READ_MODES:
            raise ValueError(f"read_mode must be one of {READ_MODES}")
        self.materialiser = materialiser
        self.read_mode = read_mode
        self._handles: dict[int, Handle] = {}
        self._fh = itertools.count(1)
        self._on_change = on_change
        self._clock = clock
        self._touched: dict[str, float] = {}
        self.pending_touch: set[str] = set()
        self._direct = DirectReads()
        self._drop = read_mode in ("inline", "mmap")

    def __len__(self) -> int:
        return len(self._handles)

    async def open(self, node: Node, caller: Caller) -> int:
        if node.kind == "file":
            fd = await self.materialiser.open_fd(node)
        elif node.kind == "card":
            fd = -1
        else:
            raise NotFound("not a file")
        h = Handle(next(self._fh), node, fd, caller, self._clock())
        if self.read_mode == "direct" and fd >= 0:
            h.dfd = _open_direct(fd)
        if self._drop and fd >= 0:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)  # twice the blob's readahead
        if self.read_mode == "mmap" and fd >= 0 and node.size > 0:
            h.map = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
            h.view = memoryview(h.map)
        self._handles[h.fh] = h
        self._note_use(node)
        self._changed()
        return h.fh

    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:
        h = self._handles[fh]
        if h.fd < 0:
            assert h.node.data is not None
            return h.node.data[off:off + size]
        if h.dfd >= 0 and size >= THREAD_MIN and off % ALIGN == 0:
            return await trio.to_thread.run_sync(self._direct.read, h.dfd, off, size)
        if h.view is not None:
            if self._drop:
                _unmap_behind(h, off)
            return h.view[off:off + size]
        if self.read_mode == "thread" and size >= THREAD_MIN:
            return await trio.to_thread.run_sync(os.pread, h.fd, size, off)
        data = os.pread(h.fd, size, off)
        if self._drop and data:
            _drop_behind(h.fd, off, len(data), h.node.size)
        return data

    def release(self, fh: int) -> None:
        h = self._handles.pop(fh, None)
        if h is None:
            return
        if h.view is not None:
            h.view.release()
            assert h.map is not None
            # A reply may still hold a slice: the map is then unmapped when it is dropped.
            with contextlib.suppress(BufferError):
                h.map.close()
            if self._drop:
                os.posix_fadvise(h.fd, 0, 0, os.POSIX_FADV_DONTNEED)
        if h.dfd >= 0:
            os.close(h.dfd)
        if h.fd >= 0:
            os.close(h.fd)
        self._changed()

    def close_all(self) -> None:
        for fh in list(self._handles):
            self.release(fh)

    def table(self) -> list[dict[str, Any]]:
        return [h.as_dict() for h in self._handles.values()]

    def note_lookup(self, node: Node) -> None:
        """A lookup answered ``node``: a link's reads never reach the daemon, so its
        use is recorded here (a regular file's at open)."""
        if node.kind == "link":
            self._note_use(node)

    def _note_use(self, node: Node) -> None:
        """Last-used time goes to the catalog in batches (a write per open would cost
        an fsync on the open path)."""
        if node.model is None:
            return
        now = self._clock()
        if now - self._touched.get(node.model, -math.inf) >= TOUCH_EVERY:
            self._touched[node.model] = now
            self.pending_touch.add(node.model)

    def _changed(self) -> None:
        if self._on_change:
            self._on_change()
