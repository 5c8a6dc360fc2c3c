"""Resumable, verified downloads of blobs: the one way network bytes enter the store.

:class:`Downloader` streams an HTTP(S) body into ``partial/<sha256>/`` through a
:class:`~store.partial.Sink` that hashes inline, then commits it through
:meth:`BlobStore.commit_file` (size and SHA-256 checked; a mismatch is quarantined).
Unverified bytes are never visible under ``blobs/``.

Resume rules: a partial is always resumable here because the expected
SHA-256 is always known. A resumed request sends ``Range: bytes=N-`` with ``If-Range``
(a strong ETag, else Last-Modified). A 206 must carry ``Content-Range`` starting at N,
else the transfer restarts from zero; a 200 restarts from zero; a 416 discards the
partial; a changed validator discards it. The end is always a size and SHA-256 check;
a mismatch (e.g. a server that ignored If-Range) is quarantined and the file fetched
again from zero once.

One transfer per blob: concurrent :meth:`Downloader.fetch` calls for one SHA-256 in a
process join the first one, also across Downloaders that share one
:class:`Transfers` table (the daemon's jobs, each with its own credentials and address
rule, and the mount's lazy opens); a joiner sees the transfer's progress from its
start. Across processes the partial directory's ``flock`` serialises them and the
later one finds the committed blob. Correctness never depends on the lock: the commit
checks the hash whoever wins.

Robustness: connection errors, 5xx and 429 are retried with exponential backoff and
jitter (``Retry-After`` honoured, capped); a stall (no byte for ``stall_timeout``)
or a rate under ``min_speed`` reconnects and resumes; free space is checked before
writing; a body longer than the expected size is refused.

When to give up: only NEW bytes count as progress, bytes past the most the
partial ever held in this fetch (a server that ignores Range and drops every connection
sends the same first bytes again and again). ``max_retries`` failures in a row without
:data:`MIN_PROGRESS` new bytes end the fetch with the last error, and so does receiving
more than twice the file plus :data:`BUDGET_SLACK` over all attempts, whatever the
server does (FetchError, exit 9).

A fetch whose bytes failed verification twice is remembered (:mod:`store.failures`):
until its backoff expires, a fetch of that SHA-256 is refused at once with
IntegrityError, before any request (the mount answers EIO). A verified fetch forgets it;
``retry_failed`` (``modelfs pull --retry``) forgets it before trying.

A caller may pass a :class:`PrefixCheck`, fed the first bytes as they arrive (and the
bytes of a resumed partial first); when it refuses them the partial is deleted, so a
refused file leaves nothing behind (an unsigned pull checks the GGUF header this way).

Every request goes through
the store's one HTTP layer (:class:`~store.http.Http`, ``Downloader.http``), which
follows redirects by the one rule, keeps credentials with their origin and says which
failures are transient; the retries and their backoff are decided here.

This module writes no SQL: :meth:`Downloader.ensure` returns the :class:`FetchResult`
with the server's validators, and the caller records them
(:meth:`store.core.Store.record_validators`).

Deadlines are the caller's (``trio.fail_after``): every await is a clean cancellation
point and the partial stays consistent. Messages and logs carry redacted URLs only.
"""

from __future__ import annotations

import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import httpx
import trio

from . import failures, oci
from .blobs import BlobStore
from .catalog import FileRecord
from .errors import FetchError, IntegrityError, NotFound, OfflineError, StoreError, UsageError
from .http import AddressRule, Auth, BigReadStream, Http, RetryPolicy, is_transient, status_error
from .layout import Sha256, check_sha256
from .partial import PartialFiles, PartialInfo, PartialLock, discard_partial, list_partials, remove_empty
from .redact import REDACTED, redact_url
from .sink import ALIGN, Sink

__all__ = ["BUDGET_SLACK", "MIN_PROGRESS", "Bytes", "Downloader", "FetchResult", "PartialInfo", "PrefixCheck",
           "Transfers", "discard_partial", "list_partials"]

log = logging.getLogger(__name__)

Progress = Callable[[int], None]
Bytes = bytes | bytearray | memoryview

MIN_PROGRESS = 1 << 20     # new bytes an attempt must add for its failure not to count
BUDGET_SLACK = 64 << 20    # a fetch gives up once it received more than 2 x size + this
PREFIX_READ = 1 << 20      # read size when a resumed partial's first bytes are checked again


