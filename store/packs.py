"""Signed model packs: from an envelope to an active, verified version.

This module owns the trusted install path. It must never fetch an artifact byte
before the envelope has passed every check, never make a version visible (installed,
activatable, listed by the mount) before every one of its files is verified (a
``lazy`` install lists the signed names and sizes, never a byte: see below), and
never add anything but an audit record when it refuses a pack.

The checks, in order (:func:`check_pack`; each refusal is one line with a stable
``reason`` field):

1. size cap (1 MiB), before any parsing;                     ``parse_envelope``
2. strict envelope JSON (duplicate keys refused) and canonical base64;
   (for a channel: the envelope's key_id is one the channel allows);
3. signature by a trusted, unrevoked key, over the raw payload bytes;
4. strict payload JSON, known schema, field types, and file names that are one
   safe component (``../x``, ``a/b``, ``/abs``, ``x\\0y``, ``..`` refused);
5. expiry;                                                   ``verify_envelope``
6. version floor: older than the highest accepted version refused (unless that
   exact payload is already installed), same version with other content refused;
7. at least one artifact for this platform; the model name is not held by
   unsigned (imported) versions.

Only then are artifacts fetched (``platform`` absent/``any``, or this platform). An
artifact whose blob is already local must have the signed size (its SHA-256 alone would
let the mount list a size the bytes do not have): refused with TrustError
(``size-mismatch``) before anything is fetched or activated. A blob that is not local is
checked for size and SHA-256 when it is fetched.

Deliberate difference from the order a reader might expect: the payload is parsed (and
its schema and file names checked) only *after* its signature verifies. Nothing
unauthenticated beyond the three-field envelope is parsed, which is the rule
``store.manifest`` is built and tested on. Every check still runs before any
download; only which reason is reported for a pack with several faults differs.

Install (:func:`install_pack`), decisions:

* One version = one logical model named by ``model_id``. Files keep their manifest
  filenames and roles; each row records size, SHA-256, the redacted URL, ETag and
  Last-Modified, and the chunk hashes.
* Nothing is recorded in the catalog until every file is verified: artifacts are
  fetched into blobs (each commit checks size and SHA-256; a mismatch, e.g. an
  artifact from another release, is quarantined by the downloader), then ONE
  transaction records the version as installed with all its files and the raw
  payload, raises the version floor, and activates it (the previous active version
  becomes last-good). A crash before that transaction leaves only verified blobs
  that nothing references yet: the rerun finds them and downloads nothing again
  (``crash_point("pack-before-activate")`` sits right before it); ``prune`` removes
  them if the pack is abandoned.
* A version that is already installed is never downloaded again (missing blobs of
  it are re-fetched, nothing else), and pulling it does not change which version
  is active: a pull never undoes ``rollback`` or ``activate``. A newly installed
  version is activated unless a newer one is active. A channel update (or a pull
  with ``candidate``) activates it as a candidate, on probation until apps' loads
  or the admin mark it good (``store.rollout``; ``Store.supervise``).
* Archive artifacts (role ``archive``, a ``.zip``): the zip is fetched as a blob and
  extracted by ``store.archive.extract_zip`` (reject, never sanitise) into a private,
  flocked directory under ``tmp/``; each extracted file becomes a blob (so dedup
  works) and a file row ``<name without .zip>/<relative path>`` with role ``aux``.
  The zip itself is not exposed: its blob is removed once the version is recorded
  (kept until then so a rerun after a crash extracts again without downloading).
  Extracted files have no URL of their own, so a lost one comes back only by
  pulling the pack again.
* ``lazy=True`` (``modelfs pull --lazy``) records the version from the verified
  manifest without fetching its files: they are listed at once with their exact sizes
  and hashes ("dehydrated"), and the mount fetches each one from its manifest URL
  and verifies its SHA-256 on first open, before any byte reaches a reader. This is
  the one exception to "verified before visible": names and sizes are visible
  (they are signed), bytes never are before verification. Archive artifacts are
  still fetched and extracted at once (their contents have no URL of their own).
  The card then comes from the payload alone (no GGUF header is read). A file that would
  stay dehydrated but whose URL carries a signed query string or credentials is refused
  at once (UsageError, ``lazy-secret-url``): the catalog keeps only the redacted URL, so
  the mount could never fetch it; an eager pull fetches it with the full URL now.
* A pack refused after download (an archive the extractor rejects, a SHA-256
  mismatch) has the blobs this call added removed again; a network failure keeps
  them, verified, for the next attempt.

Every accept, refusal, install and activation is in the audit log with its reason.
"""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from . import failures
from .archive import extract_zip
from .catalog import Action, FileRecord
from .crashpoints import crash_point
from .device import Machine, shortfalls
from .download import Downloader
from .errors import (
    ArchiveError,
    Conflict,
    GGUFError,
    IntegrityError,
    ManifestError,
    NotFound,
    StoreError,
    TrustError,
    UsageError,
)
from .gguf import GGUFInfo, parse_gguf
from .keys import MAX_ENVELOPE_BYTES, load_keyring
from .manifest import PLATFORMS, Artifact, Keyring, Manifest, check_version_floor, parse_envelope, verify_envelope
from .names import check_relpath
from .redact import drops_secrets, redact_text, redact_url

