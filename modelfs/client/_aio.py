"""The async face of a manager: :class:`AsyncModelDownloadManager`, for trio and asyncio.

Each call runs the manager's blocking call in a worker thread (anyio, which comes with
httpx), so it works under either event loop. Cancelling an awaiting ``ensure_model``
cancels its download (the :class:`CancelToken` it passed): a shared store's transfer
goes on while another waiter is left. The cancelled call returns once the worker has
detached, so nothing of it outlives the caller's cancel scope.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.to_thread

from ._entry import ModelCacheEntry
from ._manager import CancelToken, Entries, ModelDownloadManager, OnProgress
from ._source import ModelLoadOptions, ModelSource

T = TypeVar("T")


class AsyncModelDownloadManager:
    """``await``-able calls of ``manager`` (any :class:`ModelDownloadManager`)."""

    def __init__(self, manager: ModelDownloadManager) -> None:
        self.manager = manager

    @property
    def kind(self) -> str:
        return self.manager.kind

    @property
    def reason(self) -> str:
        return self.manager.reason

    def __repr__(self) -> str:
        return f"<async {self.manager!r}>"

    async def _run(self, fn: Callable[[], T], token: CancelToken | None = None) -> T:
        finished = threading.Event()

        def work() -> T:
            try:
                return fn()
            finally:
                finished.set()
        try:
            return await anyio.to_thread.run_sync(work, abandon_on_cancel=True)
        except anyio.get_cancelled_exc_class():
            if token is not None:
                token.cancel()
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(finished.wait)
            raise

    async def ensure_model(self, source: ModelSource, options: ModelLoadOptions | None = None,
                           on_progress: OnProgress | None = None, **ensure: Any) -> ModelCacheEntry:
        token = ensure.pop("cancel", None) or CancelToken()
        return await self._run(functools.partial(self.manager.ensure_model, source, options, on_progress,
                                                 cancel=token, **ensure), token)

    async def list(self) -> list[ModelCacheEntry]:
        return await self._run(self.manager.list)

    async def get(self, cache_key: str) -> ModelCacheEntry | None:
        return await self._run(functools.partial(self.manager.get, cache_key))

    async def remove(self, cache_key: str) -> bool:
        return await self._run(functools.partial(self.manager.remove, cache_key))

    async def clear(self) -> int:
        return await self._run(self.manager.clear)

    async def prune(self, *, max_age: float | None = None, max_bytes: int | None = None) -> Entries:
        return await self._run(functools.partial(self.manager.prune, max_age=max_age, max_bytes=max_bytes))

    async def import_model(self, path: Path, *, name: str | None = None) -> ModelCacheEntry:
        return await self._run(functools.partial(self.manager.import_model, path, name=name))

    async def validate(self, cache_key: str) -> bool:
        return await self._run(functools.partial(self.manager.validate, cache_key))

    async def select(self, cache_key: str) -> ModelCacheEntry:
        return await self._run(functools.partial(self.manager.select, cache_key))

    async def aclose(self) -> None:
        await self._run(self.manager.close)
