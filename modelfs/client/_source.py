"""Where a model comes from (:class:`ModelSource`) and how to load it (:class:`ModelLoadOptions`).

The shape is llamadart's ``ModelSource`` (``lib/src/core/models/model_source.dart``),
with Python names, so that a cache entry written by either maps one to one:

    source                               canonical_key
    ModelSource.path("/m/x.gguf")        path:/m/x.gguf
    ModelSource.url(URL)                 URL, whole (a signed URL's signature included)
    ModelSource.url(URL, file_name=F)    url:URL\\nfileName:F
    ModelSource.hugging_face(R, P, REV)  hf://R@REV/P (hf://R/P?revision=REV when REV has a "/")
    ModelSource.hugging_face_repo(R, Q)  hf://R:Q[@REV] (beyond llamadart: a quant of a hub repository)
    ModelSource.pack(ENVELOPE_URL)       pack:ENVELOPE_URL (beyond llamadart: a signed pack)

``cache_key`` is the SHA-256 of ``canonical_key``; ``cache_directory_name`` is
``<stem>-<cache_key[:12]>``; ``metadata_source_key`` is what may be written down (a URL
without its query, with the cache key to correlate it), never a secret.

A value object: no I/O, no network. Tokens live in :class:`ModelLoadOptions`, are
used at request time and are never stored; its ``repr`` hides them.
"""

from __future__ import annotations

import enum
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from modelfs_store import hfrepo
from modelfs_store.errors import UsageError
from modelfs_store.redact import redact_url

_REPO_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_BAD_REVISION = re.compile(r"[\x00-\x20\x7f~^:?*\[\\\]#]")
_BAD_FILE_NAME = re.compile(r'[<>:"/\\|?*\x00-\x1f]')


class SourceKind(enum.StrEnum):
    PATH = "path"
    HTTP = "http"
    HUGGING_FACE = "hugging_face"
    HUGGING_FACE_REPO = "hugging_face_repo"
    PACK = "pack"