if TYPE_CHECKING:
    from .core import Store

log = logging.getLogger(__name__)

CRASH_BEFORE_ACTIVATE = "pack-before-activate"
Progress = Callable[[int], None]
#: (model name, bytes it will hold or None) -> None, or a StoreError: may this caller pull it?
Admit = Callable[[str, int | None], None]
# Refusals of the pack's content, as opposed to failures to get it.
_CONTENT_REFUSALS = (ManifestError, TrustError, ArchiveError, IntegrityError)


def current_platform() -> str:
    if sys.platform == "darwin":
        return "macos"
    if sys.platform.startswith("win"):
        return "windows"
    return "linux"


@dataclass(frozen=True)
class InstallResult:
    model: str
    version: int
    outcome: str                  # 'installed', 'already-active' or 'already-installed'
    activated: bool               # this call made ``version`` active
    previous_active: int | None   # the active version before this call
    active_version: int | None    # the active version after it
    key_id: str
    payload_sha256: str
    files: tuple[FileRecord, ...]
    bytes_downloaded: int         # body bytes received over the network by this call
    new_bytes: int                # bytes added to blobs/ by this call
    dehydrated: tuple[str, ...] = ()  # files left to fetch on first open (lazy installs)
    below_min_device: tuple[str, ...] = ()  # the soft gate's shortfalls on this machine (store.device)

    def as_dict(self) -> dict[str, Any]:
        """The JSON shape (docs/json.md): the model is ``name``, as in ``list``."""
        d = dict(self.__dict__)
        d["name"] = d.pop("model")
        d["files"] = [{k: v for k, v in f.__dict__.items()} for f in self.files]
        return d


@dataclass(frozen=True)
class ChannelResult:
    url: str                      # as configured (channels hold no secrets)
    outcome: str                  # 'installed', 'up-to-date', 'refused' or 'failed'
    message: str                  # the one line recorded as the channel's last_result
    install: InstallResult | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"url": self.url, "outcome": self.outcome, "message": self.message,
                "install": self.install.as_dict() if self.install else None}


# --------------------------------------------------------------------------- checks