class PrefixCheck(Protocol):
    """Inspects the first bytes of a download as they arrive, in order from byte 0, and
    refuses them by raising a StoreError (what ``pull`` does with a GGUF header)."""

    @property
    def done(self) -> bool:
        """Nothing more to see: the rest of the file is not fed."""

    def feed(self, data: Bytes, size: int | None) -> None:
        """The next bytes; ``size`` is the whole file's, when known."""

    def reset(self) -> None:
        """The download restarts from byte 0."""


@dataclass(frozen=True)
class FetchResult:
    sha256: Sha256
    size: int
    path: Path                 # the committed blob
    new: bool                  # this call committed the blob (False: present, or joined another fetch)
    etag: str | None
    last_modified: str | None
    bytes_transferred: int     # body bytes this call received over the network


# -- retry plumbing ----------------------------------------------------------------------
class _Retry(Exception):
    """An attempt failed in a way worth retrying. ``error`` is what the user sees if the
    retries run out."""

    def __init__(self, error: FetchError, *, retry_after: float | None = None) -> None:
        super().__init__(str(error))
        self.error = error
        self.retry_after = retry_after

    @classmethod
    def of(cls, error: FetchError) -> _Retry:
        """A transient error of the HTTP layer, as a retry."""
        return cls(error, retry_after=error.fields.get("retry_after"))


class _Restart(Exception):
    """The partial was discarded; try again at once (does not count as a failure)."""


class _Refused(Exception):
    """The caller's :class:`PrefixCheck` refused the first bytes: ``error`` says why."""

    def __init__(self, error: StoreError) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass
class _State:
    """One transfer of one blob, across its attempts: what it cost and what is new."""
    check: PrefixCheck | None = None
    received: int = 0      # body bytes over the network, all attempts
    html: bool = False     # the last response was an HTML page
    high: int = 0          # the most bytes the partial held: only bytes past this are new

    def take(self, data: Bytes, expected: int | None, shown: str) -> None:
        """Account for ``data`` just received (before it is written): the byte budget,
        then the prefix check."""
        self.received += len(data)
        if expected is not None and self.received > 2 * expected + BUDGET_SLACK:
            raise FetchError(
                f"{shown}: gave up after receiving {self.received} bytes for a file of {expected} bytes "
                "(more than twice its size): the connection keeps breaking and the server does not resume "
                "where it broke off", received=self.received, expected=expected)
        if self.check is not None and not self.check.done:
            try:
                self.check.feed(data, expected)
            except StoreError as exc:
                raise _Refused(exc) from None

    def reset_check(self) -> None:
        if self.check is not None:
            self.check.reset()


def _gave_up(error: FetchError, attempts: int) -> FetchError:
    """The last error, saying how many attempts in a row brought nothing new."""
    if attempts <= 1:
        return error
    return type(error)(f"{error}; gave up after {attempts} attempts in a row without new bytes", **error.fields)


def _feed_prefix(check: PrefixCheck, path: Path, present: int, size: int | None) -> None:
    """Feed ``check`` the first bytes of a resumed partial, until it has seen enough.
    Worker thread."""
    with open(path, "rb", buffering=0) as f:
        pos = 0
        while pos < present and not check.done:
            data = f.read(min(PREFIX_READ, present - pos))
            if not data:
                return
            check.feed(data, size)
            pos += len(data)


@dataclass
class _Transfer:
    """One in-flight fetch that other callers in this process can join."""
    done: trio.Event = field(default_factory=trio.Event)
    result: FetchResult | None = None
    error: StoreError | None = None
    received: int = 0
    listeners: list[Progress] = field(default_factory=list)

    def progress(self, n: int) -> None:
        self.received += n
        for cb in list(self.listeners):
            cb(n)

    def set_total(self, size: int) -> None:
        for cb in list(self.listeners):
            hook = getattr(cb, "set_total", None)
            if hook is not None:
                hook(size)


#: The transfers in flight, by SHA-256: shared by Downloaders that join each other's.
Transfers = dict[Sha256, _Transfer]


def _parse_content_range(value: str | None) -> tuple[int, int, int | None] | None:
    """``bytes a-b/total`` -> (a, b, total or None)."""
    if not value or not value.startswith("bytes "):
        return None
    span, _, total = value[6:].partition("/")
    first, _, last = span.partition("-")
    try:
        return int(first), int(last), (None if total.strip() == "*" else int(total))
    except ValueError:
        return None


