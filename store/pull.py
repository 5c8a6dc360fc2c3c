"""``pull``: decide what a source is, and pull an unsigned one into a model.

:func:`pull_source` is the one entry point of ``modelfs pull``. It decides, with one
Downloader on one event loop, what the source is:

* ``--pack``, or an existing local file: a signed pack envelope (``store.packs``); a
  local GGUF is refused with a pointer to ``modelfs import``;
* an http(s) URL without ``--sha256``: its body is fetched as an envelope (the size
  cap refuses a model file from its Content-Length, before its body); a signed pack
  is installed; otherwise the refusal says what was found (an empty body, an HTML
  page, a document that is not an envelope, an HTTP error) and that an unsigned pull
  needs ``--sha256``;
* ``oci://`` or ``oci+http://``: a registry's GGUF artifact (:mod:`store.oci`), its
  layers fetched by digest, as an unsigned pull;
* anything else (an https URL with ``--sha256``, ``hf://``): an unsigned pull.
  ``--lazy`` is for signed packs only. A hub repository (``hf://org/repo[:QUANT][@REV]``)
  is one too: :mod:`store.hfrepo` chooses its weights, shards and mmproj; the first file
  of a split model on the hub brings its siblings from the same commit
  (:func:`resolve_shards`).

An unsigned pull (:func:`pull`) mirrors :meth:`Store.import_model`: resolve each source to a URL with an
expected SHA-256 (given, or the hub's LFS hash) and size; fetch every blob through the
:class:`~store.download.Downloader` (resumable, verified, deduplicated), its GGUF header
parsed as its bytes arrive (:class:`GGUFHeaderCheck`: a file that is not a GGUF is
refused at its first malformed bytes, and its partial deleted); read the GGUF header of
the committed blobs; then record one version in one transaction, marked unsigned, and
activate it. A pull refused after a commit removes the blobs it added that nothing
references. A pull of bytes the active version already has records nothing new.

What reaches the catalog is redacted: file URLs keep scheme, host and path (the hub's
resolve URL pinned to a commit; a signed URL loses its query values), and the source
names no credentials. The full URL lives only in memory for the transfer.
"""

from __future__ import annotations

import io
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypedDict
from urllib.parse import unquote, urlsplit

from . import gguf, hf, hfrepo, oci, shards
from .blobs import BlobStore
from .catalog import Action, FileRecord
from .download import Bytes, Downloader, FetchResult
from .errors import FetchError, ManifestError, StoreError, UsageError
from .layout import Sha256, check_sha256
from .names import check_filename, check_model_name
from .packs import (
    Admit,
    InstallResult,
    fetch_envelope,
    install_pack,
    looks_like_envelope,
    pull_pack_url,
    read_envelope_file,
)
from .pulloptions import PullOptions
from .redact import redact_text, redact_url

if TYPE_CHECKING:
    from .core import Store

log = logging.getLogger(__name__)

Progress = Callable[[int], None]
ProgressFactory = Callable[["PullSource"], Progress | None]


@dataclass(frozen=True)
class PullSource:
    url: str                   # full URL for the transfer; may hold secrets, never stored
    filename: str
    role: str                  # 'weights', 'shard' (a split model's later files) or 'mmproj'
    sha256: Sha256
    size: int | None
    source: str                # redacted identity for the card: hf://org/repo or scheme://host/path
    source_url: str | None = None
    hub_repo: str | None = None    # hub repository 'org/name', for hf:// sources
    hub_commit: str | None = None  # the commit the hub resolved the revision to, when it said
    hub_path: str | None = None    # the file's path inside hub_repo

    @property
    def shown(self) -> str:
        return redact_url(self.url)


@dataclass(frozen=True)
class PullResult:
    model: str
    version: int
    new_version: bool
    new_bytes: int             # bytes added to blobs/
    bytes_transferred: int     # body bytes received over the network
    files: tuple[FileRecord, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.model, "version": self.version, "new_version": self.new_version,
                "new_bytes": self.new_bytes, "bytes_downloaded": self.bytes_transferred,
                "signed": False, "files": [f.__dict__ for f in self.files]}


