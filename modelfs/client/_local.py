"""The app-local cache: :class:`LocalModelDownloadManager`, in llamadart's own layout.

    <root>/<cache_directory_name>/          one entry per source (0700)
        <file_name>                         the verified file
        <file_name>.part                    the bytes of an unfinished download
        <file_name>.part.json               its resume state: redacted URL, validators, bytes
        <file_name>.part.written            how much of .part the writer wrote (see store.partial)
        metadata.json                       the ModelCacheEntry, llamadart's field names
    <root>/.modelfs/                        quarantine and remembered failed verifications

The root is the caller's ``cache_directory``, else ``$XDG_CACHE_HOME/llamadart/models``
(``~/.cache/llamadart/models``). llamadart's own default is the system temporary
directory, which a desktop empties at boot or after days: a model that vanishes is a
multi-gigabyte download again, so this manager does not use it.

Downloads go through the store's one downloader (:class:`~modelfs_store.download.Downloader`
over a :class:`_EntryBlobs`, which places the file and its partial here instead of in a
store): Range with If-Range on resume, SHA-256 and size checked before the file takes
its name, bytes that fail it quarantined, retries, redacted messages. A source needs
a known SHA-256 (given, or the hub's for ``hf://``): nothing unverified is ever
complete. Tokens are used per request, for the source's origin only, and never
written: ``metadata.json`` holds ``metadata_source_key``, not the URL.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import trio

from modelfs_store import hf, hfrepo
from modelfs_store.blobs import BlobStore, hash_file
from modelfs_store.download import Downloader, FetchResult
from modelfs_store.durable import atomic_write
from modelfs_store.errors import NotFound, StoreError, UsageError
from modelfs_store.layout import Layout
from modelfs_store.owner import read_small
from modelfs_store.partial import PartialFiles
from modelfs_store.pull import PullSource, resolve
from modelfs_store.shards import split_name

from ._entry import ModelCacheEntry
from ._manager import Cancelled, CancelToken, DownloadEvent, Entries, OnProgress, Stage
from ._source import CachePolicy, ModelLoadOptions, ModelSource, SourceKind

log = logging.getLogger(__name__)

METADATA = "metadata.json"
EVENT_EVERY = 0.1   # seconds between progress events of one download


def default_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "llamadart" / "models"


class _EntryBlobs(BlobStore):
    """A BlobStore whose one blob is an entry's file: its partial sits beside it
    (``NAME.part``...), its commit renames it into place. ``sha256`` None: whatever the
    bytes turn out to be (an import). Quarantine and remembered failures live under
    ``<root>/.modelfs``. Its files stay mutable: the app removes them itself, and no
    mount ever hands out a link to them."""

    freeze_blobs = False

    def __init__(self, root: Path, final: Path, present: str | None) -> None:
        layout = Layout(root / ".modelfs")
        for d in (layout.root, layout.quarantine, layout.partial, layout.tmp):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        super().__init__(layout, quarantine_cap=lambda: 0)  # an app's cache keeps no bad bytes around
        self.final = final
        self.present = present
        self.sha256: str | None = None

    def path(self, sha256: str) -> Path:
        return self.final if self.sha256 in (None, sha256) else super().path(sha256)

    def has(self, sha256: str) -> bool:
        return sha256 == self.present and super().has(sha256)

    def partial_files(self, sha256: str) -> PartialFiles:
        return PartialFiles.beside(self.final)


class _Bytes:
    """The Downloader's progress callback: byte deltas into DOWNLOADING events."""

    def __init__(self, emit: Callable[[DownloadEvent], None], total: int | None) -> None:
        self.emit = emit
        self.total = total
        self.received = 0
        self.last = 0.0

    def set_total(self, total: int) -> None:
        self.total = total

    def __call__(self, n: int) -> None:
        self.received = max(0, self.received + n)
        now = time.monotonic()
        if now - self.last >= EVENT_EVERY or self.received == self.total:
            self.last = now
            self.emit(DownloadEvent(Stage.DOWNLOADING, self.received, self.total))


def _auth(source: ModelSource, options: ModelLoadOptions) -> Callable[[str], Mapping[str, str]]:
    """Credentials for the source's origin only: the bearer token and extra headers; the
    hub's token (supplied, else the environment's) for the hub's origin."""
    origin = urlsplit(source.resolved_url or "")[:2]
    extra = dict(options.headers)
    hub = source.kind in (SourceKind.HUGGING_FACE, SourceKind.HUGGING_FACE_REPO)
    if options.bearer_token and not hub:
        extra["Authorization"] = f"Bearer {options.bearer_token}"

    def auth(url: str) -> Mapping[str, str]:
        out = dict(hf.auth_headers(url, options.bearer_token if hub else None))
        if urlsplit(url)[:2] == origin:
            out.update(extra)
        return out
    return auth