def check_pack(store: Store, data: bytes, *, now: datetime, platform: str,
               allowed_keys: Collection[str] | None = None, checks: list[str] | None = None,
               keyring: Keyring | None = None) -> Manifest:
    """Every check before a download (see the module docstring). Reads the catalog,
    writes nothing. ``checks`` collects one line per check that passed."""
    env = parse_envelope(data, checks=checks)
    if allowed_keys is not None:
        if env.key_id not in allowed_keys:
            raise TrustError(
                f"manifest refused: key {env.key_id!r} may not sign packs from this channel "
                f"(allowed: {', '.join(sorted(allowed_keys)) or 'none'})",
                reason="key-not-allowed", key_id=env.key_id)
        _note(checks, f"key {env.key_id!r} is allowed for this channel")
    if keyring is None:
        keyring = load_keyring(store.catalog)
    manifest = verify_envelope(env, keyring, now=now, checks=checks)
    cat = store.catalog
    floor = cat.version_floor(manifest.model_id)
    check_version_floor(manifest, floor[0] if floor else None, floor[1] if floor else None,
                        _signed_versions(store, manifest.model_id), checks=checks)
    arts = manifest.artifacts_for_platform(platform)
    if not arts:
        raise ManifestError(f"manifest refused: no artifact of {manifest.model_id!r} version "
                            f"{manifest.version} is for platform {platform}", reason="no-artifacts",
                            model_id=manifest.model_id, version=manifest.version)
    _note(checks, f"{len(arts)} artifact(s) for platform {platform}: "
                  + ", ".join(a.filename for a in arts))
    if cat.has_model(manifest.model_id):
        unsigned = [v.version for v in cat.versions(manifest.model_id) if not v.signed]
        if unsigned:
            raise Conflict(f"model {manifest.model_id!r} holds unsigned (imported) version(s) "
                           f"{', '.join(map(str, unsigned))}; a signed pack cannot share its name "
                           "(remove them first)", reason="unsigned-model", model_id=manifest.model_id)
    return manifest


def _note(checks: list[str] | None, line: str) -> None:
    if checks is not None:
        checks.append(line)


def _signed_versions(store: Store, model: str) -> dict[int, str]:
    """Installed signed versions -> payload hash, for the floor check."""
    if not store.catalog.has_model(model):
        return {}
    return {v.version: v.card["payload_sha256"] for v in store.catalog.versions(model)
            if v.signed and v.card.get("payload_sha256")}


# --------------------------------------------------------------------------- install


async def install_pack(store: Store, downloader: Downloader, envelope: bytes, *, platform: str | None = None,
                       now: datetime | None = None, actor: str | None = None, source: str = "pack",
                       allowed_keys: Collection[str] | None = None,
                       progress: Progress | None = None, lazy: bool = False,
                       background: bool = False, admit: Admit | None = None,
                       candidate: bool = False) -> InstallResult:
    """Verify ``envelope`` and install (and activate) its version; see the module docstring.

    ``source`` says where the envelope came from (a URL is redacted before it is
    written anywhere). ``allowed_keys`` restricts the signer (trusted channels).
    ``lazy`` records the files without fetching them (see the module docstring).
    ``min_device`` is a soft gate: a foreground install reports its shortfalls in the
    result; a ``background`` one (a channel update) skips a version this machine does
    not meet, fetching and recording nothing (outcome ``skipped``).
    ``admit(model, size)``, once every check has passed and before any download, may
    refuse the pack for its caller (a StoreError, audited as a refusal).
    ``candidate``: the version it activates is a candidate, on probation (``store.rollout``).
    """
    platform = platform or current_platform()
    if platform not in PLATFORMS:
        raise UsageError(f"unknown platform {platform!r}")
    now = now or datetime.now(UTC)
    actor = actor or store.actor
    source = redact_text(source)
    cat = store.catalog
    try:
        manifest = check_pack(store, envelope, now=now, platform=platform, allowed_keys=allowed_keys)
    except StoreError as exc:
        _audit_refusal(store, actor, exc, source)
        raise
    short = tuple(shortfalls(manifest.min_device, Machine(disk=store.layout.root)))
    if short and background:
        active = cat.get_model(manifest.model_id).active_version if cat.has_model(manifest.model_id) else None
        return InstallResult(manifest.model_id, manifest.version, "skipped", False, active, active, manifest.key_id,
                             manifest.payload_sha256, (), 0, 0, (), short)
    if admit is not None:
        try:
            admit(manifest.model_id, sum(a.size for a in manifest.artifacts_for_platform(platform)))
        except StoreError as exc:
            _audit_refusal(store, actor, exc, source, manifest)
            raise
    installer = _Installer(store, downloader, manifest, platform, actor, source, progress, lazy, candidate)
    try:
        return dataclasses.replace(await installer.run(), below_min_device=short)
    except StoreError as exc:
        if isinstance(exc, _CONTENT_REFUSALS):
            installer.discard_new_blobs()
            _audit_refusal(store, actor, exc, source, manifest)
        else:
            cat.audit(actor, Action.PULL, model=manifest.model_id, version=manifest.version, outcome="failed",
                      reason=redact_text(str(exc)), detail=_detail(exc, source, manifest))
        raise


