"""The write side of a download: network chunks into ``partial/<sha256>/data``, hashed inline.

The trio side only collects references to the chunks it received, into batches of
about :data:`BATCH_BYTES`. Each batch goes to two long-lived worker threads that run
side by side, both in file order: the hasher feeds the SHA-256; the writer puts the
chunks on disk. No batch costs a hop through trio: the threads hand the producer's slot
back with ``run_sync_soon``. Chunks read straight from the socket live in pooled,
page-aligned 1 MiB buffers (:meth:`Sink.take_buffer`), returned when both threads are
done with them.

The writer has two modes. ``direct_io`` (default): runs of pooled buffers at aligned
offsets go to an ``O_DIRECT`` descriptor, DMA from that memory with no copy and no
page cache at all; anything unaligned (h11's first chunk, the tail, TLS bodies) takes
the buffered path. Buffered (``direct_io=False``, or a filesystem that refuses
O_DIRECT): one ``pwritev`` straight from the chunks (no copy of ours), and
``POSIX_FADV_DONTNEED`` to start writeback early and drop pages once clean, so a
download leaves no second copy in the page cache either way. A resumed prefix is re-hashed once when the sink
opens; there is no other pass over the file.

Every ``CHECKPOINT_BYTES`` the writer fsyncs and replaces ``state.json`` (see
:mod:`store.partial`); after every batch it updates the ``written`` count (no fsync), so
a ``kill -9`` loses only what was received and not yet written. Cancellation at any
await leaves the counters, the file and ``state.json`` consistent: a batch taken by a
consumer is processed whole, and :meth:`Sink.close` (called shielded) writes what was
received and checkpoints it.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import hashlib
import logging
import mmap
import os
import queue
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from .blobs import BlobStore, Committed
from .crashpoints import crash_point
from .errors import InternalError, SpaceError, StoreError
from .owner import open_file
from .partial import CHECKPOINT_BYTES, PartialFiles, PartialState, read_written, usable_bytes
from .partial import unlink_quiet as _unlink

log = logging.getLogger(__name__)

BATCH_BYTES = 4 << 20        # chunks handed to the hasher and the writer together
N_BATCHES = 6                # in flight (queued or being processed) before the network side waits
CHUNK_READ = 4 << 20         # read size when re-hashing a resumed prefix
WRITEBACK_WINDOW = 32 << 20  # buffered path: pages older than this are dropped once clean
POOL_BUFFER = 1 << 20        # receive buffers read straight from the socket
ALIGN = 4096                 # O_DIRECT offset and length alignment


Chunk = Any  # bytes, bytearray or memoryview handed over by the HTTP client; never mutated after


def _aligned(view: memoryview) -> bool:
    """Page-aligned address and a whole number of blocks: what O_DIRECT accepts."""
    if len(view) == 0 or len(view) % ALIGN:
        return False
    try:
        address = ctypes.addressof(ctypes.c_char.from_buffer(view))
    except (TypeError, ValueError):  # read-only memory: never one of our pooled buffers
        return False
    return address % ALIGN == 0


@dataclass(eq=False)
class _Batch:
    chunks: tuple[Chunk, ...]
    start: int
    size: int
    users: int                 # worker threads still to process it
    slot: bool = True          # holds one of the producer's slots until both are done
    owned: tuple[Any, ...] = ()  # pooled buffers to give back once both are done

    def __post_init__(self) -> None:
        self.slot = self.users == 2


class _Worker(threading.Thread):
    """One long-lived thread taking batches from a queue, in order. No trio hop per batch:
    the producer's slot is released with ``run_sync_soon``, which never blocks."""

    def __init__(self, name: str, work: Callable[[_Batch], None], sink: Sink) -> None:
        super().__init__(name=name, daemon=True)
        self.queue: queue.SimpleQueue[_Batch | None] = queue.SimpleQueue()
        self.work = work
        self.sink = sink

    def run(self) -> None:
        while (item := self.queue.get()) is not None:
            try:
                if self.sink._error is None:  # after a failure, drain without working
                    self.work(item)
            except BaseException as exc:  # noqa: BLE001 - reported to the producer
                self.sink._fail(exc)
            finally:
                self.sink._finished(item)