def result_json(result: InstallResult | PullResult) -> dict[str, Any]:
    """A pull's result as ``modelfs pull --json`` prints it (without its ``event`` key),
    and as the daemon keeps it for a job: one shape for both, signed or not."""
    if isinstance(result, PullResult):
        return result.as_dict()
    return {**result.as_dict(), "signed": True}


def default_name(filename: str) -> str:
    """A model name from a file name: ``Qwen2-7B.Q4_K_M.gguf`` -> ``Qwen2-7B.Q4_K_M``, and a
    split model's first file ``Qwen3-Q4_K_M-00001-of-00003.gguf`` -> ``Qwen3-Q4_K_M``."""
    split = shards.split_name(filename)
    stem = split.prefix if split is not None else filename[:-5] if filename.lower().endswith(".gguf") else filename
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip(".-") or "model"
    return name[:128]


def _url_filename(url: str) -> str:
    path = urlsplit(url).path
    name = unquote(path.rsplit("/", 1)[-1])
    if not name:
        raise UsageError(f"cannot tell the file name from {redact_url(url)}; the URL must end in a file name")
    return check_filename(name)


async def resolve(downloader: Downloader, spec: str, *, role: str, sha256: str | None = None,
                  size: int | None = None, base: hf.HFRef | None = None) -> PullSource:
    """Turn a command-line source into a :class:`PullSource`.

    ``spec`` is an ``https://``/``http://`` URL (``sha256`` required), an ``hf://`` URL,
    or, when ``base`` is an hf:// reference, a path in the same repository (``--mmproj``)."""
    expected = check_sha256(sha256.lower()) if sha256 is not None else None
    if base is not None and "://" not in spec:
        spec = f"hf://{base.repo}@{base.revision.replace('/', '%2F')}/{spec.lstrip('/')}"
    if spec.startswith("hf://"):
        ref = hf.parse_hf_url(spec)
        meta = await hf.file_metadata(downloader.http, ref)
        if expected is not None and expected != meta.sha256:
            raise UsageError(f"{ref.display()}: the hub says SHA-256 {meta.sha256[:16]}…, not {expected[:16]}…")
        if size is not None and size != meta.size:
            raise UsageError(f"{ref.display()}: the hub says {meta.size} bytes, not {size}")
        return PullSource(meta.url, check_filename(ref.filename), role, meta.sha256, meta.size,
                          source=f"hf://{ref.repo}", source_url=f"{hf.endpoint()}/{ref.repo}",
                          hub_repo=ref.repo, hub_commit=meta.commit, hub_path=ref.path)
    scheme = urlsplit(spec).scheme.lower()
    if scheme not in ("http", "https"):
        raise UsageError(f"unsupported source {spec[:20]!r}…: use https://… or hf://org/repo/file.gguf"
                         if len(spec) > 20 else f"unsupported source {spec!r}: use https://… or hf://…")
    if expected is None:
        raise UsageError("an unsigned https source needs its SHA-256: pass --sha256 HEX "
                         f"(for {role})")
    return PullSource(spec, _url_filename(spec), role, expected, size, source=redact_url(spec))


class _NeedMore(Exception):
    """The parser wants bytes that have not arrived yet."""


class _Arrived(io.RawIOBase):
    """The bytes received so far as a file that cannot seek; reading past them raises
    :class:`_NeedMore` (not end of file: the parser knows the file's real size)."""

    def __init__(self, data: bytearray) -> None:
        self._data = data
        self._pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        n = min(len(view), len(self._data) - self._pos)
        if n <= 0 < len(view):
            raise _NeedMore
        view[:n] = self._data[self._pos:self._pos + n]
        self._pos += n
        return n