@dataclass(frozen=True, repr=False)
class ModelSource:
    """One model file's origin. Build one with :meth:`path`, :meth:`url`,
    :meth:`hugging_face`, :meth:`pack` or :meth:`parse`."""
    kind: SourceKind
    file_name: str
    canonical_key: str
    local_path: str | None = None
    resolved_url: str | None = None   # may carry a signature, like canonical_key: neither is in repr
    repo_id: str | None = None
    revision: str | None = None
    file_path: str | None = None
    quant: str | None = None          # a hub repository's quant (``hugging_face_repo``); None: the default order

    # -- factories -------------------------------------------------------------------------
    @classmethod
    def path(cls, p: str | Path) -> ModelSource:
        p = str(p)
        if not p:
            raise UsageError("a model path must not be empty")
        name = p.replace("\\", "/").rsplit("/", 1)[-1] or "model.gguf"
        return cls(SourceKind.PATH, name, f"path:{p}", local_path=p)

    @classmethod
    def url(cls, url: str, file_name: str | None = None) -> ModelSource:
        _check_remote(url)
        name = _file_name(file_name) if file_name is not None else _file_name_of_url(url)
        key = url if file_name is None else f"url:{url}\nfileName:{name}"
        return cls(SourceKind.HTTP, name, key, resolved_url=url)

    @classmethod
    def hugging_face(cls, repo_id: str, file_path: str, revision: str = "main",
                     file_name: str | None = None) -> ModelSource:
        _check_repo(repo_id)
        _check_revision(revision)
        _check_file_path(file_path)
        name = _file_name(file_name or file_path.rsplit("/", 1)[-1])
        encoded = "/".join(quote(s, safe="") for s in file_path.split("/"))
        if "/" not in revision and revision == quote(revision, safe="") and file_path == encoded:
            key = f"hf://{repo_id}@{revision}/{file_path}"
        else:
            key = f"hf://{repo_id}/{encoded}?revision={quote(revision, safe='')}"
        url = f"https://huggingface.co/{repo_id}/resolve/{quote(revision, safe='')}/{encoded}?download=true"
        return cls(SourceKind.HUGGING_FACE, name, key, resolved_url=url, repo_id=repo_id, revision=revision,
                   file_path=file_path)

    @classmethod
    def hugging_face_repo(cls, repo_id: str, quant: str | None = None, revision: str = "main") -> ModelSource:
        """A whole model from a hub repository, as ``modelfs pull hf://R:QUANT@REV`` takes
        it (beyond llamadart): the weights of ``quant`` (case-insensitive; None: the
        default order, Q4_K_M first), a split model's shards and the matching mmproj,
        chosen from the hub's listing when it is ensured (``store.hfrepo``). Its
        ``file_name`` stands in until then (``<repo>-<QUANT>.gguf``); the entry names the
        real one."""
        _check_repo(repo_id)
        _check_revision(revision)
        tail = f":{quant}" if quant else ""
        rev = "" if revision == "main" else "@" + quote(revision, safe="")
        try:
            hfrepo.parse_repo_ref(f"hf://{repo_id}{tail}{rev}")  # the quant's and revision's rules
        except UsageError as exc:
            raise UsageError(str(exc)) from None
        key = f"hf://{repo_id}{tail}{rev}"
        name = _file_name(f"{repo_id.split('/', 1)[1]}-{quant or 'default'}.gguf")
        return cls(SourceKind.HUGGING_FACE_REPO, name, key, resolved_url=f"https://huggingface.co/{repo_id}",
                   repo_id=repo_id, revision=revision, quant=quant)

    @classmethod
    def pack(cls, envelope_url: str) -> ModelSource:
        """A signed pack's envelope (beyond llamadart): the store verifies it and its files."""
        _check_remote(envelope_url)
        return cls(SourceKind.PACK, _file_name_of_url(envelope_url), f"pack:{envelope_url}",
                   resolved_url=envelope_url)

    @classmethod
    def parse(cls, text: str) -> ModelSource:
        """A local path, an http(s) URL, ``hf://owner/repo[@rev]/path`` (or
        ``hf://owner/repo/path?revision=REV`` for a revision with a ``/``), or a hub
        repository's quant, ``hf://owner/repo[:QUANT][@rev]``."""
        if not text:
            raise UsageError("a model source must not be empty")
        if hfrepo.is_repo_ref(text):
            ref = hfrepo.parse_repo_ref(text)
            return cls.hugging_face_repo(ref.repo, ref.quant, ref.revision)
        if text.startswith("hf://"):
            return _parse_hf(text)
        scheme = urlsplit(text).scheme.lower() if "://" in text else ""
        if scheme in ("http", "https"):
            return cls.url(text)
        if scheme:
            raise UsageError(f"unsupported model source scheme {scheme!r}")
        return cls.path(text)

    # -- identity ----------------------------------------------------------------------------
    @property
    def cache_key(self) -> str:
        return hashlib.sha256(self.canonical_key.encode()).hexdigest()

    @property
    def cache_directory_name(self) -> str:
        stem = self.file_name.rsplit(".", 1)[0] if self.file_name.rfind(".") > 0 else self.file_name
        safe = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-") or "model"
        return f"{safe}-{self.cache_key[:12]}"

    @property
    def metadata_source_key(self) -> str:
        """What may be written down: the URL without query or fragment (plus the cache key)
        for an http(s) or pack source; the canonical key (no secret in it) otherwise."""
        if self.kind in (SourceKind.HTTP, SourceKind.PACK):
            assert self.resolved_url is not None
            p = urlsplit(self.resolved_url)
            bare = urlunsplit((p.scheme, p.hostname + (f":{p.port}" if p.port else "") if p.hostname else "",
                               p.path, "", ""))
            prefix = "url" if self.kind is SourceKind.HTTP else "pack"
            return f"{prefix}:{bare}#cacheKey={self.cache_key}"
        return self.canonical_key

    @property
    def is_local(self) -> bool:
        return self.kind is SourceKind.PATH

    @property
    def spec(self) -> str:
        """What the store pulls (``modelfs pull SPEC``): the URL, or ``hf://repo@rev/path``."""
        if self.kind is SourceKind.HUGGING_FACE:
            rev = "" if self.revision == "main" else "@" + quote(self.revision or "main", safe="")
            return f"hf://{self.repo_id}{rev}/{self.file_path}"
        if self.kind is SourceKind.HUGGING_FACE_REPO:
            return self.canonical_key
        if self.kind is SourceKind.PATH:
            return self.local_path or ""
        assert self.resolved_url is not None
        return self.resolved_url

    def __str__(self) -> str:
        return self.metadata_source_key

    def __repr__(self) -> str:  # the canonical key of a signed URL holds its signature
        return f"ModelSource({self.kind.value}, {self.metadata_source_key!r})"