def _detail(exc: StoreError | None, source: str, manifest: Manifest | None) -> dict[str, Any]:
    d: dict[str, Any] = {"source": source}
    if exc is not None and exc.fields.get("reason"):
        d["reason"] = exc.fields["reason"]
    if exc is not None and exc.fields.get("key_id"):
        d["key_id"] = exc.fields["key_id"]
    if manifest is not None:
        d["key_id"] = manifest.key_id
        d["payload_sha256"] = manifest.payload_sha256
    return d


def _audit_refusal(store: Store, actor: str, exc: StoreError, source: str,
                   manifest: Manifest | None = None) -> None:
    # The model and version of a payload that did not verify are not trustworthy
    # enough to file the event under; they stay in the one-line reason if relevant.
    model = manifest.model_id if manifest else None
    version = manifest.version if manifest else None
    store.catalog.audit(actor, Action.REFUSE, model=model, version=version, outcome="refused",
                        reason=redact_text(str(exc)), detail=_detail(exc, source, manifest))


@dataclass
class _Installer:
    store: Store
    downloader: Downloader
    manifest: Manifest
    platform: str
    actor: str
    source: str
    progress: Progress | None
    lazy: bool = False
    candidate: bool = False          # activate as a candidate version (rollout supervision)
    downloaded: int = 0
    new_bytes: int = 0
    added: set[str] = field(default_factory=set)      # blobs this call committed
    zips: dict[str, int] = field(default_factory=dict)  # archive blobs (-> size) dropped after recording

    async def run(self) -> InstallResult:
        m, cat = self.manifest, self.store.catalog
        if m.version in _signed_versions(self.store, m.model_id):
            return await self._already_installed()
        files = await self._materialise(m.artifacts_for_platform(self.platform), {})
        crash_point(CRASH_BEFORE_ACTIVATE)
        with cat.txn():
            # Re-check under the write lock: another process may have accepted this
            # version (other content: refused here) or a newer one while we downloaded.
            floor = cat.version_floor(m.model_id)
            installed = _signed_versions(self.store, m.model_id)
            check_version_floor(m, floor[0] if floor else None, floor[1] if floor else None, installed)
            raced = m.version in installed  # the same payload, installed by a concurrent pull
            if not raced:
                previous, activated = self._record(files)
        if raced:
            return await self._already_installed()
        self._drop_zips()
        return self._result("installed", activated, previous, files)

    def _record(self, files: tuple[FileRecord, ...]) -> tuple[int | None, bool]:
        """Inside the caller's transaction: the version, its files, the floor, activation."""
        m, cat = self.manifest, self.store.catalog
        missing = [f.filename for f in files if not self.store.blobs.has(f.sha256)
                   and not (self.lazy and f.url)]
        if missing:
            raise Conflict(f"{m.model_id} version {m.version}: verified bytes of {', '.join(missing)} "
                           "vanished before activation (a concurrent prune?); pull again", reason="vanished")
        cat.add_version(m.model_id, m.version, list(files), signed=True,
                        **_card(m, self.source, self._gguf_header(files)))
        cat.set_version_manifest(m.model_id, m.version, m.raw_payload.decode("utf-8"))
        cat.raise_floor(m.model_id, m.version, m.payload_sha256)
        cat.audit(self.actor, Action.ACCEPT, model=m.model_id, version=m.version,
                  reason=f"signed by {m.key_id}; {len(files)} file(s) verified",
                  detail={**_detail(None, self.source, m), "bytes_downloaded": self.downloaded,
                          "new_bytes": self.new_bytes - sum(n for z, n in self.zips.items()
                                                            if z in self.added)})
        previous = cat.get_model(m.model_id).active_version
        activated = previous is None or m.version > previous
        if activated:
            cat.activate(m.model_id, m.version, actor=self.actor, candidate=self.candidate,
                         reason=f"signed pack from {self.source}")
        return previous, activated

    def _gguf_header(self, files: tuple[FileRecord, ...]) -> GGUFInfo | None:
        """The weights' GGUF header, to fill what the payload leaves out of the card. The
        bytes are verified; a pack whose weights are not GGUF (CoreML) is fine too."""
        weights = next((f for f in files if f.role == "weights"), None)
        if weights is None or not self.store.blobs.has(weights.sha256):  # none, or dehydrated
            return None
        try:
            return parse_gguf(self.store.blobs.path(weights.sha256), name=weights.filename)
        except GGUFError as exc:
            log.debug("no GGUF card from %s: %s", weights.filename, exc)
            return None

    async def _already_installed(self) -> InstallResult:
        """The version is installed: download only blobs that went missing since."""
        m, cat = self.manifest, self.store.catalog
        v = cat.get_version(m.model_id, m.version)
        files = await self._materialise(m.artifacts_for_platform(self.platform),
                                        {f.filename: f for f in v.files})
        for f in files:
            self.store.record_gguf_card(f)  # weights a --lazy pull left to fetch may be local now
        self._drop_zips()
        active = cat.get_model(m.model_id).active_version
        outcome = "already-active" if active == m.version else "already-installed"
        cat.audit(self.actor, Action.ACCEPT, model=m.model_id, version=m.version,
                  reason=f"{outcome.replace('-', ' ')}; {self.downloaded} bytes downloaded",
                  detail={**_detail(None, self.source, m), "bytes_downloaded": self.downloaded})
        return self._result(outcome, False, active, files)

    def _result(self, outcome: str, activated: bool, previous: int | None,
                files: tuple[FileRecord, ...]) -> InstallResult:
        m = self.manifest
        blobs = self.store.blobs
        return InstallResult(m.model_id, m.version, outcome, activated, previous,
                             self.store.catalog.get_model(m.model_id).active_version, m.key_id,
                             m.payload_sha256, files, self.downloaded, self.new_bytes,
                             tuple(f.filename for f in files if not blobs.has(f.sha256)))

    # -- bytes ---------------------------------------------------------------------
    def _check_local_sizes(self, arts: list[Artifact]) -> None:
        """Every artifact whose blob is local has the size the pack signs."""
        blobs = self.store.blobs
        for art in arts:
            if blobs.has(art.sha256) and (actual := blobs.size(art.sha256)) != art.size:
                raise TrustError(
                    f"manifest refused: {art.filename} is signed as {art.size} bytes, but the blob with its SHA-256 "
                    f"holds {actual} bytes", reason="size-mismatch", filename=art.filename, signed_size=art.size,
                    size=actual)

    def _check_lazy_urls(self, arts: list[Artifact]) -> None:
        """A file left to fetch on first open must have a URL that survives redaction."""
        for art in arts:
            if self.lazy and art.extract_name is None and not self.store.blobs.has(art.sha256) \
                    and drops_secrets(art.url):
                raise UsageError(
                    f"{art.filename} cannot be pulled --lazy: its URL ({redact_url(art.url)}) carries a signature "
                    "or credentials, which the store never keeps, so it could not be fetched when first opened; "
                    "pull the pack without --lazy to fetch it now", reason="lazy-secret-url", filename=art.filename)

    async def _materialise(self, arts: list[Artifact], recorded: dict[str, FileRecord]) -> tuple[FileRecord, ...]:
        """Make every artifact's bytes local and verified; returns the file rows."""
        self._check_local_sizes(arts)
        self._check_lazy_urls(arts)
        out: list[FileRecord] = []
        for art in arts:
            directory = art.extract_name
            if directory is not None:  # an archive: its files are recorded under directory/
                have = [f for f in recorded.values() if f.filename.startswith(f"{directory}/")]
                if have and all(self.store.blobs.has(f.sha256) for f in have):
                    out += have
                else:
                    out += await self._archive(art, directory)
                continue
            etag = last_modified = None
            if self.lazy and self.downloader.retry_failed and not self.store.blobs.has(art.sha256):
                failures.forget(self.store.layout, art.sha256)  # --retry: the mount may try it at once
            if not self.store.blobs.has(art.sha256) and not self.lazy:
                res = await self.downloader.fetch(art.url, sha256=art.sha256, size=art.size,
                                                  progress=self.progress)
                self._count(res.sha256, res.size, res.new, res.bytes_transferred)
                etag, last_modified = res.etag, res.last_modified
            old = recorded.get(art.filename)
            if old is not None:
                out.append(old)
            else:
                out.append(FileRecord(art.filename, art.role, art.size, art.sha256, url=redact_url(art.url),
                                      etag=etag, last_modified=last_modified,
                                      chunk_size=art.chunk_size if art.chunks else None,
                                      chunks=list(art.chunks) if art.chunks else None))
        return tuple(sorted(out, key=lambda f: f.filename))

    def _count(self, sha256: str, size: int, new: bool, transferred: int) -> None:
        self.downloaded += transferred
        if new:
            self.added.add(sha256)
            self.new_bytes += size

    async def _archive(self, art: Artifact, directory: str) -> list[FileRecord]:
        """Fetch the zip ``art`` and extract it (reject, never sanitise); its files become
        blobs and ``directory/<path>`` rows."""
        res = await self.downloader.fetch(art.url, sha256=art.sha256, size=art.size, progress=self.progress)
        self._count(res.sha256, res.size, res.new, res.bytes_transferred)
        self.zips[art.sha256] = res.size
        blobs = self.store.blobs
        work = Path(tempfile.mkdtemp(dir=self.store.layout.tmp, prefix="pack-"))
        # A held flock on .lock tells the store's recovery pass this directory is live.
        lock_fd = os.open(work / ".lock", os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            extracted = extract_zip(blobs.path(art.sha256), work, directory)
            records = []
            for f in extracted.files:
                name = check_relpath(f"{directory}/{f.path}")
                committed = blobs.commit_file(extracted.path / f.path, f.sha256, f.size)
                self._count(committed.sha256, committed.size, committed.new, 0)
                records.append(FileRecord(name, "aux", f.size, f.sha256))
            return records
        except UsageError as exc:  # check_relpath: a name the mount could not show
            raise ArchiveError(f"archive {art.filename!r} refused: {exc}", reason="bad-name") from None
        finally:
            shutil.rmtree(work, ignore_errors=True)
            os.close(lock_fd)

    def _drop_zips(self) -> None:
        """Archive blobs are not exposed once their contents are recorded."""
        if not self.zips:
            return
        referenced = self.store.catalog.referenced_shas()
        for sha in set(self.zips) - referenced:
            freed = self.store.blobs.remove(sha)
            if sha in self.added:  # new_bytes counts what stays in the store
                self.added.discard(sha)
                self.new_bytes -= freed

    def discard_new_blobs(self) -> None:
        """After a refusal: remove the blobs this call added that nothing references."""
        referenced = self.store.catalog.referenced_shas()
        for sha in (self.added | set(self.zips)) - referenced:
            self.store.blobs.remove(sha)


def _card(m: Manifest, source: str, header: GGUFInfo | None) -> dict[str, Any]:
    """The metadata card: the signed payload's fields, then the GGUF header's for the rest."""
    return {
        "key_id": m.key_id, "payload_sha256": m.payload_sha256, "source": source,
        "license": m.license, "source_url": redact_url(m.source_url), "family": m.family,
        "architecture": m.architecture or (header.architecture if header else None),
        "quantization": m.quantization or (header.quantization if header else None),
        "context_length": m.context_len,
        "chat_template": header.has_chat_template if header else None, "compat_notes": m.notes,
        "min_device": m.min_device if isinstance(m.min_device, str) else m.min_device.as_text(),
        "runtime_params": dict(m.runtime) or None,
        "expires": m.expires.isoformat().replace("+00:00", "Z"),
    }


# --------------------------------------------------------------------------- envelopes over HTTP


async def fetch_envelope(downloader: Downloader, url: str, *, limit: int = MAX_ENVELOPE_BYTES) -> bytes:
    """GET a (small) envelope through the downloader's HTTP layer: its redirect rule,
    credentials only for their own origin, identity encoding only, and a body over
    ``limit`` refused without reading it past the limit (:meth:`Http.get_envelope`)."""
    return await downloader.http.get_envelope(url, limit=limit)


def looks_like_envelope(data: bytes) -> bool:
    """Cheap sniff for ``pull``: a JSON object mentioning payload_b64 (not proof of anything)."""
    head = data.lstrip()[:1]
    return head == b"{" and b'"payload_b64"' in data[:MAX_ENVELOPE_BYTES]


async def pull_pack_url(store: Store, downloader: Downloader, url: str, *, platform: str | None = None,
                        now: datetime | None = None, actor: str | None = None,
                        allowed_keys: Collection[str] | None = None, progress: Progress | None = None,
                        lazy: bool = False, background: bool = False,
                        admit: Admit | None = None, candidate: bool = False) -> InstallResult:
    """Fetch an envelope from ``url`` and install it. A refused or failed fetch is audited."""
    actor = actor or store.actor
    try:
        data = await fetch_envelope(downloader, url)
    except StoreError as exc:
        if isinstance(exc, ManifestError):
            _audit_refusal(store, actor, exc, redact_url(url))
        else:
            store.catalog.audit(actor, Action.PULL, outcome="failed", reason=redact_text(str(exc)),
                                detail={"source": redact_url(url)})
        raise
    return await install_pack(store, downloader, data, platform=platform, now=now, actor=actor,
                              source=redact_url(url), allowed_keys=allowed_keys, progress=progress, lazy=lazy,
                              background=background, admit=admit, candidate=candidate)


def read_envelope_file(path: str | os.PathLike[str]) -> bytes:
    """A local envelope, read with the same size cap (never more than cap + 1 bytes)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_ENVELOPE_BYTES + 1)
    except FileNotFoundError:
        raise NotFound(f"no such file: {path}", path=str(path)) from None
    except IsADirectoryError:
        raise UsageError(f"{path} is a directory, not an envelope") from None
    return data


# --------------------------------------------------------------------------- channels


def add_channel(store: Store, url: str, key_ids: Collection[str], *, actor: str | None = None,
                replace: bool = False) -> None:
    """Trust ``url`` as a feed of packs signed by one of ``key_ids``. A URL that is a
    channel already is a Conflict unless ``replace``: its keys are what it trusts, and
    they never change silently."""
    from .keys import check_key_id

    try:
        parts = httpx.URL(url)
    except httpx.InvalidURL:
        raise UsageError("channel URL is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.host:
        raise UsageError(f"channel URL {redact_url(url)} is not an http(s) URL")
    if redact_url(url) != url:
        # Channels are stored as given; a credential would end up in the catalog.
        raise UsageError(f"channel URL {redact_url(url)} carries credentials, a signed query or a "
                         "fragment; give the credentials through the environment instead")
    if not key_ids:
        raise UsageError("a channel needs at least one key allowed to sign it (--key KEY_ID)")
    for k in key_ids:
        check_key_id(k)
    with store.catalog.txn():
        before = store.catalog.channel_keys(url)
        if before is not None and not replace:
            raise Conflict(f"channel {url} exists already (keys: {', '.join(before) or 'none'}); pass --replace "
                           "to replace its keys", url=url, key_ids=before)
        store.catalog.add_channel(url, list(key_ids))
        detail: dict[str, Any] = {"url": url, "key_ids": sorted(key_ids)}
        if before is not None:
            detail["replaced_key_ids"] = before
        store.catalog.audit(actor or store.actor, Action.CHANNEL_ADD, reason=f"channel {url}", detail=detail)


async def update_channels(store: Store, downloader: Downloader, *, platform: str | None = None,
                          now: datetime | None = None, actor: str | None = None,
                          progress: Progress | None = None, check: bool = False) -> list[ChannelResult]:
    """Fetch each channel once, install what is newer, record when and how it went.
    ``check``: every check of the envelope, and what would be installed, but no
    artifact fetched and nothing recorded."""
    out: list[ChannelResult] = []
    for ch in store.catalog.channels():
        if check:
            out.append(await _check_channel(store, downloader, ch["url"], ch["key_ids"], platform, now))
        else:
            out.append(await update_channel(store, downloader, ch["url"], ch["key_ids"], platform=platform, now=now,
                                            actor=actor, progress=progress))
    return out


async def update_channel(store: Store, downloader: Downloader, url: str, key_ids: Collection[str], *,
                         platform: str | None = None, now: datetime | None = None, actor: str | None = None,
                         progress: Progress | None = None) -> ChannelResult:
    """Fetch one channel, install what is newer (as background work: a version below
    this machine's min_device is skipped; one it activates is a candidate, see
    store/rollout.py), record when and how it went. Nothing but the envelope is fetched
    when its version is installed and its files are local."""
    try:
        res = await pull_pack_url(store, downloader, url, platform=platform, now=now, actor=actor,
                                  allowed_keys=key_ids, progress=progress, background=True, candidate=True)
    except StoreError as exc:
        outcome = "refused" if isinstance(exc, _CONTENT_REFUSALS) or exc.fields.get("reason") == \
            "unsigned-model" else "failed"
        result = ChannelResult(url, outcome, f"{outcome}: {redact_text(str(exc))}")
    else:
        if res.outcome == "installed":
            msg = f"installed {res.model} version {res.version}" + (" (active, a candidate)"
                                                                    if res.activated else "")
            result = ChannelResult(url, "installed", msg, res)
        elif res.outcome == "skipped":
            result = ChannelResult(url, "skipped", f"skipped {res.model} version {res.version}: below its "
                                                   f"min_device ({'; '.join(res.below_min_device)})", res)
        else:
            result = ChannelResult(url, "up-to-date",
                                   f"up to date: {res.model} version {res.version} is installed", res)
    store.catalog.channel_checked(url, result.message)
    return result


async def _check_channel(store: Store, downloader: Downloader, url: str, key_ids: Collection[str],
                         platform: str | None, now: datetime | None) -> ChannelResult:
    """What ``update`` would do for one channel, without installing or recording it."""
    try:
        envelope = await fetch_envelope(downloader, url)
        m = check_pack(store, envelope, now=now or datetime.now(UTC), platform=platform or current_platform(),
                       allowed_keys=key_ids)
    except StoreError as exc:
        outcome = "refused" if isinstance(exc, _CONTENT_REFUSALS) else "failed"
        return ChannelResult(url, outcome, f"{outcome}: {redact_text(str(exc))}")
    if m.version in _signed_versions(store, m.model_id):
        return ChannelResult(url, "up-to-date", f"up to date: {m.model_id} version {m.version} is installed")
    size = sum(a.size for a in m.artifacts_for_platform(platform or current_platform()))
    return ChannelResult(url, "available", f"available: {m.model_id} version {m.version} ({size} bytes), "
                                           f"signed by {m.key_id}; `modelfs update` installs it")