class Sink:
    """Fills ``partial/<sha256>/data`` from network chunks; owns the running hash.

    Invariants: bytes before ``written`` are in ``data``, in order; bytes before
    ``hashed`` are in the hash; ``batch`` holds what was received after the last batch
    handed to the threads; ``state.json`` claims ``durable`` bytes, all fsynced. The
    caller holds the directory's :class:`PartialLock` for the sink's whole life.
    """

    def __init__(self, blobs: BlobStore, files: PartialFiles, sha256: str, url: str | None,
                 size: int | None, *, direct_io: bool = True) -> None:
        self.blobs = blobs
        self.direct_io = direct_io
        self.files = files
        self.data_path = files.data
        self.state_path = files.state
        self.state = PartialState(sha256, url, size)
        self.hasher = hashlib.sha256()
        self.written = 0
        self.hashed = 0
        self.durable = 0
        self.resumed_from = 0
        self.fd = -1          # buffered descriptor: unaligned tails, and filesystems without O_DIRECT
        self.dfd = -1         # O_DIRECT descriptor, when the filesystem allows it
        self.mfd = -1         # the ``written`` count (see store.partial)
        # producer side (trio thread)
        self.batch: list[Chunk] = []
        self.batch_owned: list[Any] = []
        self._pool: collections.deque[mmap.mmap] = collections.deque()
        self.batch_bytes = 0
        self.batch_start = 0
        # the pipeline
        self._slots = trio.Semaphore(N_BATCHES)
        self._lock = threading.Lock()
        self._pending = 0     # batch deliveries not yet processed by a worker thread
        self._started = False
        self._token: Any = None
        self._hasher_thread: _Worker
        self._writer_thread: _Worker
        self._error: StoreError | None = None
        self.committed = False

    # -- opening and resuming ---------------------------------------------------
    @classmethod
    async def open(cls, blobs: BlobStore, files: PartialFiles, sha256: str, url: str | None,
                   size: int | None, *, direct_io: bool = True) -> Sink:
        sink = cls(blobs, files, sha256, url, size, direct_io=direct_io)
        prev = PartialState.load(sink.state_path, sha256)
        sink._open_files()
        try:
            usable = prev is not None and (size is None or prev.size in (None, size))
            present = (usable_bytes(prev, read_written(sink.mfd), os.fstat(sink.fd).st_size)
                       if usable and prev else 0)
            if usable and prev and prev.size is not None and present > prev.size:
                present = 0
            if present:
                assert prev is not None
                sink.state = PartialState(sha256, url or prev.url, size if size is not None else prev.size,
                                          present, prev.etag, prev.last_modified, prev.updated_at)
                await sink._load_prefix(present)
            else:
                os.ftruncate(sink.fd, 0)
            sink._mark()  # what a stale count claimed beyond this is not ours
        except BaseException:
            sink._close_files()
            raise
        return sink

    def _open_files(self) -> None:
        # Never through a link: a planted partial/<sha>/data -> /etc/... is refused.
        self.fd = open_file(self.data_path, os.O_RDWR | os.O_CREAT)
        self.mfd = open_file(self.files.written, os.O_RDWR | os.O_CREAT)
        try:
            self.dfd = open_file(self.data_path, os.O_WRONLY | os.O_DIRECT | os.O_CREAT)
        except OSError:
            self.dfd = -1  # tmpfs and some FUSE filesystems refuse O_DIRECT

    async def _load_prefix(self, present: int) -> None:
        """Resume at ``present``: re-hash what is there once."""
        os.ftruncate(self.fd, present)

        def rehash() -> None:
            buf = bytearray(CHUNK_READ)
            view = memoryview(buf)
            pos = 0
            while pos < present:
                n = os.preadv(self.fd, [view[:min(CHUNK_READ, present - pos)]], pos)
                if n <= 0:
                    raise StoreError("a partial download shrank while it was being resumed")
                self.hasher.update(view[:n])
                pos += n
            with contextlib.suppress(OSError):
                os.posix_fadvise(self.fd, 0, present, os.POSIX_FADV_DONTNEED)

        await trio.to_thread.run_sync(rehash)
        self.written = self.hashed = self.batch_start = present
        self.durable = present
        self.resumed_from = present
        log.info("resuming %s… at %d bytes", self.sha256[:12], present)

    # -- properties ------------------------------------------------------------------
    @property
    def total(self) -> int:
        """Bytes received so far (written, queued or batched)."""
        return self.batch_start + self.batch_bytes

    @property
    def sha256(self) -> str:
        return self.state.sha256

    def if_range(self) -> str | None:
        """The validator for If-Range: a strong ETag, else Last-Modified."""
        etag = self.state.etag
        if etag and not etag.startswith("W/"):
            return etag
        return self.state.last_modified

    def set_validators(self, etag: str | None, last_modified: str | None) -> None:
        self.state.etag = etag
        self.state.last_modified = last_modified

    def check_space(self, remaining: int) -> None:
        self.blobs.check_space(max(0, remaining))

    async def save_state(self) -> None:
        """Write ``state.json`` now (validators, size, the bytes already durable), as a
        transfer from byte 0 begins: with the ``written`` count, even a transfer killed
        before its first checkpoint resumes. Only while no batch is in flight."""
        self.state.bytes = self.durable
        await trio.to_thread.run_sync(self.state.save, self.state_path)

    # -- the pipeline ---------------------------------------------------------------------
    def start(self) -> None:
        """Start the hasher and writer threads (they live until :meth:`commit` or :meth:`close`)."""
        self._token = trio.lowlevel.current_trio_token()
        self._hasher_thread = _Worker(f"hash-{self.sha256[:12]}", self._hash_batch, self)
        self._writer_thread = _Worker(f"write-{self.sha256[:12]}", self._write_batch, self)
        self._hasher_thread.start()
        self._writer_thread.start()
        self._started = True

    def take_buffer(self) -> mmap.mmap:
        """A reusable, page-aligned receive buffer of :data:`POOL_BUFFER` bytes; hand it
        back through :meth:`write` (``owned=``): it returns to the pool once hashed and
        written. Filled whole at an aligned offset, it goes to disk with ``O_DIRECT``
        straight from this memory."""
        try:
            return self._pool.pop()
        except IndexError:
            return mmap.mmap(-1, POOL_BUFFER)  # never closed: views may be in flight

    async def write(self, chunk: Chunk, *, owned: Any = None) -> None:
        """Take ``chunk`` (the caller must not modify it afterwards)."""
        n = len(chunk)
        if owned is not None:
            self.batch_owned.append(owned)
        if not n:
            return
        self.batch.append(chunk)
        self.batch_bytes += n
        if self.batch_bytes >= BATCH_BYTES:
            await self._submit()

    async def _submit(self) -> None:
        if self._error is not None:
            raise self._error
        await self._slots.acquire()  # backpressure: at most N_BATCHES batches in flight
        if self._error is not None:
            self._slots.release()
            raise self._error
        self._enqueue(hash_too=True)

    def _enqueue(self, *, hash_too: bool) -> None:
        item = _Batch(tuple(self.batch), self.batch_start, self.batch_bytes, 2 if hash_too else 1,
                      owned=tuple(self.batch_owned))
        self.batch = []
        self.batch_owned = []
        self.batch_start += self.batch_bytes
        self.batch_bytes = 0
        with self._lock:
            self._pending += item.users
        self._writer_thread.queue.put(item)
        if hash_too:
            self._hasher_thread.queue.put(item)

    # Called in worker threads --------------------------------------------------------------
    def _finished(self, item: _Batch) -> None:
        with self._lock:
            item.users -= 1
            self._pending -= 1
            last = item.users == 0
        if last:
            self._pool.extend(item.owned)  # deque.extend is atomic
            if item.slot:
                self._token.run_sync_soon(self._slots.release)

    def _fail(self, exc: BaseException) -> None:
        with self._lock:
            if self._error is None:
                self._error = _as_store_error(exc)

    def _hash_batch(self, item: _Batch) -> None:
        for c in item.chunks:
            self.hasher.update(c)
        self.hashed = item.start + item.size

    def _write_batch(self, item: _Batch) -> None:
        if self.direct_io and self.dfd >= 0:
            self._write_direct(item.chunks)
        else:
            self._writev(item.chunks)
        self._mark()
        if self.written - self.durable >= CHECKPOINT_BYTES:
            crash_point("download-before-checkpoint")
            self._checkpoint()
            crash_point("download-after-checkpoint")

    def _mark(self) -> None:
        """Record how much of ``data`` is written (not fsynced: see store.partial)."""
        os.pwrite(self.mfd, struct.pack("<Q", self.written), 0)

    # -- writer thread ----------------------------------------------------------------------
    def _write_direct(self, chunks: tuple[Chunk, ...]) -> None:
        """O_DIRECT for every run of page-aligned chunks at an aligned offset (the pooled
        socket buffers: DMA from that memory, no copy, no page cache), the buffered path
        for the rest (h11's first chunk, the tail)."""
        run: list[memoryview] = []
        run_start = self.written
        for chunk in chunks:
            view = memoryview(chunk).cast("B")
            if _aligned(view) and (run_start + sum(len(v) for v in run)) % ALIGN == 0:
                run.append(view)
                continue
            self._flush_direct(run)
            run = []
            self._writev((chunk,))
            run_start = self.written
        self._flush_direct(run)

    def _flush_direct(self, run: list[memoryview]) -> None:
        while run:
            try:
                n = os.pwritev(self.dfd, run[:1024], self.written)
            except OSError as exc:
                if exc.errno == errno.EINVAL:  # this filesystem refuses O_DIRECT after all
                    self.dfd_refused()
                    self._writev(tuple(run))
                    return
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise SpaceError("not enough free space in the store for this download") from exc
                raise
            self.written += n
            while run and n >= len(run[0]):
                n -= len(run[0])
                run.pop(0)
            if n:  # a short direct write: finish this piece through the page cache
                self._writev((run.pop(0)[n:],))

    def dfd_refused(self) -> None:
        os.close(self.dfd)
        self.dfd = -1

    def _writev(self, chunks: tuple[Chunk, ...]) -> None:
        """Buffered path: the kernel copies straight from the chunks (no copy of ours);
        ``POSIX_FADV_DONTNEED`` starts writeback of what was just written and drops the
        pages written a window ago (clean by then), so the download neither leaves a
        second copy in the page cache nor makes the checkpoint fsync wait long."""
        views = [memoryview(c).cast("B") for c in chunks]
        while views:
            try:
                n = os.pwritev(self.fd, views[:1024], self.written)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise SpaceError("not enough free space in the store for this download") from exc
                raise
            self.written += n
            while views and n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            if n:
                views[0] = views[0][n:]
        start = max(0, self.written - WRITEBACK_WINDOW)
        with contextlib.suppress(OSError):
            os.posix_fadvise(self.fd, start, self.written - start, os.POSIX_FADV_DONTNEED)

    def _checkpoint(self) -> None:
        """Make ``written`` bytes durable, then say so in state.json. Worker thread."""
        upto = self.written
        os.fsync(self.fd)
        self.state.bytes = upto
        self.state.save(self.state_path)
        self.durable = upto

    # -- stopping -------------------------------------------------------------------------------
    async def _stop_consumers(self, *, hash_too: bool) -> None:
        """Hand over the current batch, let both threads finish everything queued, and
        stop them. Safe to call shielded."""
        if not self._started:
            self.start()
        if self.batch:
            self._enqueue(hash_too=hash_too)
        for worker in (self._writer_thread, self._hasher_thread):
            worker.queue.put(None)
        for worker in (self._writer_thread, self._hasher_thread):
            await trio.to_thread.run_sync(worker.join)
        if self._error is not None:
            raise self._error

    async def quiesce(self) -> None:
        """Wait until every submitted batch is hashed and written (between attempts)."""
        while True:
            with self._lock:
                idle = self._pending == 0
            if self._error is not None:
                raise self._error
            if idle:
                return
            await trio.sleep(0.001)

    # -- restarting ---------------------------------------------------------------------
    async def reset(self, reason: str) -> int:
        """Throw away everything received; a body from byte zero follows. Returns the bytes
        dropped. Called between attempts, with the pipeline running."""
        dropped = self.total
        log.info("discarding %d partial bytes of %s…: %s", dropped, self.sha256[:12], reason)
        await self.quiesce()
        os.ftruncate(self.fd, 0)
        self.hasher = hashlib.sha256()
        self.batch, self.batch_bytes, self.batch_start = [], 0, 0
        self.written = self.hashed = self.durable = 0
        self.state.bytes = 0
        self.state.etag = self.state.last_modified = None
        _unlink(self.state_path)
        self._mark()
        return dropped

    # -- finishing ------------------------------------------------------------------------
    async def commit(self, expected_size: int | None) -> Committed:
        """All bytes are in: flush, fsync, check size and SHA-256, rename into blobs/.
        On a mismatch the data goes to quarantine and IntegrityError is raised."""
        await self._stop_consumers(hash_too=True)
        if self.hashed != self.written:
            raise InternalError(f"hashed {self.hashed} bytes of the download but wrote {self.written}")
        await trio.to_thread.run_sync(os.fsync, self.fd)
        size, digest = self.written, self.hasher.hexdigest()
        if os.fstat(self.fd).st_size != size:
            raise InternalError(f"wrote {size} bytes of the download but the file has {os.fstat(self.fd).st_size}")
        self._close_files()
        crash_point("download-before-commit")
        try:
            committed = self.blobs.commit_file(self.data_path, digest, size,
                                               expected_sha256=self.sha256, expected_size=expected_size)
        finally:
            self._forget()
        self.committed = True
        return committed

    async def close(self) -> None:
        """End of the transfer, however it ended: leave a consistent partial (or none).
        Call shielded."""
        try:
            if not self.committed and self.fd >= 0:
                try:
                    await self._stop_consumers(hash_too=False)
                except StoreError as exc:
                    log.warning("could not write the last bytes of %s…: %s", self.sha256[:12], exc)
                # Only what is written is trusted; anything past it goes.
                os.ftruncate(self.fd, self.written)
                if self.written and (self.written != self.durable or not self.state_path.exists()):
                    await trio.to_thread.run_sync(self._checkpoint)
        finally:
            self._close_files()
            if not self.committed and self.written == 0:
                self._forget()

    def _forget(self) -> None:
        for path in self.files.all():
            _unlink(path)

    def _close_files(self) -> None:
        for attr in ("dfd", "fd", "mfd"):
            fd = getattr(self, attr)
            if fd >= 0:
                os.close(fd)
                setattr(self, attr, -1)


def _as_store_error(exc: BaseException) -> StoreError:
    if isinstance(exc, StoreError):
        return exc
    if isinstance(exc, OSError):
        err = StoreError(f"writing the download failed: {exc.strerror or exc}")
    else:
        err = StoreError(f"writing the download failed: {type(exc).__name__}")
    err.__cause__ = exc
    return err
