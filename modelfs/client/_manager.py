"""What every manager offers (:class:`ModelDownloadManager`, llamadart's
``ModelDownloadManager`` with Python names) and the small types its calls share.

A manager's calls are synchronous and may block (a download); the async face
(:mod:`modelfs.client._aio`) runs them in a worker thread. A call is cancelled
through the :class:`CancelToken` it was given: from any thread, it makes the call
raise :class:`Cancelled` at its next step, and a shared store's download stops only
when no other waiter is left (``docs/api.md``).

Progress is one callback, ``on_progress(DownloadEvent)``: the stage the call is in
(llamadart's stages, :class:`Stage`), bytes received and expected, and the reason of
a wait (``queued``, ``queued_power``...) when the store holds the download back.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from modelfs_store.errors import StoreError

from ._entry import ModelCacheEntry
from ._source import ModelLoadOptions, ModelSource


class Stage(enum.StrEnum):
    """llamadart's ``ModelDownloadStage``, in the order a download goes through them."""
    IDLE = "idle"
    RESOLVING = "resolving"
    CHECKING_CACHE = "checking_cache"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    READY = "ready"
    FAILED = "failed"
    CANCELLED = "cancelled"


ORDER = {s: i for i, s in enumerate(Stage)}


@dataclass(frozen=True)
class DownloadEvent:
    stage: Stage
    received_bytes: int = 0
    total_bytes: int | None = None
    wait_reason: str | None = None


OnProgress = Callable[[DownloadEvent], None]
Entries = list[ModelCacheEntry]   # (a class whose method is named ``list`` cannot say list[...] below it)


class Cancelled(StoreError):
    """The caller cancelled the download (it detached; the transfer may go on for others)."""
    exit_code = 130


class CancelToken:
    """Cancels one manager call from any thread."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._hooks: list[Callable[[], None]] = []

    def cancel(self) -> None:
        with self._lock:
            if self._event.is_set():
                return
            self._event.set()
            hooks, self._hooks = self._hooks, []
        for hook in hooks:
            hook()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float) -> bool:
        return self._event.wait(timeout)

    def on_cancel(self, hook: Callable[[], None]) -> Callable[[], None]:
        """Run ``hook`` when cancelled (at once if it already is); returns the undo."""
        with self._lock:
            if not self._event.is_set():
                self._hooks.append(hook)
                return lambda: self._drop(hook)
        hook()
        return lambda: None

    def _drop(self, hook: Callable[[], None]) -> None:
        with self._lock:
            if hook in self._hooks:
                self._hooks.remove(hook)

    def check(self) -> None:
        if self.cancelled:
            raise Cancelled("the download was cancelled")


class ModelDownloadManager(Protocol):
    """Ensure, list, get, remove and prune cached models; import, validate and select
    (beyond llamadart). ``kind`` says which manager it is (``shared`` or ``local``)."""

    kind: str
    reason: str

    def ensure_model(self, source: ModelSource, options: ModelLoadOptions | None = None,
                     on_progress: OnProgress | None = None, *, mmproj: ModelSource | None = None,
                     keep_awake: bool = False, background: bool = False,
                     cancel: CancelToken | None = None) -> ModelCacheEntry: ...

    def list(self) -> list[ModelCacheEntry]: ...

    def get(self, cache_key: str) -> ModelCacheEntry | None: ...

    def remove(self, cache_key: str) -> bool: ...

    def clear(self) -> int: ...

    def prune(self, *, max_age: float | None = None, max_bytes: int | None = None) -> Entries: ...

    def import_model(self, path: Path, *, name: str | None = None) -> ModelCacheEntry: ...

    def validate(self, cache_key: str) -> bool: ...

    def select(self, cache_key: str) -> ModelCacheEntry: ...

    def close(self) -> None: ...