class GGUFHeaderCheck:
    """The :class:`~store.download.PrefixCheck` of an unsigned pull: the GGUF header, parsed
    by the bounded parser (``check_data=False``) as its bytes arrive, so a file that is
    not a GGUF is refused at its first malformed bytes, not after its last one.

    The bytes are kept until the header is whole (never past ``MAX_HEADER_BYTES``) and
    parsed again each time they have doubled: parsing costs at most twice the header."""

    FIRST_REPARSE = 64 << 10

    def __init__(self, name: str) -> None:
        self.name = name
        self.done = False
        self.info: gguf.GGUFInfo | None = None
        self._buf = bytearray()
        self._next = 1  # parse once this many bytes are in

    def reset(self) -> None:
        self.done, self.info, self._buf, self._next = False, None, bytearray(), 1

    def feed(self, data: Bytes, size: int | None) -> None:
        if self.done:
            return
        self._buf += data[:max(0, gguf.MAX_HEADER_BYTES - len(self._buf))]
        whole = len(self._buf) >= gguf.MAX_HEADER_BYTES or (size is not None and len(self._buf) >= size)
        if len(self._buf) < self._next and not whole:
            return
        self._next = max(2 * len(self._buf), self.FIRST_REPARSE)
        try:
            self.info = gguf.parse_gguf_file(io.BufferedReader(_Arrived(self._buf)), name=self.name, size=size,
                                             check_data=False)
        except _NeedMore:
            return
        self.done = True
        self._buf = bytearray()


async def pull(store: Store, downloader: Downloader, sources: list[PullSource], *, name: str | None = None,
               owner_app: str | None = None, owner_uid: int | None = None, private: bool = False,
               license: str | None = None, progress: ProgressFactory | None = None,
               admit: Admit | None = None) -> PullResult:
    """Fetch every source, check the GGUF headers, record and activate an unsigned version.
    ``admit(name, size)`` may refuse it for its caller before any byte is fetched."""
    if not sources or sources[0].role != "weights":
        raise UsageError("a pull needs the weights file first")
    name = check_model_name(name or default_name(sources[0].filename))
    if len({s.filename for s in sources}) != len(sources):
        raise UsageError("the weights, its shards and the mmproj file must have different file names")
    store.check_unsigned_allowed(name, "pull")
    if admit is not None:
        sizes = [s.size for s in sources]
        admit(name, None if None in sizes else sum(s or 0 for s in sizes))

    fetched: list[tuple[PullSource, FetchResult]] = []
    try:
        for src in sources:
            cb = progress(src) if progress else None
            log.info("pulling %s (%s) from %s", src.filename, src.role, src.shown)
            res = await downloader.fetch(src.url, sha256=src.sha256, size=src.size, progress=cb,
                                         check=GGUFHeaderCheck(src.filename))
            fetched.append((src, res))
        info = _check_files(fetched)
    except FetchError:
        raise  # the network: what was verified stays for the next attempt (as a partial does)
    except StoreError:
        _drop_new_blobs(store, fetched)  # a file refused: the files fetched before it go too
        raise

    weights = sources[0]
    records = sorted((FileRecord(src.filename, src.role, res.size, res.sha256, url=redact_url(src.url),
                                 etag=res.etag, last_modified=res.last_modified,
                                 hub_path=_hub_path(src, weights))
                      for src, res in fetched), key=lambda r: r.filename)
    new_bytes = sum(res.size for _, res in fetched if res.new)
    transferred = sum(res.bytes_transferred for _, res in fetched)

    version, created = store.record_unsigned(
        name, records, info, action=Action.PULL, source=weights.source, license=license,
        source_url=weights.source_url, owner_app=owner_app, owner_uid=owner_uid, new_bytes=new_bytes,
        private=private, hub_repo=weights.hub_repo, hub_commit=weights.hub_commit)
    return PullResult(name, version, created, new_bytes, transferred, tuple(records))


def _hub_path(src: PullSource, weights: PullSource) -> str | None:
    """A file's path in the weights' hub repository: only a file of the same repository
    and commit has one (an mmproj from elsewhere is not part of that repo's layout)."""
    if src.hub_repo is None or (src.hub_repo, src.hub_commit) != (weights.hub_repo, weights.hub_commit):
        return None
    return src.hub_path


def _check_files(fetched: list[tuple[PullSource, FetchResult]]) -> gguf.GGUFInfo:
    """The whole files, verified: GGUF headers whose tensors fit, the weights no
    projector, a split model's shards whole and in order (:func:`store.shards.check_split`:
    a later shard is never taken as the weights), the mmproj a projector. Returns the
    weights' header."""
    (weights, res), *rest = fetched
    info = gguf.parse_gguf(res.path, name=weights.filename)
    if info.is_mmproj:
        raise UsageError(f"{weights.filename} is a multimodal projector; pass it with --mmproj")
    split = [(weights.filename, info)]
    for src, r in rest:
        if src.role == "shard":
            split.append((src.filename, gguf.parse_gguf(r.path, name=src.filename)))
        elif src.role == "mmproj" and not gguf.parse_gguf(r.path, name=src.filename).is_mmproj:
            raise UsageError(f"{src.filename} is not a multimodal projector (mmproj) GGUF")
    shards.check_split(split)
    return info