def _is_html(response: httpx.Response) -> bool:
    return response.headers.get("content-type", "").split(";")[0].strip().lower() in ("text/html",
                                                                                        "application/xhtml+xml")


class Downloader:
    """Fetches blobs into one store's ``blobs`` (partials in its ``partial/``). Use from
    one trio thread; close with :meth:`aclose`.

    ``auth`` is the per-URL credential hook (default: the hub token for the hub's
    origin, :func:`store.hf.auth_headers`); the other network options configure
    :attr:`http`, through which every request goes. ``wallclock`` (unix time) dates
    the remembered verification failures; ``retry_failed`` forgets them instead of
    refusing (``modelfs pull --retry``). ``addresses`` restricts where its requests may
    connect (a caller's URLs, :class:`~store.http.AddressRule`); ``transfers`` is the
    table of transfers in flight it shares with other Downloaders of the same store
    and event loop (default: its own)."""

    def __init__(self, blobs: BlobStore, *, offline: bool = False, stall_timeout: float = 30.0,
                 min_speed: tuple[int, float] | None = None, max_retries: int = 5,
                 transport: httpx.AsyncBaseTransport | None = None,
                 clock: Callable[[], float] = trio.current_time,
                 sleep: Callable[[float], Awaitable[None]] = trio.sleep,
                 backoff: tuple[float, float] = (0.5, 30.0), retry_after_cap: float = 60.0,
                 auth: Auth | None = None, verify: ssl.SSLContext | str | bool = True,
                 user_agent: str = "modelfs/0.1", rng: random.Random | None = None,
                 direct_io: bool = True, wallclock: Callable[[], float] = time.time,
                 retry_failed: bool = False, addresses: AddressRule | None = None,
                 transfers: Transfers | None = None) -> None:
        self.blobs = blobs
        self.stall_timeout = stall_timeout
        self.min_speed = min_speed
        self.clock = clock
        self.wallclock = wallclock          # unix time, for the remembered failures
        self.retry_failed = retry_failed    # forget remembered failures instead of refusing
        self.direct_io = direct_io
        if auth is None:
            from .hf import auth_headers
            auth = auth_headers
        retry = RetryPolicy(max_retries, backoff, retry_after_cap, sleep, rng or random.Random())
        self.http = Http(offline=offline, timeout=stall_timeout, transport=transport, verify=verify,
                         user_agent=user_agent, auth=auth, retry=retry, addresses=addresses)
        self.transfers: Transfers = {} if transfers is None else transfers

    @property
    def offline(self) -> bool:
        return self.http.offline

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> Downloader:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- public ----------------------------------------------------------------------
    async def ensure(self, rec: FileRecord, progress: Progress | None = None) -> FetchResult:
        """The blob of ``rec``, fetched from ``rec.url`` first if it is not local. The
        result carries the server's validators; recording them is the caller's
        (:meth:`store.core.Store.record_validators`)."""
        sha256 = check_sha256(rec.sha256)
        if self.blobs.has(sha256):
            return self._present(sha256)
        if not rec.url:
            raise NotFound(f"{rec.filename} is not in the store and has no source URL", sha256=rec.sha256)
        if f"={REDACTED}" in rec.url:
            raise FetchError(f"{rec.filename}: its source URL was signed and the signature was not stored; "
                             "pull it again with the full URL", sha256=rec.sha256)
        return await self.fetch(rec.url, sha256=sha256, size=rec.size, progress=progress)

    async def fetch(self, url: str, *, sha256: str, size: int | None,
                    headers: Mapping[str, str] | None = None, progress: Progress | None = None,
                    check: PrefixCheck | None = None) -> FetchResult:
        """Download ``url`` into the blob ``sha256`` (of ``size`` bytes, when known).

        ``progress(n)`` is called with byte deltas as they arrive (negative when a partial
        is discarded); when ``size`` is None and ``progress`` has a ``set_total(size)``
        method, it is told the size once the server states it. ``check`` sees the first
        bytes as they arrive and may refuse them (module docstring); a caller that joins a
        transfer already running in this process relies on that transfer's check.

        A registry blob (``oci://host/repo@sha256:…``, or an ``https://host/v2/…/blobs/sha256:…``
        URL) is fetched from the registry's blob URL with its auth (:func:`store.oci.prepare_blob`)."""
        sha = check_sha256(sha256)
        if not self.offline and not self.blobs.has(sha):
            url = await oci.prepare_blob(self.http, url, sha) or url
        return await self._fetch(url, sha, size, headers or {}, progress, check)

    async def _fetch(self, url: str, sha256: Sha256, size: int | None, headers: Mapping[str, str],
                     progress: Progress | None, check: PrefixCheck | None) -> FetchResult:
        if size is not None and size < 0:
            raise UsageError(f"invalid size {size}")
        blobs = self.blobs
        while True:
            if blobs.has(sha256):
                return self._present(sha256)
            if self.offline:
                raise OfflineError(f"blob {sha256[:12]}… is not local and the store is offline", sha256=sha256)
            self._refuse_if_failed(sha256, redact_url(url))
            joined = self.transfers.get(sha256)
            if joined is None:
                break
            if progress is not None:
                progress(joined.received)
                joined.listeners.append(progress)
            try:
                await joined.done.wait()
            finally:
                if progress is not None and progress in joined.listeners:
                    joined.listeners.remove(progress)
            if joined.result is not None:
                r = joined.result
                return FetchResult(r.sha256, r.size, r.path, False, r.etag, r.last_modified, 0)
            if joined.error is not None:
                err = joined.error
                raise type(err)(str(err), **err.fields)
            # The owner was cancelled (its deadline, not ours): take over from its partial,
            # whose bytes our own transfer reports again.
            if progress is not None:
                progress(-joined.received)

        transfer = _Transfer()
        if progress is not None:
            transfer.listeners.append(progress)
        self.transfers[sha256] = transfer
        try:
            result = await self._fetch_locked(url, sha256, size, headers, transfer, check)
            transfer.result = result
            return result
        except StoreError as exc:
            transfer.error = exc
            raise
        finally:
            del self.transfers[sha256]
            transfer.done.set()

    # -- one transfer ----------------------------------------------------------------------
    def _present(self, sha256: Sha256) -> FetchResult:
        path = self.blobs.path(sha256)
        return FetchResult(sha256, path.stat().st_size, path, False, None, None, 0)

    def _refuse_if_failed(self, sha256: Sha256, shown: str) -> None:
        """IntegrityError while the remembered failed verification of ``sha256`` backs off
        (:mod:`store.failures`); with ``retry_failed``, forget it instead."""
        layout = self.blobs.layout
        if self.retry_failed:
            failures.forget(layout, sha256)
            return
        mem = failures.load(layout, sha256)
        if mem is None or not mem.blocks(self.wallclock()):
            return
        raise IntegrityError(
            f"{shown}: not fetched again before {failures.when(mem.retry_at)}: its download failed verification "
            f"{mem.failures} time(s), last at {failures.when(mem.last_failed_at)} ({mem.reason}); "
            "`modelfs pull --retry` tries now", sha256=sha256, retry_at=mem.retry_at, failures=mem.failures,
            reason="backoff")

    async def _fetch_locked(self, url: str, sha256: Sha256, size: int | None, headers: Mapping[str, str],
                            transfer: _Transfer, check: PrefixCheck | None) -> FetchResult:
        files = self.blobs.partial_files(sha256)
        directory = files.lock
        lock = PartialLock.try_acquire(directory)
        delay = 0.01
        while lock is None:
            # Poll rather than park a thread in flock(): cancellable at every step.
            if delay == 0.01:
                log.info("another process is downloading %s…; waiting for it", sha256[:12])
            await trio.sleep(delay)
            delay = min(delay * 2, 0.25)
            lock = PartialLock.try_acquire(directory)
        try:
            if self.blobs.has(sha256):  # the other process finished it
                return self._present(sha256)
            self._refuse_if_failed(sha256, redact_url(url))  # another process may just have failed it
            return await self._transfer(url, sha256, size, headers, transfer, files, check)
        finally:
            remove_empty(directory)  # nothing left to resume: no empty partial/<sha>/ stays behind
            lock.release()

    async def _transfer(self, url: str, sha256: Sha256, size: int | None, headers: Mapping[str, str],
                        transfer: _Transfer, files: PartialFiles, check: PrefixCheck | None) -> FetchResult:
        shown = redact_url(url)
        st = _State(check)
        integrity_restarts = 0
        while True:
            sink = await Sink.open(self.blobs, files, sha256, shown, size, direct_io=self.direct_io)
            sink.start()
            try:
                if sink.resumed_from:
                    transfer.progress(sink.resumed_from)
                st.high = sink.resumed_from
                await self._checked_attempts(url, sink, size, headers, transfer, st)
                expected = size if size is not None else sink.state.size
                try:
                    committed = await sink.commit(expected)
                except IntegrityError as exc:
                    transfer.progress(-sink.written)
                    if integrity_restarts:
                        raise self._failed_twice(exc, sha256, shown, st) from exc
                    integrity_restarts += 1
                    st.reset_check()
                    log.warning("download of %s failed verification (%s); quarantined, fetching again "
                                "from zero", shown, exc)
                    continue
                failures.forget(self.blobs.layout, sha256)
                return FetchResult(sha256, committed.size, committed.path, committed.new,
                                   sink.state.etag, sink.state.last_modified, st.received)
            finally:
                with trio.CancelScope(shield=True):
                    await sink.close()

    def _failed_twice(self, exc: IntegrityError, sha256: Sha256, shown: str, st: _State) -> IntegrityError:
        """The second failed verification of one fetch: remembered, so no caller pays for it
        again before the backoff expires (:mod:`store.failures`)."""
        hint = " (the server sent an HTML page: a captive portal or login page?)" if st.html else ""
        mem = failures.remember(self.blobs.layout, sha256, reason=str(exc), url=shown, now=self.wallclock())
        return IntegrityError(
            f"download of {shown} failed verification twice ({exc}){hint}; the bytes are in quarantine; no new "
            f"attempt before {failures.when(mem.retry_at)} (`modelfs pull --retry` tries now)",
            **{**exc.fields, "retry_at": mem.retry_at, "failures": mem.failures})

    async def _checked_attempts(self, url: str, sink: Sink, size: int | None, headers: Mapping[str, str],
                                transfer: _Transfer, st: _State) -> None:
        """:meth:`_attempts`, after the check has seen what a resumed partial holds; bytes
        the check refuses are deleted with their partial, and its error raised."""
        try:
            if st.check is not None and sink.resumed_from:
                try:
                    await trio.to_thread.run_sync(_feed_prefix, st.check, sink.data_path, sink.resumed_from,
                                                  size if size is not None else sink.state.size)
                except StoreError as exc:
                    raise _Refused(exc) from None
            await self._attempts(url, sink, size, headers, transfer, st)
        except _Refused as r:
            await self._reset(sink, st, transfer, f"refused: {r.error}")
            raise r.error from None

    async def _reset(self, sink: Sink, st: _State, transfer: _Transfer, reason: str) -> None:
        """Discard the partial: the next bytes are the file's first."""
        transfer.progress(-await sink.reset(reason))
        st.reset_check()

    async def _attempts(self, url: str, sink: Sink, size: int | None, headers: Mapping[str, str],
                        transfer: _Transfer, st: _State) -> None:
        in_a_row = 0
        restarts = 0
        while True:
            expected = size if size is not None else sink.state.size
            if expected is not None and sink.total == expected and sink.total > 0:
                return  # everything is here already (e.g. a crash just before the commit)
            if expected is not None:
                sink.check_space(expected - sink.total)  # refuse before the first byte
            try:
                await self._attempt(url, sink, size, headers, transfer, st)
                return
            except _Restart as r:
                restarts += 1
                if restarts > 3:
                    raise FetchError(f"{redact_url(url)}: the server keeps answering ranges inconsistently") from None
                await self._reset(sink, st, transfer, str(r))
                continue
            except _Retry as r:
                # Only new bytes are progress: past the most the partial ever held. A failure
                # after progress (a dropped connection mid-file) starts the count again, so a
                # flaky link still finishes a 40 GB file; one that sends the same first bytes
                # again and again does not. ``max_retries=0`` never retries.
                new = sink.total - st.high
                st.high = max(st.high, sink.total)
                in_a_row = 0 if new >= MIN_PROGRESS else in_a_row + 1
                policy = self.http.retry
                if policy.max_retries == 0 or in_a_row > policy.max_retries:
                    raise _gave_up(r.error, in_a_row) from None
                delay = policy.delay(in_a_row or 1, r.retry_after)
                log.warning("%s; retrying in %.1fs (%d/%d)", r.error, delay, in_a_row, policy.max_retries)
                await policy.sleep(delay)

    async def _attempt(self, url: str, sink: Sink, size: int | None, headers: Mapping[str, str],
                       transfer: _Transfer, st: _State) -> None:
        shown = redact_url(url)
        start = sink.total
        # Ours to set: the bytes must arrive exactly as stored (no content coding), and
        # the range is the partial's.
        req = {k: v for k, v in headers.items() if k.lower() not in ("range", "if-range", "accept-encoding")}
        req["Accept-Encoding"] = "identity"
        if start:
            req["Range"] = f"bytes={start}-"
            validator = sink.if_range()
            if validator:
                req["If-Range"] = validator
        response = await self._open(url, req, shown)
        try:
            body_from = self._check_response(response, sink, start, size, shown)
            st.html = _is_html(response)
            if body_from == 0 and start:
                await self._reset(sink, st, transfer, "the server sent the whole file (200) to a Range request")
            expected = size if size is not None else sink.state.size
            if size is None and expected is not None:
                transfer.set_total(expected)
            sink.check_space((expected or 0) - sink.total)
            if body_from == 0:
                sink.set_validators(response.headers.get("etag"), response.headers.get("last-modified"))
                await sink.save_state()  # resumable from its first bytes, with the validators
            await self._stream(response, sink, expected, transfer, st, shown)
        finally:
            with trio.CancelScope(shield=True):
                await response.aclose()

    def _check_response(self, response: httpx.Response, sink: Sink, start: int, size: int | None,
                        shown: str) -> int:
        """Decide what a response means; returns the offset its body starts at."""
        status = response.status_code
        host = response.url.host
        transient = status_error(response, shown)
        if transient is not None:
            raise _Retry.of(transient)
        if status == 416:
            if start:
                raise _Restart("the server cannot serve the rest of the partial (416)")
            raise FetchError(f"{shown}: HTTP 416 for a request of the whole file", status=status)
        if status in (401, 403):
            raise FetchError(f"{shown}: HTTP {status}: access denied by {host} (missing or wrong credentials?)",
                             status=status)
        if status == 404:
            raise FetchError(f"{shown}: HTTP 404: not found on {host}", status=status)
        if status not in (200, 206):
            raise FetchError(f"{shown}: unexpected HTTP {status} from {host}", status=status)

        etag = response.headers.get("etag")
        last_modified = response.headers.get("last-modified")
        expected = size if size is not None else sink.state.size
        if status == 206:
            cr = _parse_content_range(response.headers.get("content-range"))
            if not start or cr is None or cr[0] != start:
                raise _Restart(f"206 with Content-Range {response.headers.get('content-range')!r} "
                               f"for a request from byte {start}")
            total = cr[2]
            if expected is not None and total is not None and total != expected:
                raise FetchError(f"{shown}: the server says the file has {total} bytes, expected {expected}",
                                 got=total, expected=expected)
            changed = ((etag and sink.state.etag and etag != sink.state.etag) or
                       (last_modified and sink.state.last_modified and last_modified != sink.state.last_modified))
            if changed:
                raise _Restart("the file changed on the server (its validator differs)")
            if expected is None and total is not None:
                sink.state.size = total
            if etag or last_modified:
                sink.set_validators(etag or sink.state.etag, last_modified or sink.state.last_modified)
            return start

        # 200: the whole file. Check it is plausibly the file before dropping a partial for it.
        length = response.headers.get("content-length")
        clen = int(length) if length and length.isdigit() else None
        if expected is not None and clen is not None and clen != expected:
            if _is_html(response):
                raise FetchError(f"{shown}: the server sent an HTML page ({clen} bytes) instead of the file "
                                 "(a captive portal or login page?)", got=clen, expected=expected)
            raise FetchError(f"{shown}: the server offers {clen} bytes, expected {expected}",
                             got=clen, expected=expected)
        if expected is None:
            if clen is None:
                raise FetchError(f"{shown}: the server did not say how large the file is; give its size")
            sink.state.size = clen
        return 0

    async def _open(self, url: str, headers: dict[str, str], shown: str) -> httpx.Response:
        """Send the GET through the HTTP layer; returns the final (streaming) response. A
        registry blob's auth is renewed first when its token is near expiry (a long
        transfer resumed after the token's lifetime; a no-op otherwise)."""
        try:
            await oci.renew_blob_auth(self.http, url)
            return await self.http.open("GET", url, headers, shown)
        except FetchError as exc:
            if is_transient(exc):
                raise _Retry.of(exc) from None
            raise

    async def _stream(self, response: httpx.Response, sink: Sink, expected: int | None, transfer: _Transfer,
                      st: _State, shown: str) -> None:
        """Copy the body into the sink, watching for stalls and a too-low rate."""
        host = response.url.host
        stream = response.extensions.get("network_stream")
        stream = stream if isinstance(stream, BigReadStream) else None
        # A plain-TCP body of known length is read straight off the socket once h11 has
        # handed over what it buffered with the headers: no h11 copies, no per-read
        # layers. The connection is closed afterwards (h11 never saw the end).
        direct = (stream is not None and stream.direct and expected is not None
                  and "content-length" in response.headers and "transfer-encoding" not in response.headers
                  and int(response.headers["content-length"]) == expected - sink.total)
        watch = _Watch(self, self.clock())
        try:
            with trio.CancelScope() as watch.scope, self.http.body_errors(response, shown, lambda: sink.total):
                watch.arm()
                async for chunk in response.aiter_raw():
                    n = len(chunk)
                    if expected is not None and sink.total + n > expected:
                        await self._reset(sink, st, transfer, "the server sent more bytes than expected")
                        raise FetchError(f"{shown}: the server sent more than the expected {expected} bytes",
                                         expected=expected)
                    st.take(chunk, expected, shown)
                    await sink.write(chunk)
                    if stream is not None and expected is not None:
                        # Every byte read from the socket so far has been delivered (h11
                        # hands over its buffer before it reads again), so this is exact.
                        stream.expect(expected - sink.total)
                    transfer.progress(n)
                    watch.got(n)
                    if direct and expected is not None and sink.total < expected:
                        assert stream is not None
                        await self._read_direct(stream, sink, expected, transfer, st, watch, shown)
                        break
        except FetchError as exc:
            if not is_transient(exc):
                raise
            raise _Retry.of(exc) from None
        finally:
            if stream is not None:
                stream.expect(None)  # the connection may carry another response next
        if watch.scope.cancelled_caught:
            if watch.too_slow():
                amount, seconds = self.min_speed or (0, 0)
                raise _Retry(FetchError(f"{shown}: download from {host} too slow (under {amount} bytes in "
                                        f"{seconds:g}s)"))
            raise _Retry(FetchError(f"{shown}: download from {host} stalled (no data for "
                                    f"{self.stall_timeout:g}s)"))
        if expected is not None and sink.total < expected:
            raise _Retry(FetchError(f"{shown}: connection to {host} closed after {sink.total} of {expected} "
                                    "bytes"))

    async def _read_direct(self, stream: BigReadStream, sink: Sink, expected: int, transfer: _Transfer,
                           st: _State, watch: _Watch, shown: str) -> None:
        """The rest of the body, from the socket into pooled buffers handed to the sink."""
        while sink.total < expected:
            buf = sink.take_buffer()
            view = memoryview(buf)
            want = min(len(buf), expected - sink.total)
            if want < expected - sink.total:
                # End on a block boundary, so every later buffer starts aligned (O_DIRECT).
                want -= (sink.total + want) % ALIGN or 0
            fill = 0
            try:
                while fill < want:
                    stream.expect(want - fill)
                    n = await stream.recv_into(view[fill:want])
                    st.take(view[fill:fill + n], expected, shown)
                    fill += n
                    transfer.progress(n)
                    watch.got(n)
            finally:
                await sink.write(view[:fill], owned=buf)


class _Watch:
    """The body watchdog: a cancel scope whose deadline is the earlier of "no byte for
    ``stall_timeout``" and "fewer than ``min_speed`` bytes in the current window"."""

    def __init__(self, dl: Downloader, now: float) -> None:
        self.dl = dl
        self.scope = trio.CancelScope()
        self.window_start = now
        self.window_bytes = 0

    def arm(self, now: float | None = None) -> None:
        now = self.dl.clock() if now is None else now
        deadline = now + self.dl.stall_timeout
        if self.dl.min_speed is not None:
            deadline = min(deadline, self.window_start + self.dl.min_speed[1])
        # The scope runs on trio's clock; ``clock`` may be another (injected) one.
        self.scope.deadline = trio.current_time() + (deadline - now)

    def got(self, n: int) -> None:
        now = self.dl.clock()
        self.window_bytes += n
        if self.dl.min_speed is not None and self.window_bytes >= self.dl.min_speed[0]:
            self.window_start, self.window_bytes = now, 0
        self.arm(now)

    def too_slow(self) -> bool:
        return self.dl.min_speed is not None and self.dl.clock() >= self.window_start + self.dl.min_speed[1]