class LocalModelDownloadManager:
    """An app's own cache (module docstring). Thread-safe per entry: two processes that
    download one entry at once serialise on its directory's lock."""

    kind = "local"

    def __init__(self, cache_directory: Path | None = None, *, reason: str = "",
                 transport: httpx.AsyncBaseTransport | None = None,
                 clock: Callable[[], float] = time.time, downloader_options: dict[str, Any] | None = None) -> None:
        self.root = Path(cache_directory) if cache_directory is not None else default_root()
        self.reason = reason or "asked for the app-local cache"
        self.transport = transport
        self.clock = clock
        self.downloader_options = downloader_options or {}

    def __repr__(self) -> str:
        return f"<LocalModelDownloadManager {self.root} ({self.reason})>"

    def close(self) -> None:
        pass

    # -- ensure ------------------------------------------------------------------------------
    def ensure_model(self, source: ModelSource, options: ModelLoadOptions | None = None,
                     on_progress: OnProgress | None = None, *, mmproj: ModelSource | None = None,
                     keep_awake: bool = False, background: bool = False,
                     cancel: CancelToken | None = None) -> ModelCacheEntry:
        """The verified file of ``source`` in this cache, downloaded first when needed
        (``keep_awake`` and ``background`` are the shared store's; here the app's own
        process does the work while it runs)."""
        options = options or ModelLoadOptions()
        cancel = cancel or CancelToken()
        emit = on_progress or (lambda e: None)
        root = Path(options.cache_directory) if options.cache_directory is not None else self.root
        emit(DownloadEvent(Stage.RESOLVING))
        cancel.check()
        if source.kind is SourceKind.PATH:
            return self._path_entry(source, emit)
        if source.kind is SourceKind.PACK:
            raise UsageError("a signed pack needs the shared store (modelfs): the app-local cache takes "
                             "http(s) and hf:// sources")
        if source.kind is SourceKind.HUGGING_FACE_REPO:
            if mmproj is not None:
                raise UsageError("a hub repository's source chooses its own mmproj: pass no mmproj with it")
            return self._ensure_repo(root, source, options, emit, cancel)
        split = split_name(source.file_name)
        if split is not None and split.count > 1:
            # One file per entry here: a runtime handed one shard would not find the others.
            raise UsageError(f"{source.file_name} is one of {split.count} files of a split model: it needs the "
                             "shared store (modelfs), which keeps them together; the app-local cache takes "
                             "single-file models")
        companion = None
        if mmproj is not None:
            companion = self.ensure_model(mmproj, replace(options, sha256=options.mmproj_sha256, size=None), None,
                                          cancel=cancel)
        entry = self._ensure_file(root, source, options, emit, cancel)
        if companion is not None:
            entry = self._write(root / source.cache_directory_name, replace(entry, mmproj=companion))
        emit(DownloadEvent(Stage.READY, entry.bytes, entry.bytes))
        return entry

    def _ensure_repo(self, root: Path, source: ModelSource, options: ModelLoadOptions,
                     emit: Callable[[DownloadEvent], None], cancel: CancelToken) -> ModelCacheEntry:
        """A hub repository's quant: the cached entry when the policy allows (no network),
        else the hub's listing chooses the files (``store.hfrepo``), and the weights are
        fetched into the repository source's own entry, checked by the hub's LFS SHA-256
        and pinned to its commit; the mmproj, if any, becomes its companion entry. A split
        model is refused: this cache keeps one file per entry."""
        directory = root / source.cache_directory_name
        cached = self._read(directory)
        usable = cached is not None and _complete(cached)
        if options.cache_policy is CachePolicy.CACHE_ONLY or (
                usable and options.cache_policy is CachePolicy.PREFER_CACHED and options.sha256 is None):
            if cached is None or not usable:
                raise NotFound(f"{source.spec} is not in the cache (cache_only)", cache_key=source.cache_key)
            emit(DownloadEvent(Stage.READY, cached.bytes, cached.bytes))
            return cached
        plan = trio.run(self._resolve_repo, root, source, options)
        if any(f.role == "shard" for f in plan.files):
            raise UsageError(f"{source.spec}: the chosen weights are split into "
                             f"{sum(f.role != 'mmproj' for f in plan.files)} files: that needs the shared store "
                             "(modelfs), which keeps them together; the app-local cache takes single-file models")
        weights = next(f for f in plan.files if f.role == "weights")
        revision = plan.commit or plan.ref.revision
        companion = None
        for f in plan.files:
            if f.role == "mmproj":
                companion = self.ensure_model(ModelSource.hugging_face(plan.ref.repo, f.path, revision),
                                              replace(options, sha256=f.meta.sha256, size=f.meta.size),
                                              None, cancel=cancel)
        pinned = ModelSource.hugging_face(plan.ref.repo, weights.path, revision)
        entry = self._ensure_file(root, source, replace(options, sha256=weights.meta.sha256, size=weights.meta.size),
                                  emit, cancel, file_name=weights.filename, spec=pinned.spec)
        if companion is not None:
            entry = self._write(directory, replace(entry, mmproj=companion))
        emit(DownloadEvent(Stage.READY, entry.bytes, entry.bytes))
        return entry

    async def _resolve_repo(self, root: Path, source: ModelSource, options: ModelLoadOptions) -> hfrepo.RepoPlan:
        ref = hfrepo.parse_repo_ref(source.spec)
        async with Downloader(_EntryBlobs(root, root / ".resolve", None), auth=_auth(source, options),
                              max_retries=options.max_retries, transport=self.transport,
                              **self.downloader_options) as dl:
            return await hfrepo.resolve_repo(dl.http, ref)

    def _ensure_file(self, root: Path, source: ModelSource, options: ModelLoadOptions,
                     emit: Callable[[DownloadEvent], None], cancel: CancelToken, *, file_name: str | None = None,
                     spec: str | None = None) -> ModelCacheEntry:
        """``source``'s entry; ``file_name`` and ``spec`` name the file and what to fetch
        when they are not the source's own (a hub repository's chosen weights)."""
        file_name = file_name or source.file_name
        directory = root / source.cache_directory_name
        emit(DownloadEvent(Stage.CHECKING_CACHE))
        cached = self._read(directory)
        usable = cached is not None and _complete(cached)
        if options.cache_policy is CachePolicy.CACHE_ONLY:
            if cached is None or not usable:
                raise NotFound(f"{source.file_name} is not in the cache (cache_only)", cache_key=source.cache_key)
            return cached
        if usable and options.cache_policy is CachePolicy.PREFER_CACHED and cached is not None \
                and options.sha256 in (None, cached.sha256):
            return cached
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not options.resume:
            for p in PartialFiles.beside(directory / file_name).all():
                p.unlink(missing_ok=True)
        src, res = trio.run(self._fetch, root, directory, source, options,
                            cached.sha256 if usable and cached else None, emit, cancel, file_name, spec or source.spec)
        now = self.clock()
        entry = ModelCacheEntry(
            source.metadata_source_key, source.cache_key, file_name, str(res.path), res.size, res.sha256,
            res.etag or (cached.etag if cached else None),
            res.last_modified or (cached.last_modified if cached else None),
            cached.created_at if cached and cached.created_at else now, now,
            now if options.cache_policy is CachePolicy.NO_CACHE else None,
            card={"source_url": src.source_url or src.source})
        return self._write(directory, entry)

    async def _fetch(self, root: Path, directory: Path, source: ModelSource, options: ModelLoadOptions,
                     present: str | None, emit: Callable[[DownloadEvent], None], cancel: CancelToken,
                     file_name: str, spec: str) -> tuple[PullSource, FetchResult]:
        blobs = _EntryBlobs(root, directory / file_name, present)
        token = trio.lowlevel.current_trio_token()
        with trio.CancelScope() as scope:
            undo = cancel.on_cancel(lambda: token.run_sync_soon(scope.cancel))
            try:
                async with Downloader(blobs, auth=_auth(source, options), max_retries=options.max_retries,
                                      transport=self.transport, **self.downloader_options) as dl:
                    src = await resolve(dl, spec, role="weights", sha256=options.sha256, size=options.size)
                    blobs.sha256 = src.sha256
                    progress = _Bytes(emit, src.size)
                    emit(DownloadEvent(Stage.DOWNLOADING, 0, src.size))
                    res = await dl.fetch(src.url, sha256=src.sha256, size=src.size, headers={}, progress=progress)
                    emit(DownloadEvent(Stage.VERIFYING, res.size, res.size))
                    return src, res
            finally:
                undo()
        raise Cancelled(f"the download of {file_name} was cancelled; its partial bytes stay for a resume")

    def _path_entry(self, source: ModelSource, emit: Callable[[DownloadEvent], None]) -> ModelCacheEntry:
        path = Path(source.local_path or "")
        if not path.is_file():
            raise NotFound(f"{path} is not a file")
        emit(DownloadEvent(Stage.VERIFYING))
        sha, size = hash_file(path)
        st = path.stat()
        entry = ModelCacheEntry(source.metadata_source_key, source.cache_key, source.file_name, str(path), size,
                                sha, created_at=st.st_mtime, updated_at=st.st_mtime)
        emit(DownloadEvent(Stage.READY, size, size))
        return entry

    # -- the entries -------------------------------------------------------------------------
    def _read(self, directory: Path) -> ModelCacheEntry | None:
        try:
            return ModelCacheEntry.from_json(json.loads(read_small(directory / METADATA)))
        except (FileNotFoundError, NotADirectoryError, ValueError, StoreError, OSError):
            return None

    def _write(self, directory: Path, entry: ModelCacheEntry) -> ModelCacheEntry:
        """Write ``metadata.json``; returns the entry as it reads back (times in its precision)."""
        doc = entry.to_json()
        atomic_write(directory / METADATA, json.dumps(doc, indent=2, sort_keys=True).encode())
        return ModelCacheEntry.from_json(doc)

    def _entries(self) -> list[tuple[Path, ModelCacheEntry]]:
        try:
            dirs = sorted(self.root.iterdir())
        except FileNotFoundError:
            return []
        out = []
        for d in dirs:
            if d.name.startswith(".") or d.is_symlink() or not d.is_dir():
                continue
            entry = self._read(d)
            if entry is not None:
                out.append((d, entry))
        return out

    def _find(self, key: str) -> tuple[Path, ModelCacheEntry]:
        for d, entry in self._entries():
            if key in (entry.cache_key, d.name):
                return d, entry
        raise NotFound(f"no cache entry {key[:16]!r}", cache_key=key)

    def list(self) -> list[ModelCacheEntry]:
        return [e for _, e in self._entries()]

    def get(self, cache_key: str) -> ModelCacheEntry | None:
        try:
            return self._find(cache_key)[1]
        except NotFound:
            return None

    def remove(self, cache_key: str) -> bool:
        try:
            d, _ = self._find(cache_key)
        except NotFound:
            return False
        shutil.rmtree(d)  # never follows a link inside the entry
        return True

    def clear(self) -> int:
        entries = self._entries()
        for d, _ in entries:
            shutil.rmtree(d)
        return len(entries)

    def prune(self, *, max_age: float | None = None, max_bytes: int | None = None) -> Entries:
        """Least recently used first (``last_used_at`` of :meth:`select`, else
        ``updated_at``): entries older than ``max_age`` seconds, then while the cache
        holds more than ``max_bytes``. Expired entries (``no_cache``) always go."""
        now = self.clock()
        entries = sorted(self._entries(), key=lambda de: _last_use(de[1]))
        total = sum(e.bytes for _, e in entries)
        gone = []
        for d, e in entries:
            old = max_age is not None and _last_use(e) < now - max_age
            big = max_bytes is not None and total > max_bytes
            expired = e.expires_at is not None and e.expires_at <= now
            if old or big or expired:
                shutil.rmtree(d)
                total -= e.bytes
                gone.append(e)
        return gone

    def import_model(self, path: Path, *, name: str | None = None) -> ModelCacheEntry:
        """Copy a local file into the cache (hashed as it is copied), as its own entry."""
        source = ModelSource.path(Path(path).resolve())
        directory = self.root / source.cache_directory_name
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        blobs = _EntryBlobs(self.root, directory / source.file_name, None)
        committed = blobs.import_file(Path(path))
        now = self.clock()
        entry = ModelCacheEntry(source.metadata_source_key, source.cache_key, source.file_name, str(committed.path),
                                committed.size, committed.sha256, created_at=now, updated_at=now,
                                name=name)
        return self._write(directory, entry)

    def validate(self, cache_key: str) -> bool:
        """Hash the entry's file again: True when it still has its SHA-256."""
        _, entry = self._find(cache_key)
        try:
            sha, size = hash_file(Path(entry.file_path))
        except FileNotFoundError:
            return False
        return sha == entry.sha256 and size == entry.bytes

    def select(self, cache_key: str) -> ModelCacheEntry:
        """The app's chosen model, recorded as a use (its ``card.last_used_at``)."""
        d, entry = self._find(cache_key)
        return self._write(d, replace(entry, card={**entry.card, "last_used_at": self.clock()}))


def _complete(entry: ModelCacheEntry) -> bool:
    try:
        return os.stat(entry.file_path).st_size == entry.bytes
    except OSError:
        return False


def _last_use(entry: ModelCacheEntry) -> float:
    used = entry.card.get("last_used_at")
    return float(used) if isinstance(used, int | float) else (entry.updated_at or 0.0)