def _drop_new_blobs(store: Store, fetched: list[tuple[PullSource, FetchResult]]) -> None:
    """A refused pull leaves nothing behind: the blobs it committed that nothing references."""
    referenced = store.catalog.referenced_shas()
    for _, res in fetched:
        if res.new and res.sha256 not in referenced:
            store.blobs.remove(res.sha256)


class DownloaderOptions(TypedDict, total=False):
    stall_timeout: float
    min_speed: tuple[int, float]
    max_retries: int
    backoff: tuple[float, float]
    direct_io: bool


def downloader_options_from_env() -> DownloaderOptions:
    """Tuning knobs for tests and unusual networks (all optional):
    ``MODELFS_STALL_TIMEOUT`` seconds, ``MODELFS_MIN_SPEED`` ``BYTES/SECONDS``,
    ``MODELFS_MAX_RETRIES``, ``MODELFS_BACKOFF`` ``BASE/CAP`` seconds, ``MODELFS_DIRECT_IO=0`` (page-cache writes)."""
    opts: DownloaderOptions = {}
    try:
        if v := os.environ.get("MODELFS_STALL_TIMEOUT"):
            opts["stall_timeout"] = float(v)
        if v := os.environ.get("MODELFS_MIN_SPEED"):
            amount, seconds = v.split("/")
            opts["min_speed"] = (int(amount), float(seconds))
        if v := os.environ.get("MODELFS_MAX_RETRIES"):
            opts["max_retries"] = int(v)
        if v := os.environ.get("MODELFS_BACKOFF"):
            base, cap = v.split("/")
            opts["backoff"] = (float(base), float(cap))
        if os.environ.get("MODELFS_DIRECT_IO", "") == "0":
            opts["direct_io"] = False
    except ValueError:
        raise UsageError("malformed MODELFS_STALL_TIMEOUT, MODELFS_MIN_SPEED, MODELFS_MAX_RETRIES "
                         "or MODELFS_BACKOFF") from None
    return opts


def downloader_from_env(blobs: BlobStore) -> Downloader:
    """The Downloader of the command line (``pull``, ``update``, ``manifest verify``):
    offline when ``MODELFS_OFFLINE`` is set (not ``0``), tuned by
    :func:`downloader_options_from_env`."""
    offline = os.environ.get("MODELFS_OFFLINE", "") not in ("", "0")
    return Downloader(blobs, offline=offline, **downloader_options_from_env())


# -- what a source is ---------------------------------------------------------------------
class PullReporter(Protocol):
    """Progress of a pull: one callback per file of an unsigned pull (``set_total`` is
    honoured, see :meth:`Downloader.fetch`), or one for a whole signed pack."""

    def __call__(self, src: PullSource) -> Progress | None: ...

    def pack(self) -> Progress | None: ...


