"""The progress of one download: :class:`ModelDownloadController`, llamadart's
``ModelDownloadController`` with Python names.

``start(source, options)`` runs the manager's ``ensure_model`` in a worker thread and
turns its events into :class:`DownloadSnapshot` values: llamadart's stages in order
(idle, resolving, checking_cache, downloading, verifying, then ready, failed or
cancelled), the bytes received (never going back within a run) and expected, the
entry once ready, the error (redacted) once failed, and beyond llamadart the reason
of a wait (``queued``, ``queued_power``...). ``retry()`` starts the last download
again, ``cancel()`` detaches this controller (a shared transfer goes on for other
waiters), ``dispose()`` cancels and forgets.

Two faces: blocking (``wait()``, ``snapshots()``) and async (``await wait_async()``,
``async for s in snapshots_async()``), the latter with anyio, so it works under
trio and asyncio alike. Listeners (``listen``) are called from the worker thread.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import anyio
import anyio.to_thread

from modelfs_store.errors import Conflict, StoreError
from modelfs_store.redact import redact_text

from ._entry import ModelCacheEntry
from ._manager import ORDER, Cancelled, CancelToken, DownloadEvent, ModelDownloadManager, Stage
from ._source import ModelLoadOptions, ModelSource

FINAL = frozenset({Stage.READY, Stage.FAILED, Stage.CANCELLED})


@dataclass(frozen=True)
class DownloadSnapshot:
    stage: Stage
    source: ModelSource | None = None
    entry: ModelCacheEntry | None = None
    received_bytes: int = 0
    total_bytes: int | None = None
    error: str | None = None
    wait_reason: str | None = None

    @property
    def progress(self) -> float | None:
        """0..1 when the total is known."""
        return self.received_bytes / self.total_bytes if self.total_bytes else None

    @property
    def is_final(self) -> bool:
        return self.stage in FINAL


class ModelDownloadController:
    """One download at a time through ``manager`` (module docstring)."""

    def __init__(self, manager: ModelDownloadManager) -> None:
        self.manager = manager
        self._cond = threading.Condition()
        self._history: list[DownloadSnapshot] = [DownloadSnapshot(Stage.IDLE)]
        self._listeners: list[Callable[[DownloadSnapshot], None]] = []
        self._thread: threading.Thread | None = None
        self._token: CancelToken | None = None
        self._last: tuple[ModelSource, ModelLoadOptions | None, dict[str, Any]] | None = None
        self._disposed = False

    @property
    def snapshot(self) -> DownloadSnapshot:
        with self._cond:
            return self._history[-1]

    def listen(self, callback: Callable[[DownloadSnapshot], None]) -> Callable[[], None]:
        """Call ``callback`` with every new snapshot; returns the undo."""
        with self._cond:
            self._listeners.append(callback)
        return lambda: self._listeners.remove(callback) if callback in self._listeners else None

    # -- control -----------------------------------------------------------------------------
    def start(self, source: ModelSource, options: ModelLoadOptions | None = None, **ensure: Any) -> None:
        """Start ensuring ``source`` (``ensure``: ``mmproj``, ``keep_awake``, ``background``)."""
        with self._cond:
            if self._disposed:
                raise Conflict("this controller was disposed")
            if self._thread is not None and self._thread.is_alive():
                raise Conflict("a download is running: cancel it first")
            self._last = (source, options, ensure)
            self._token = token = CancelToken()
            self._history = [DownloadSnapshot(Stage.IDLE, source)]
            self._cond.notify_all()
            self._thread = threading.Thread(target=self._run, args=(source, options, ensure, token),
                                            name=f"ensure-{source.file_name}", daemon=True)
            self._thread.start()

    def retry(self) -> None:
        if self._last is None:
            raise Conflict("nothing to retry: start a download first")
        source, options, ensure = self._last
        self.start(source, options, **ensure)

    def cancel(self) -> None:
        if self._token is not None:
            self._token.cancel()

    def dispose(self) -> None:
        self.cancel()
        with self._cond:
            self._disposed = True
            thread = self._thread
        if thread is not None:
            thread.join()
        self._listeners.clear()

    # -- the run -----------------------------------------------------------------------------
    def _run(self, source: ModelSource, options: ModelLoadOptions | None, ensure: dict[str, Any],
             token: CancelToken) -> None:
        try:
            entry = self.manager.ensure_model(source, options, self._event, cancel=token, **ensure)
        except Cancelled:
            self._push(replace(self.snapshot, stage=Stage.CANCELLED, wait_reason=None))
        except StoreError as exc:
            self._push(replace(self.snapshot, stage=Stage.FAILED, error=redact_text(str(exc)), wait_reason=None))
        except Exception as exc:  # noqa: BLE001 - a snapshot says it; the thread must not die silently
            self._push(replace(self.snapshot, stage=Stage.FAILED, wait_reason=None,
                               error=f"internal error ({type(exc).__name__}): {redact_text(str(exc))}"))
        else:
            self._push(replace(self.snapshot, stage=Stage.READY, entry=entry, received_bytes=max(
                self.snapshot.received_bytes, entry.bytes), total_bytes=entry.bytes, wait_reason=None))

    def _event(self, e: DownloadEvent) -> None:
        prev = self.snapshot
        if ORDER[e.stage] < ORDER[prev.stage] or e.stage in FINAL:
            return  # stages only go forward; the end is the run's to say
        received = max(prev.received_bytes, e.received_bytes)
        total = e.total_bytes if e.total_bytes is not None else prev.total_bytes
        self._push(replace(prev, stage=e.stage, received_bytes=received, total_bytes=total,
                           wait_reason=e.wait_reason))

    def _push(self, snap: DownloadSnapshot) -> None:
        with self._cond:
            if self._history and self._history[-1] == snap:
                return
            self._history.append(snap)
            listeners = list(self._listeners)
            self._cond.notify_all()
        for cb in listeners:
            cb(snap)

    # -- waiting: blocking -------------------------------------------------------------------
    def wait(self, timeout: float | None = None) -> DownloadSnapshot:
        """The final snapshot of the current run (or the latest one at ``timeout``)."""
        with self._cond:
            self._cond.wait_for(lambda: self._history[-1].is_final, timeout)
            return self._history[-1]

    def snapshots(self) -> Iterator[DownloadSnapshot]:
        """Every snapshot of the current run from its start, as they come, until it ends."""
        i = 0
        while True:
            with self._cond:
                self._cond.wait_for(lambda n=i: len(self._history) > n)  # type: ignore[misc]
                batch = self._history[i:]
            for snap in batch:
                yield snap
                if snap.is_final:
                    return
            i += len(batch)

    # -- waiting: async (anyio: trio or asyncio) ---------------------------------------------
    async def wait_async(self) -> DownloadSnapshot:
        """:meth:`wait` without blocking the event loop; cancelling it cancels the download."""
        try:
            while True:
                snap = await anyio.to_thread.run_sync(self.wait, 0.2)
                if snap.is_final:
                    return snap
        except anyio.get_cancelled_exc_class():
            self.cancel()
            raise

    async def snapshots_async(self) -> AsyncIterator[DownloadSnapshot]:
        i = 0
        while True:
            with self._cond:
                batch = self._history[i:]
            for snap in batch:
                yield snap
                if snap.is_final:
                    return
            i += len(batch)
            if not batch:
                await anyio.to_thread.run_sync(self._wait_more, i)

    def _wait_more(self, i: int) -> None:
        with self._cond:
            self._cond.wait_for(lambda: len(self._history) > i, 0.2)