def _check_remote(url: str) -> None:
    p = urlsplit(url)
    if p.scheme.lower() not in ("http", "https") or not p.hostname:
        raise UsageError(f"{redact_url(url)}: only http(s) URLs with a host are model sources")


def _file_name(name: str) -> str:
    name = unquote(name)
    if name in ("", ".", "..") or _BAD_FILE_NAME.search(name):
        raise UsageError(f"{name[:80]!r} is not a file name")
    return name


def _file_name_of_url(url: str) -> str:
    segments = [s for s in urlsplit(url).path.split("/") if s]
    if not segments:
        raise UsageError(f"{redact_url(url)}: the URL names no file")
    return _file_name(segments[-1])


def _check_repo(repo_id: str) -> None:
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(_REPO_PART.fullmatch(p) and ".." not in p for p in parts):
        raise UsageError(f"{repo_id[:80]!r} is not a hub repository id (owner/repo)")


def _check_revision(rev: str) -> None:
    if (not rev or rev.startswith("/") or rev.endswith("/") or "//" in rev or ".." in rev or "@{" in rev
            or _BAD_REVISION.search(rev)):
        raise UsageError(f"{rev[:80]!r} is not a revision")


def _check_file_path(path: str) -> None:
    if not path or path.startswith("/") or any(s in ("", ".", "..") or "\\" in s for s in path.split("/")):
        raise UsageError(f"{path[:80]!r} is not a file path inside a repository")


def _parse_hf(text: str) -> ModelSource:
    ref, _, query = text[len("hf://"):].partition("?")
    if "#" in text or "//" in ref:
        raise UsageError(f"{text[:80]!r} is not an hf:// reference")
    parts = ref.split("/")
    if len(parts) < 3:
        raise UsageError(f"{text[:80]!r}: an hf:// reference needs owner, repo and file path")
    repo, at, inline = parts[1].partition("@")
    if "@" in inline or (at and not inline):
        raise UsageError(f"{text[:80]!r}: not owner/repo[@revision]")
    revision = inline or None
    if query:
        key, eq, value = query.partition("=")
        if key != "revision" or not eq or "&" in value:
            raise UsageError(f"{text[:80]!r}: the only query an hf:// reference takes is revision=")
        if revision is not None:
            raise UsageError(f"{text[:80]!r}: use either @revision or ?revision=, not both")
        revision = unquote(value)
    segments = [unquote(s) for s in parts[2:]]
    if any(not s or "/" in s or "\\" in s for s in segments):
        raise UsageError(f"{text[:80]!r}: an empty or encoded separator in the file path")
    return ModelSource.hugging_face(f"{parts[0]}/{repo}", "/".join(segments), revision or "main")


def source_of_stored_url(url: str, hub: str) -> ModelSource | None:
    """The source a stored (redacted) file URL came from: a hub ``/resolve/`` URL of
    ``hub`` is an hf:// source, another http(s) URL itself; None when it is neither."""
    p = urlsplit(url)
    h = urlsplit(hub)
    if (p.scheme, p.netloc) == (h.scheme, h.netloc):
        m = re.fullmatch(re.escape(h.path.rstrip("/")) + r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", p.path)
        if m:
            try:
                return ModelSource.hugging_face(m[1], unquote(m[3]), unquote(m[2]))
            except UsageError:
                return None
    try:
        return ModelSource.url(url)
    except UsageError:
        return None


class CachePolicy(enum.StrEnum):
    PREFER_CACHED = "prefer_cached"   # a cached, verified copy if there is one, else download
    REFRESH = "refresh"               # download again (a verified copy of the same bytes is kept)
    NO_CACHE = "no_cache"             # as refresh; a local entry expires at once (the next prune takes it)
    CACHE_ONLY = "cache_only"         # never the network: the entry, or NotFound


@dataclass(frozen=True)
class ModelLoadOptions:
    """How to ensure a model. ``bearer_token`` and ``headers`` are used for the
    request and never stored nor shown (``repr`` hides them); ``sha256`` is the file's
    expected hash (required for a plain URL: nothing unverified is ever complete)."""
    cache_policy: CachePolicy = CachePolicy.PREFER_CACHED
    cache_directory: Path | None = None
    sha256: str | None = None
    size: int | None = None
    bearer_token: str | None = field(default=None, repr=False)
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    resume: bool = True
    max_retries: int = 5
    mmproj_sha256: str | None = None  # the companion projector's expected SHA-256 (``mmproj=``)
    name: str | None = None           # the shared store's model name, the owner's only (default: from the source)