async def pull_source(store: Store, downloader: Downloader, source: str, options: PullOptions,
                      reporter: PullReporter | None = None, admit: Admit | None = None) -> InstallResult | PullResult:
    """``modelfs pull SOURCE``: decide what SOURCE is (module docstring) and pull it.
    Returns the signed pack's :class:`InstallResult` or the unsigned :class:`PullResult`.
    ``admit(model, size)`` may refuse it for its caller (the daemon's app policy) once
    the model and its size are known, before any file is fetched."""
    if options.retry:
        downloader.retry_failed = True
    if oci.is_reference(source):
        return await _pull_oci(store, downloader, source, options, reporter, admit)
    is_url = source.startswith(("http://", "https://"))
    if not is_url and os.path.isfile(source) and gguf.looks_like_gguf(source):
        raise UsageError(f"{source} is a GGUF file, not a signed pack envelope: add a local model with "
                         f"`modelfs import NAME {source}`")
    if options.pack or (not is_url and os.path.isfile(source)):
        return await _pull_pack(store, downloader, source, None, options, reporter, admit)
    found = None
    if is_url and options.sha256 is None:
        envelope, found = await _probe_envelope(downloader, source)
        if envelope is not None:
            return await _pull_pack(store, downloader, source, envelope, options, reporter, admit)
    if options.candidate:
        raise UsageError("--candidate needs a signed pack: an unsigned version has no publisher to roll out")
    if options.lazy:
        raise UsageError("--lazy needs a signed pack: only its manifest vouches for every file's size and "
                         "SHA-256 before a byte is local")
    if found is not None:
        raise UsageError(f"{redact_url(source)}: not a signed pack ({found}); to pull an unsigned file from "
                         "there, pass --sha256 HEX")
    name = options.name
    if hfrepo.is_repo_ref(source):
        sources, name = await resolve_repo(downloader, source, options)
    else:
        sources = [await resolve(downloader, source, role="weights", sha256=options.sha256, size=options.size)]
        sources += await resolve_shards(downloader, source, sources[0])
    if options.mmproj:
        base = hf.parse_hf_url(source) if source.startswith("hf://") and "://" not in options.mmproj else None
        sources.append(await resolve(downloader, options.mmproj, role="mmproj", sha256=options.mmproj_sha256,
                                     base=base))
    return await pull(store, downloader, sources, name=name, owner_app=options.owner_app,
                      owner_uid=options.owner_uid, private=options.private, license=options.license,
                      progress=reporter, admit=admit)


async def resolve_repo(downloader: Downloader, source: str, options: PullOptions) -> tuple[list[PullSource], str]:
    """``hf://org/repo[:QUANT][@REVISION]``: the files :mod:`store.hfrepo` chooses (the
    weights, every shard, the mmproj), each with the hub's LFS SHA-256 and its URL pinned
    to the commit, and the model's name (``--name``, else from the repo and the quant)."""
    if options.sha256 is not None or options.size is not None or options.mmproj is not None:
        raise UsageError("a repository pull chooses its files and takes each one's SHA-256 and size from the hub; "
                         "--sha256, --size and --mmproj are for a single file (hf://org/repo/FILE)")
    ref = hfrepo.parse_repo_ref(source)
    plan = await hfrepo.resolve_repo(downloader.http, ref)
    origin = f"{hf.endpoint()}/{ref.repo}"
    sources = [PullSource(f.meta.url, check_filename(f.filename), f.role, f.meta.sha256, f.meta.size,
                          source=f"hf://{ref.repo}", source_url=origin, hub_repo=ref.repo, hub_commit=plan.commit,
                          hub_path=f.path)
               for f in plan.files]
    log.info("%s: %s", ref.display(), ", ".join(f"{f.path} ({f.role})" for f in plan.files))
    return sources, options.name or hfrepo.default_name(plan)


async def resolve_shards(downloader: Downloader, source: str, first: PullSource) -> list[PullSource]:
    """The later files of a split model whose first file is ``first`` (``…-00001-of-00003.gguf``):
    on the hub, its siblings beside it in the same repository and commit; elsewhere there is
    no SHA-256 to check them by, so the pull is refused (a signed pack or a hub repository
    pull carries one for each)."""
    split = shards.split_name(first.filename)
    if split is None or split.count == 1:
        return []
    if split.no != 1:
        raise UsageError(f"{first.filename} is shard {split.no} of {split.count}; pull the first one, "
                         f"{split.sibling(1)}")
    if not source.startswith("hf://") or first.hub_path is None:
        raise UsageError(f"{first.filename} is the first of {split.count} files of a split model; an https pull "
                         "has no SHA-256 for the others: pull it from the hub (hf://org/repo:QUANT) or as a signed "
                         "pack")
    ref = hf.parse_hf_url(source)
    folder = first.hub_path.rsplit("/", 1)[0] + "/" if "/" in first.hub_path else ""
    base = hf.HFRef(ref.repo, first.hub_commit or ref.revision, "")
    return [await resolve(downloader, folder + split.sibling(no), role="shard", base=base)
            for no in range(2, split.count + 1)]


