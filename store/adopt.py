"""``modelfs adopt``: take the models other tools' caches hold into the store, without a
second copy on disk. A plan first (:func:`plan`), frozen, with what each file would
cost; then :func:`execute`.

How each file comes in, the first way that applies (``BlobStore.commit_existing``):

    present    the store already holds its bytes (its cache named them): nothing to do
    reflink    the store's file system shares extents (``FICLONE``), and the file is on it
    hardlink   a blob its tool names by its hash and never rewrites (the Hugging Face
               cache's ``blobs/``, Ollama's ``blobs/sha256-*``: never an LM Studio file or
               a plain directory's), of the store's owner, on the store's file system,
               that no one else may write, with no other name and no setuid bit
               (``blobs.hardlink_problem``), and no one has open for writing (a read
               lease, at adoption).
               The shared inode becomes read-only (0444) and carries the store's digest
               xattr; it is never made immutable (its tool must still be able to delete
               its name: ``store.seal``)
    copy       only when asked (``--copy``); without it the model is skipped, "needs --copy"

Every file read is hashed once and must match the name its cache gave it (a Hugging
Face blob's SHA-256, or git's SHA-1 for a small file; an Ollama layer's digest and
size). A mismatch is reported, that model is skipped, the others go on. Nothing in
the other tool's cache is written, renamed or deleted (a hard-linked inode's 0444 and
the store's digest xattr on it are the only changes; the plan says so).

Names: each model gets the name its cache suggests (:mod:`.caches`). A model whose files
already are the active version of a model in the store is skipped ("already adopted as
NAME"). A name held by a model adopted from the same place (the same source and weights
file name: a Hugging Face repository at a newer commit, an Ollama tag pulled again)
gets a new version, activated, the old one kept as last-good for ``rollback``, when the
files offered are the store owner's (another user's cache may claim any source). Any
other model's name is never added to: the model gets the first free ``NAME-2``, ``NAME-3``, ...
instead.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import gguf
from .blobs import CHUNK, hardlink_problem
from .caches import TOOLS, Candidate, Discovery, Found, Located, Place, Refusal, discover
from .catalog import Action, FileRecord
from .core import Store
from .errors import IntegrityError, StoreError
from .names import model_name_problem
from .owner import open_file, owner_of

log = logging.getLogger(__name__)

Progress = Callable[[int], None]


@dataclass(frozen=True)
class PlannedFile:
    found: Found
    method: str              # 'present', 'reflink', 'hardlink', 'copy', 'needs-copy'
    why: str | None = None   # why not a link (a 'copy' or 'needs-copy')

    @property
    def cost_bytes(self) -> int:
        return self.found.where.size if self.method == "copy" else 0


@dataclass(frozen=True)
class PlanEntry:
    candidate: Candidate
    name: str
    files: tuple[PlannedFile, ...]
    skip: str | None = None  # why it is not adopted, or None
    update: bool = False     # a new version of ``name``, adopted from the same place before

    @property
    def cost_bytes(self) -> int:
        return 0 if self.skip else sum(f.cost_bytes for f in self.files)

    @property
    def saved_bytes(self) -> int:
        """What linking instead of copying saves (a file already present saves nothing more)."""
        return 0 if self.skip else sum(f.found.where.size for f in self.files if f.method in ("reflink", "hardlink"))


@dataclass(frozen=True)
class AdoptPlan:
    places: tuple[Place, ...]
    entries: tuple[PlanEntry, ...]
    refused: tuple[Refusal, ...]
    copy: bool

    @property
    def cost_bytes(self) -> int:
        return sum(e.cost_bytes for e in self.entries)

    @property
    def saved_bytes(self) -> int:
        return sum(e.saved_bytes for e in self.entries)

    @property
    def read_bytes(self) -> int:
        """What executing it reads (and hashes): every file not already present."""
        return sum(f.found.where.size for e in self.entries if not e.skip for f in e.files if f.method != "present")


@dataclass
class Outcome:
    """What became of one entry of a plan."""
    entry: PlanEntry
    status: str                                  # 'adopted', 'skipped', 'failed'
    reason: str | None = None
    name: str | None = None
    version: int | None = None
    methods: dict[str, str] = field(default_factory=dict)   # filename -> how it came in
    records: list[FileRecord] = field(default_factory=list)
    cost_bytes: int = 0
    saved_bytes: int = 0
    exit_code: int = 0                           # a failure's (the store error's class), else 0


# -- the plan ---------------------------------------------------------------------------------
def plan(store: Store, sources: Sequence[str] = (), *, copy: bool = False, env: Mapping[str, str] | None = None,
         home: Path | None = None) -> AdoptPlan:
    """What adopting the caches ``sources`` (``hf``, ``ollama``, ``lmstudio`` or a
    directory; none: the three tools' own) would do. Reads headers, changes nothing."""
    env = os.environ if env is None else env
    home = Path.home() if home is None else home
    found = Discovery()
    for spec in dict.fromkeys(sources or TOOLS):
        found.extend(discover(spec, env, home))
    blob_dev, owner = _store_ids(store)
    reflinks = store.blobs.can_reflink()
    active = _active_sets(store)
    taken = {m.name for m in store.catalog.list_models()}
    updated: set[str] = set()  # names this plan gives a new version
    entries = []
    coming: set[str] = set()  # blobs an earlier entry brings: present by then (a shared projector)
    for c in found.candidates:
        files = tuple(PlannedFile(f, "present") if f.where.sha256 in coming
                      else _method(store, f, blob_dev, owner, reflinks, copy) for f in c.files)
        update = (c.name in taken and c.name not in updated and store.catalog.has_model(c.name)
                  and _same_place(store, c.name, c))
        name = c.name if update else _free_name(c.name, taken)
        skip = None
        shas = frozenset(f.found.where.sha256 for f in files)
        if None not in shas and shas in active:
            skip, name = f"already adopted as {active[shas]}", active[shas]
        elif any(f.method == "needs-copy" for f in files):
            why = next(f.why for f in files if f.method == "needs-copy")
            skip = f"needs --copy ({why})"
        if skip is None:
            taken.add(name)
            if update:
                updated.add(name)
            coming.update(f.found.where.sha256 for f in files if f.found.where.sha256)
            if None not in shas:
                active[shas] = name  # the same bytes twice in one plan: once
        entries.append(PlanEntry(c, name, files, skip, update and skip is None))
    return AdoptPlan(tuple(found.places), tuple(entries), tuple(found.refused), copy)


def _store_ids(store: Store) -> tuple[int, int]:
    """The blobs directory's file system (a hard link or reflink needs the same one) and the
    store's owner, both read without following a link (the store holds none)."""
    return os.lstat(store.layout.blobs).st_dev, owner_of(store.layout.root)


def _method(store: Store, f: Found, blob_dev: int, owner: int, reflinks: bool, copy: bool) -> PlannedFile:
    w = f.where
    if w.sha256 is not None and store.blobs.has(w.sha256):
        return PlannedFile(f, "present")
    if w.dev == blob_dev and reflinks:
        return PlannedFile(f, "reflink")
    why = _no_hardlink(w, blob_dev, owner)
    if why is None:
        return PlannedFile(f, "hardlink")
    return PlannedFile(f, "copy" if copy else "needs-copy", why)


def _no_hardlink(w: Located, blob_dev: int, owner: int) -> str | None:
    """Why the file may not be hard-linked into the store, or None."""
    if not w.content_addressed:
        return "not a blob named by its hash: its tool may rewrite it in place"
    if w.dev != blob_dev:
        return "on another file system than the store"
    if w.uid != owner:
        return f"owned by uid {w.uid}, not by the store's owner (uid {owner})"
    return hardlink_problem(w.mode, w.nlink)


def _ways(p: PlannedFile, blob_dev: int, owner: int, copy: bool) -> tuple[str, ...]:
    """The ways :meth:`BlobStore.commit_existing` may take for ``p``, in order."""
    w = p.found.where
    ways = ["reflink"] if w.dev == blob_dev else []
    if _no_hardlink(w, blob_dev, owner) is None:
        ways.append("hardlink")
    if copy:
        ways.append("copy")
    return tuple(ways)


def _active_sets(store: Store) -> dict[frozenset[str | None], str]:
    """The SHA-256 set of each model's active version -> its name."""
    out: dict[frozenset[str | None], str] = {}
    for m in store.catalog.list_models():
        if m.active_version is not None:
            v = store.catalog.get_version(m.name, m.active_version)
            out.setdefault(frozenset(f.sha256 for f in v.files), m.name)
    return out


def _same_place(store: Store, name: str, c: Candidate) -> bool:
    """Whether model ``name``'s active version came from where ``c`` is: the same source
    and the same weights file name, unsigned (a publisher's signed model is never added to),
    and ``c``'s files are the store owner's own: a cache another user keeps may claim any
    source (its folder names say which) and must never give the store's model a new
    active version."""
    m = store.catalog.get_model(name)
    if m.active_version is None:
        return False
    if any(f.where.uid != owner_of(store.layout.root) for f in c.files):
        return False
    v = store.catalog.get_version(name, m.active_version)
    weights = {f.filename for f in v.files if f.role == "weights"}
    mine = {f.filename for f in c.files if f.role == "weights"}
    return not v.signed and v.card.get("source") == c.source and weights == mine


def _free_name(name: str, taken: set[str]) -> str:
    if model_name_problem(name) is not None:
        name = "model"
    if name not in taken:
        return name
    n = 2
    while f"{name}-{n}" in taken:
        n += 1
    return f"{name}-{n}"


# -- carrying it out ------------------------------------------------------------------------------
def execute(store: Store, p: AdoptPlan, progress: Progress | None = None,
            on_done: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """Adopt every entry of ``p`` not skipped. A file that fails its check (or vanished,
    or changed since the plan) fails its model only; the others go on."""
    blob_dev, owner = _store_ids(store)
    out = []
    for entry in p.entries:
        if entry.skip:
            o = Outcome(entry, "skipped", entry.skip, entry.name)
        else:
            o = _adopt_one(store, entry, blob_dev, owner, p.copy, progress)
        out.append(o)
        if on_done is not None:
            on_done(o)
    return out


def _adopt_one(store: Store, entry: PlanEntry, blob_dev: int, owner: int, copy: bool,
               progress: Progress | None) -> Outcome:
    o = Outcome(entry, "failed", name=entry.name)
    new: list[str] = []
    c = entry.candidate
    weights_info = c.info
    # A cache's folder names say which hub repository a file is from; only the store
    # owner's own cache is believed. Another user's could claim `acme/X`, and the mount's
    # .hf view would then hand its bytes to every library asking the hub cache for acme/X.
    mine = all(f.where.uid == owner for f in c.files)
    try:
        for pf in entry.files:
            f, w = pf.found, pf.found.where
            try:
                fd = w.open()
            except Refusal as r:
                raise StoreError(f"{r.path}: {r.reason}") from None
            try:
                if w.git_sha1 is not None:
                    _check_git_sha1(fd, w.git_sha1)
                got = store.blobs.commit_existing(fd, _ways(pf, blob_dev, owner, copy), expected_sha256=w.sha256,
                                                  expected_size=w.size, progress=progress,
                                                  trust_name=w.uid == owner)  # another user's: hashed
            except StoreError as exc:
                raise type(exc)(f"{w.shown}: {exc}", **exc.fields) from None
            finally:
                os.close(fd)
            if got.committed.new:
                new.append(got.committed.sha256)
            if w.git_sha1 is not None:  # again, on the bytes committed: the file may have changed since
                cfd = open_file(got.committed.path, os.O_RDONLY)
                try:
                    _check_git_sha1(cfd, w.git_sha1)
                except IntegrityError as exc:
                    raise IntegrityError(f"{w.shown}: {exc}", **exc.fields) from None
                finally:
                    os.close(cfd)
            # The header again, of the bytes committed (the plan read the file before they were hashed).
            info = gguf.parse_gguf(got.committed.path, name=f.filename)
            if info.is_mmproj != (f.role == "mmproj"):
                raise StoreError(f"{w.shown}: no longer the {f.role} file the plan found")
            if f.role == "weights":
                weights_info = info
            o.methods[f.filename] = got.how
            o.cost_bytes += got.committed.size if got.how == "copy" and got.committed.new else 0
            o.saved_bytes += got.committed.size if got.how in ("reflink", "hardlink") else 0
            o.records.append(FileRecord(f.filename, f.role, got.committed.size, got.committed.sha256,
                                        hub_path=f.hub_path if mine else None))
        shas = frozenset(r.sha256 for r in o.records)
        already = _active_sets(store).get(shas)  # LM Studio's and a directory's files: known only now
        if already is not None:
            o.status, o.reason, o.name = "skipped", f"already adopted as {already}", already
            o.cost_bytes = o.saved_bytes = 0
            return o
        name = entry.name
        if store.catalog.has_model(name) and not (entry.update and _same_place(store, name, c)):
            name = _free_name(name, {m.name for m in store.catalog.list_models()})  # taken since the plan
        records = sorted(o.records, key=lambda r: r.filename)
        new_bytes = sum(r.size for r in records if r.sha256 in new)
        o.version, _ = store.record_unsigned(
            name, records, weights_info, action=Action.ADOPT, source=c.source, license=None, source_url=c.source_url,
            owner_app=None, new_bytes=new_bytes, hub_repo=c.hub_repo if mine else None,
            hub_commit=c.hub_commit if mine else None)
        o.status, o.name, o.records = "adopted", name, records
    except (StoreError, OSError) as exc:
        o.reason = str(exc) if isinstance(exc, StoreError) else f"{exc.strerror or exc}"
        o.exit_code = exc.exit_code if isinstance(exc, StoreError) else 1
        o.cost_bytes = o.saved_bytes = 0
        log.warning("not adopted: %s: %s", entry.name, o.reason)
        _drop_unreferenced(store, new)
    return o


def _check_git_sha1(fd: int, expected: str) -> None:
    """A Hugging Face blob named by git's SHA-1 (a small file kept without LFS)."""
    size = os.fstat(fd).st_size
    h = hashlib.sha1(b"blob %d\0" % size, usedforsecurity=False)
    off = 0
    while chunk := os.pread(fd, CHUNK, off):
        h.update(chunk)
        off += len(chunk)
    if h.hexdigest() != expected:
        raise IntegrityError(f"git SHA-1 mismatch: its bytes hash to {h.hexdigest()[:16]}…, its cache names "
                             f"{expected[:16]}…", got=h.hexdigest(), expected=expected)


def _drop_unreferenced(store: Store, shas: list[str]) -> None:
    """Blobs a failed model committed and nothing references: removed (the store's name
    only; a hard-linked cache file keeps its own)."""
    if not shas:
        return
    used = store.catalog.referenced_shas()
    for sha in shas:
        if sha not in used:
            store.blobs.remove(sha)


# -- as JSON and for people --------------------------------------------------------------------------
def as_dict(p: AdoptPlan, outcomes: list[Outcome] | None = None) -> dict[str, Any]:
    """The plan (``outcomes`` None: a dry run) or what was done, as ``--json`` prints it."""
    done = {id(o.entry): o for o in outcomes or []}
    models = []
    for e in p.entries:
        o = done.get(id(e))
        status = o.status if o else ("skipped" if e.skip else "planned")
        sha = {r.filename: r.sha256 for r in (o.records if o else [])}
        models.append({
            "name": o.name if o and o.name else e.name, "update": e.update,
            "tool": e.candidate.tool, "origin": e.candidate.origin,
            "source": e.candidate.source, "status": status, "reason": o.reason if o else e.skip,
            "version": o.version if o else None,
            "cost_bytes": o.cost_bytes if o else e.cost_bytes, "saved_bytes": o.saved_bytes if o else e.saved_bytes,
            "files": [{"filename": f.found.filename, "role": f.found.role, "size": f.found.where.size,
                       "sha256": sha.get(f.found.filename, f.found.where.sha256), "path": f.found.where.shown,
                       "method": o.methods.get(f.found.filename, f.method) if o else f.method, "reason": f.why}
                      for f in e.files]})
    return {
        "dry_run": outcomes is None, "copy": p.copy,
        "places": [{"tool": pl.tool, "path": pl.path, "found": pl.found, "reason": pl.reason} for pl in p.places],
        "models": models,
        "refused": [{"path": r.path, "reason": r.reason} for r in p.refused],
        "cost_bytes": sum(m["cost_bytes"] for m in models), "saved_bytes": sum(m["saved_bytes"] for m in models),
    }

