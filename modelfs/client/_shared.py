"""The shared store as a manager: :class:`SharedStoreManager`, over the daemon's socket.

Every call is a request on the control socket (``docs/api.md``, "The client API"):
``POST /v1/ensure`` answers the caller's entry at once, or a pull job and a waiter
number; the manager follows the job (``GET /v1/pulls/ID``) and reports its stages and
bytes, then reads the entry (``GET /v1/entries/NAME``). ``cancel()`` detaches its
waiter (``POST /v1/pulls/ID/detach``): the daemon stops the transfer only when no
waiter is left.

Who the caller is comes from the socket's peer credentials, never from an argument:
this module sends no app id. Paths in its entries point into the mount; what it sees
is what the trust rules let it see (its own entries, shared ones, granted ones).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from modelfs.mount.socketclient import ControlClient
from modelfs_store.blobs import hash_file
from modelfs_store.errors import NotFound, StoreError, UsageError
from modelfs_store.redact import redact_text

from ._entry import ModelCacheEntry
from ._manager import Cancelled, CancelToken, DownloadEvent, Entries, OnProgress, Stage
from ._source import CachePolicy, ModelLoadOptions, ModelSource, SourceKind

log = logging.getLogger(__name__)

POLL = 0.1          # seconds between looks at a job
WAITING = ("queued", "paused", "needs_credentials")


class SharedStoreManager:
    """The store behind the daemon at ``socket`` (module docstring)."""

    kind = "shared"

    def __init__(self, socket: Path, *, reason: str = "", poll: float = POLL) -> None:
        self.socket = Path(socket)
        self.reason = reason or f"the daemon at {socket} answered"
        self.poll = poll
        self._client = ControlClient(self.socket, timeout=60.0)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<SharedStoreManager {self.socket} ({self.reason})>"

    def close(self) -> None:
        self._client.close()

    def call(self, method: str, route: str, body: dict[str, Any] | None = None) -> Any:
        with self._lock:
            return self._client.call(method, route, body)

    # -- ensure ------------------------------------------------------------------------------
    def ensure_model(self, source: ModelSource, options: ModelLoadOptions | None = None,
                     on_progress: OnProgress | None = None, *, mmproj: ModelSource | None = None,
                     keep_awake: bool = False, background: bool = False,
                     cancel: CancelToken | None = None) -> ModelCacheEntry:
        """The caller's entry for ``source`` in the shared store, pulled by the daemon when
        the store lacks it (no download when the bytes are already there, whoever pulled
        them). ``keep_awake`` and ``background`` go to the job, for the daemon's gates."""
        options = options or ModelLoadOptions()
        cancel = cancel or CancelToken()
        emit = on_progress or (lambda e: None)
        emit(DownloadEvent(Stage.RESOLVING))
        cancel.check()
        ans = self.call("POST", "/v1/ensure", self._request(source, options, mmproj, keep_awake, background))
        emit(DownloadEvent(Stage.CHECKING_CACHE))
        if ans.get("entry") is not None:
            entry = ModelCacheEntry.from_json(ans["entry"])
            emit(DownloadEvent(Stage.READY, entry.bytes, entry.bytes))
            return entry
        if options.cache_policy is CachePolicy.CACHE_ONLY:
            self._detach(ans["job"]["id"], ans["waiter"])
            raise NotFound(f"{source.file_name} is not in the shared store (cache_only)", cache_key=source.cache_key)
        job = self._follow(ans["job"], ans["waiter"], emit, cancel)
        done = self.get(ans.get("name") or job["model"])
        if done is None:
            raise StoreError(f"the daemon pulled {job['model']!r} but does not show it to this caller")
        emit(DownloadEvent(Stage.READY, done.bytes, done.bytes))
        return done

    def _request(self, source: ModelSource, options: ModelLoadOptions, mmproj: ModelSource | None,
                 keep_awake: bool, background: bool) -> dict[str, Any]:
        if source.kind is SourceKind.PATH:
            raise UsageError("the shared store takes no local path from an app: use import_model (the store's "
                             "owner) or an http(s) or hf:// source")
        body: dict[str, Any] = {"source": source.spec, "sha256": options.sha256, "size": options.size,
                                "token": options.bearer_token, "name": options.name,
                                "keep_awake": keep_awake or None, "background": background or None}
        if source.kind is SourceKind.PACK:
            body["pack"] = True
        if options.cache_policy in (CachePolicy.REFRESH, CachePolicy.NO_CACHE):
            body["refresh"] = True
        if mmproj is not None:
            body.update(mmproj=mmproj.spec, mmproj_sha256=options.mmproj_sha256)
        return {k: v for k, v in body.items() if v is not None}

    def _follow(self, job: dict[str, Any], waiter: int, emit: OnProgress, cancel: CancelToken) -> dict[str, Any]:
        """Follow ``job`` until it ends; on cancel, detach and raise Cancelled."""
        received = 0
        while True:
            state = job["state"]
            if state == "done":
                emit(DownloadEvent(Stage.VERIFYING, received, job.get("bytes_total")))
                return job
            if state == "failed":
                err = StoreError(redact_text(job.get("reason") or "the pull failed"), job=job["id"])
                err.exit_code = job.get("exit_code") or 1
                raise err
            if state == "cancelled":
                raise Cancelled(f"the store's pull job {job['id']} was cancelled ({job.get('reason') or 'cancelled'})")
            received = max(received, job.get("bytes_done") or 0)
            wait = state if state != "running" else None
            emit(DownloadEvent(Stage.DOWNLOADING, received, job.get("bytes_total"), wait_reason=wait))
            if cancel.wait(self.poll):
                self._detach(job["id"], waiter)
                raise Cancelled(f"detached from the store's pull job {job['id']}; it goes on while another "
                                "caller waits for it")
            job = self.call("GET", f"/v1/pulls/{job['id']}")

    def _detach(self, job_id: int, waiter: int) -> None:
        try:
            self.call("POST", f"/v1/pulls/{job_id}/detach", {"waiter": waiter})
        except StoreError as exc:
            log.warning("could not detach from pull job %d: %s", job_id, exc)

    # -- the entries -------------------------------------------------------------------------
    def list(self) -> list[ModelCacheEntry]:
        return [ModelCacheEntry.from_json(e) for e in self.call("GET", "/v1/entries")]

    def _find(self, key: str) -> ModelCacheEntry:
        """By name, else by cache key (the caller's own entry first)."""
        entries = self.list()
        found = [e for e in entries if e.name == key] or sorted(
            (e for e in entries if e.cache_key == key), key=lambda e: e.owner != "app")
        if not found:
            raise NotFound(f"no entry {key[:16]!r} that this caller sees", cache_key=key)
        return found[0]

    def get(self, cache_key: str) -> ModelCacheEntry | None:
        try:
            return self._find(cache_key)
        except NotFound:
            return None

    def remove(self, cache_key: str) -> bool:
        """Remove the caller's own entry (the daemon refuses another's: 403). The bytes
        stay while another entry uses them."""
        try:
            entry = self._find(cache_key)
        except NotFound:
            return False
        self.call("DELETE", f"/v1/models/{entry.name}")
        return True

    def clear(self) -> int:
        own = [e for e in self.list() if e.owner == "app"]
        for e in own:
            self.call("DELETE", f"/v1/models/{e.name}")
        return len(own)

    def prune(self, *, max_age: float | None = None, max_bytes: int | None = None) -> Entries:
        before = {e.name: e for e in self.list()}
        ans = self.call("POST", "/v1/prune", {"max_age": max_age, "max_bytes": max_bytes})
        return [before[r["name"]] for r in ans["removed"] if r["name"] in before]

    def import_model(self, path: Path, *, name: str | None = None) -> ModelCacheEntry:
        raise UsageError("the daemon reads no local file for a caller: the store's owner imports one with "
                         "`modelfs import NAME FILE`")

    def validate(self, cache_key: str) -> bool:
        """Hash the entry's file again, read through the mount."""
        entry = self._find(cache_key)
        try:
            sha, size = hash_file(Path(entry.file_path))
        except OSError:
            return False
        return sha == entry.sha256 and size == entry.bytes

    def select(self, cache_key: str) -> ModelCacheEntry:
        """The app's chosen model: its use is recorded (the store's LRU prune sees it)."""
        entry = self._find(cache_key)
        return ModelCacheEntry.from_json(self.call("POST", f"/v1/entries/{entry.name}/use"))