async def _pull_oci(store: Store, downloader: Downloader, source: str, options: PullOptions,
                    reporter: PullReporter | None, admit: Admit | None) -> PullResult:
    """``oci://HOST/REPO:TAG`` (or ``@sha256:…``): the manifest's GGUF layers, each fetched
    by its digest (the expected SHA-256), as one unsigned entry (:mod:`store.oci`)."""
    for flag, given in (("--sha256", options.sha256), ("--size", options.size), ("--mmproj", options.mmproj),
                        ("--mmproj-sha256", options.mmproj_sha256), ("--pack", options.pack),
                        ("--lazy", options.lazy), ("--candidate", options.candidate)):
        if given:
            raise UsageError(f"{flag} does not apply to an oci:// pull: the manifest names every file with its "
                             "digest and size (and it is unsigned)")
    ref = oci.parse_reference(source)
    artifact = await oci.resolve(downloader.http, ref)
    sources = [PullSource(ref.pinned(f"sha256:{layer.sha256}"), layer.filename, layer.role, layer.sha256,
                          layer.size, source=artifact.source, source_url=ref.display())
               for layer in artifact.layers]
    return await pull(store, downloader, sources, name=options.name or oci.default_name(ref),
                      owner_app=options.owner_app, owner_uid=options.owner_uid, private=options.private,
                      license=options.license, progress=reporter, admit=admit)


async def _probe_envelope(downloader: Downloader, url: str) -> tuple[bytes | None, str | None]:
    """(the body of ``url``, None) when it is a signed envelope, else (None, what was
    found instead), or (None, None) for a body over the size cap (a model file, refused
    from its Content-Length before its body: the unsigned pull says what it needs)."""
    try:
        data = await fetch_envelope(downloader, url)
    except ManifestError as exc:
        if exc.fields.get("reason") == "too-large":
            return None, None
        return None, redact_text(str(exc))
    except StoreError as exc:
        why = redact_text(str(exc)).removeprefix(f"{redact_url(url)}: ")
        return None, f"it could not be fetched: {why}"
    if looks_like_envelope(data):
        return data, None
    return None, _what_is(data)


def _what_is(data: bytes) -> str:
    """What a body that is not an envelope looks like, for a message."""
    head = data.lstrip()[:16].lower()
    if not head:
        return "the server sent an empty body" if not data else "the server sent only white space"
    if head.startswith((b"<!doctype html", b"<html")):
        return "the server sent an HTML page (a captive portal or login page?)"
    if head[:1] in (b"{", b"["):
        return "the server sent JSON that is not a signed envelope"
    if data[:4] == b"GGUF":
        return "the server sent a GGUF file"
    return f"the server sent {len(data)} bytes that are not a signed envelope"


async def _pull_pack(store: Store, downloader: Downloader, source: str, envelope: bytes | None,
                     options: PullOptions, reporter: PullReporter | None, admit: Admit | None) -> InstallResult:
    """Install the pack whose envelope is ``source`` (a file or an http(s) URL), or
    ``envelope`` when it was already fetched. The URL of a trusted channel holds the pack
    to the keys that channel allows."""
    progress = reporter.pack() if reporter is not None else None
    is_url = source.startswith(("http://", "https://"))
    allowed = store.catalog.channel_keys(source) if is_url else None
    if envelope is None and is_url:
        res = await pull_pack_url(store, downloader, source, platform=options.platform, progress=progress,
                                  lazy=options.lazy, allowed_keys=allowed, admit=admit,
                                  candidate=options.candidate)
    else:
        envelope = envelope if envelope is not None else read_envelope_file(source)
        origin = redact_url(source) if is_url else f"file:{Path(source).name}"
        res = await install_pack(store, downloader, envelope, platform=options.platform, source=origin,
                                 progress=progress, lazy=options.lazy, allowed_keys=allowed, admit=admit,
                                 candidate=options.candidate)
    if options.private or options.owner_app or options.owner_uid is not None:
        # The publisher names the model; who sees it is local.
        store.catalog.set_visibility(res.model, "private" if options.private else
                                     store.catalog.get_model(res.model).visibility,
                                     owner_app=options.owner_app, owner_uid=options.owner_uid, actor=store.actor)
    return res
