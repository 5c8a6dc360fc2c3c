"""The store as one object: blobs + catalog + the operations that need both.

``Store.open(root)`` creates the layout, runs the recovery pass (stale temp files of
dead writers are removed and reported; partial downloads are kept) and opens the
catalog. Operations here keep the two halves consistent: a file row is only written
for a blob that is committed or that has a known SHA-256 and size to fetch; a blob is
only deleted after the rows that referenced it are gone.

Destructive operations are planned first (a frozen plan with the bytes it frees) and
executed second, so the CLI can print the plan or stop at ``--dry-run``.
"""

from __future__ import annotations

import dataclasses
import getpass
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import gguf, owner, rollout, settings, shards
from .blobs import BlobStore, RecoveryReport
from .catalog import Action, Catalog, FileRecord, ModelRecord, VersionRecord
from .errors import Conflict, GGUFError, NotFound, StoreError, TrustError, UsageError
from .layout import Layout, default_root
from .names import check_filename, check_model_name
from .prune import PrunePolicy, PruneStep, select
from .redact import redact_url

if TYPE_CHECKING:
    from .download import FetchResult

log = logging.getLogger(__name__)

Progress = Callable[[int], None]


def default_actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except Exception:  # no passwd entry (containers)
        return f"cli:uid{os.getuid()}"


def check_store_root(layout: Layout) -> None:
    """Refuse a named store path that is not a store (nor an empty directory)."""
    problem = layout.problem()
    if problem == "does not exist":
        raise NotFound(f"{layout.root} does not exist; create a store there with `modelfs init {layout.root}`",
                       path=str(layout.root))
    if problem is not None:
        raise NotFound(f"{layout.root} {problem}", path=str(layout.root))


@dataclass(frozen=True)
class ImportResult:
    model: str
    version: int
    new_version: bool          # False when the active version already had these bytes
    new_bytes: int             # bytes added to blobs/ (0 when everything was present)
    files: tuple[FileRecord, ...]


@dataclass(frozen=True)
class RemovalPlan:
    """What a removal will do, computed before anything is touched."""
    models: tuple[str, ...]
    versions: tuple[tuple[str, int], ...]
    blobs: tuple[tuple[str, int], ...]        # (sha256, size) that will be deleted
    kept_shared: tuple[tuple[str, str], ...]  # (sha256, other model) kept because still used
    quarantine: tuple[str, ...] = ()          # quarantine entries removed (prune only)
    steps: tuple[PruneStep, ...] = ()         # a policy prune's steps, least recently used first

    @property
    def freed_bytes(self) -> int:
        return sum(size for _, size in self.blobs)

    def as_dict(self) -> dict[str, Any]:
        return {"models": list(self.models), "versions": [list(v) for v in self.versions],
                "blobs": [{"sha256": s, "size": n} for s, n in self.blobs],
                "kept_shared": [{"sha256": s, "model": m} for s, m in self.kept_shared],
                "quarantine": list(self.quarantine), "freed_bytes": self.freed_bytes,
                "steps": [s.as_dict() for s in self.steps]}


@dataclass(frozen=True)
class VerifyResult:
    model: str
    version: int
    filename: str
    sha256: str
    status: str  # 'ok'; 'corrupt' (now quarantined); 'dehydrated' (not local, fetched on
                 # first open); 'missing' (not local and no source: its bytes are lost)
    active: bool = False  # the file belongs to its model's active version

    @property
    def failed(self) -> bool:
        """Whether this result makes ``verify`` fail: corrupt bytes, or an active file
        whose bytes are gone for good."""
        return self.status == "corrupt" or (self.status == "missing" and self.active)


@dataclass
class Store:
    layout: Layout
    blobs: BlobStore
    catalog: Catalog
    recovery: RecoveryReport = field(default_factory=RecoveryReport)
    repairs: tuple[str, ...] = ()     # modes this open repaired (owner.secure), for doctor
    actor: str = field(default_factory=default_actor)

    @classmethod
    def open(cls, root: Path | str | None = None, *, recover: bool = True, create: bool = True) -> Store:
        """Open the store at ``root`` (default: :func:`default_root`). With ``create=False``
        (a path the user named) it must already be a store or an empty directory: a
        mistyped path is an error naming ``modelfs init``, not a new empty store."""
        # The path to the root may pass through links the user made; nothing below it may.
        layout = Layout(Path(os.path.realpath(root if root is not None else default_root())))
        owner.enter(layout)  # root drops to the store's owner here, before touching anything
        if not create:
            check_store_root(layout)
        secured = owner.secure(layout, os.geteuid())
        blobs = BlobStore(layout)
        report = blobs.recover() if recover else RecoveryReport()
        store = cls(layout, blobs, Catalog(layout.catalog), report, repairs=tuple(secured.repairs))
        blobs.quarantine_cap = store.quarantine_cap
        return store

    @classmethod
    def init(cls, root: Path | str) -> tuple[Store, bool]:
        """Make ``root`` a store (creating the directory); returns (store, created). A
        directory that holds anything else is refused."""
        layout = Layout(Path(root))
        problem = layout.problem()
        if problem not in (None, "does not exist"):
            raise Conflict(f"{layout.root} {problem}; choose a new or empty directory", path=str(layout.root))
        existed = layout.catalog.exists()
        return cls.open(layout.root), not existed

    def close(self) -> None:
        self.catalog.close()

    def quarantine_cap(self) -> int:
        """How many bytes ``quarantine/`` may hold (see :mod:`store.blobs`):
        ``MODELFS_QUARANTINE_CAP`` bytes, else the size of the largest model version in
        the store, so a failed download of any of its models keeps one copy."""
        env = os.environ.get("MODELFS_QUARANTINE_CAP", "")
        if env.isdigit():
            return int(env)
        return self.catalog.largest_version_bytes()

    # -- import ------------------------------------------------------------------
    def import_model(self, name: str, weights: Path, *, mmproj: Path | None = None,
                     license: str | None = None, source_url: str | None = None,
                     owner_app: str | None = None, private: bool = False,
                     progress: Progress | None = None) -> ImportResult:
        """Copy ``weights`` (and ``mmproj``) into the store as a new unsigned version of
        ``name``. The first file of a split model (``m-00001-of-00003.gguf``) brings its
        siblings beside it (:func:`store.shards.find_siblings`), stored as role ``shard``
        under their own names; every header is read and the set checked whole
        (:func:`store.shards.check_split`) before a byte is copied."""
        check_model_name(name)
        weights = Path(weights)
        if not weights.is_file():
            raise NotFound(f"no such file: {weights}", path=str(weights))
        parts = shards.find_siblings(weights)
        sources: list[tuple[Path, str]] = [(p, "weights" if i == 0 else "shard") for i, p in enumerate(parts)]
        if mmproj is not None:
            sources.append((Path(mmproj), "mmproj"))
        for path, _ in sources:
            if not path.is_file():
                raise NotFound(f"no such file: {path}", path=str(path))
            check_filename(path.name)
        if len({p.name for p, _ in sources}) != len(sources):
            raise UsageError("the weights, its shards and the mmproj file must have different file names")
        # Refuse malformed files before a single byte is copied.
        info = gguf.parse_gguf(sources[0][0])
        if info.is_mmproj:
            raise UsageError(f"{sources[0][0].name} is a multimodal projector; pass it with --mmproj")
        shards.check_split([(parts[0].name, info), *((p.name, gguf.parse_gguf(p)) for p in parts[1:])])
        if mmproj is not None and not gguf.parse_gguf(Path(mmproj)).is_mmproj:
            raise UsageError(f"{Path(mmproj).name} is not a multimodal projector (mmproj) GGUF")
        self.check_unsigned_allowed(name, "import")
        self.blobs.check_space(sum(p.stat().st_size for p, _ in sources))

        records: list[FileRecord] = []
        new_bytes = 0
        for path, role in sources:
            committed = self.blobs.import_file(path, progress)
            new_bytes += committed.size if committed.new else 0
            records.append(FileRecord(path.name, role, committed.size, committed.sha256))
        records.sort(key=lambda r: r.filename)

        version, created = self.record_unsigned(
            name, records, info, action=Action.IMPORT, source=f"import:{sources[0][0].name}", license=license,
            source_url=source_url, owner_app=owner_app, new_bytes=new_bytes, private=private)
        return ImportResult(name, version, created, new_bytes, tuple(records))

    def record_unsigned(self, name: str, records: list[FileRecord], info: gguf.GGUFInfo, *, action: Action,
                        source: str, license: str | None, source_url: str | None, owner_app: str | None,
                        new_bytes: int, private: bool = False, owner_uid: int | None = None,
                        hub_repo: str | None = None, hub_commit: str | None = None) -> tuple[int, bool]:
        """Record ``records`` (verified, committed blobs) as a new unsigned version of
        ``name`` and activate it, in one transaction; the import and the unsigned pull
        both end here. Returns (version, created): the same files as the active version
        record nothing new. A model with signed versions takes no unsigned ones: its
        name belongs to its publisher (the converse of ``check_pack``'s rule).
        ``private`` makes the model private (owned by ``owner_app`` as ``owner_uid``), new or not.
        ``hub_repo`` and ``hub_commit`` say which hub repository (and commit) the files
        came from; each record's ``hub_path`` is its path there."""
        cat = self.catalog
        with cat.txn():
            self.check_unsigned_allowed(name, action)  # again, under the write lock
            if private:
                cat.ensure_model(name, owner_app, owner_uid=owner_uid)
                cat.set_visibility(name, "private", owner_app=owner_app, owner_uid=owner_uid, actor=self.actor)
            if cat.has_model(name):
                m = cat.get_model(name)
                if m.active_version is not None:
                    active = cat.get_version(name, m.active_version)
                    if _same_files(active.files, records):
                        cat.audit(self.actor, action, model=name, version=m.active_version,
                                  reason="already present", detail={"new_bytes": new_bytes})
                        return m.active_version, False
            version = cat.next_version(name)
            cat.ensure_model(name, owner_app, owner_uid=owner_uid)
            cat.add_version(
                name, version, records, signed=False, source=source, license=license,
                source_url=redact_url(source_url) if source_url else None,
                family=info.architecture, architecture=info.architecture,
                quantization=info.quantization, context_length=info.context_length,
                chat_template=info.has_chat_template, hub_repo=hub_repo, hub_commit=hub_commit)
            cat.audit(self.actor, action, model=name, version=version,
                      detail={"new_bytes": new_bytes, "source": source, "files": [r.filename for r in records]})
            cat.activate(name, version, actor=self.actor)
        return version, True

    def check_unsigned_allowed(self, name: str, action: str) -> None:
        """Refuse an unsigned version for a model whose publisher signed it. Called before
        any byte is copied or fetched, and again when the version is recorded."""
        if not self.catalog.has_model(name):
            return
        signed = [v.version for v in self.catalog.versions(name) if v.signed]
        if signed:
            raise Conflict(f"model {name!r} holds signed version(s) {', '.join(map(str, signed))}; "
                           f"an unsigned {action} cannot add to it (use another name)",
                           reason="signed-model", model=name)

    def record_validators(self, rec: FileRecord, result: FetchResult) -> None:
        """After ``rec``'s blob was fetched: keep the server's ETag and Last-Modified on
        the rows of that blob, when this fetch committed it and they are new. The
        downloader reports them and writes no SQL."""
        fresh = (result.etag, result.last_modified)
        if result.new and any(fresh) and fresh != (rec.etag, rec.last_modified):
            self.catalog.set_validators(rec.sha256, result.etag, result.last_modified)

    def record_gguf_card(self, rec: FileRecord) -> None:
        """After a weights file became local (a lazily pulled pack, fetched on first open or
        by a later pull): its GGUF header fills the card fields the signed payload left
        empty (architecture, quantization, context length, the chat template's presence),
        so ``list`` and the card show them. A file that is not a GGUF (a CoreML pack)
        fills nothing."""
        if rec.role != "weights" or not self.blobs.has(rec.sha256) or not self.catalog.card_gaps(rec.sha256):
            return
        try:
            info = gguf.parse_gguf(self.blobs.path(rec.sha256), name=rec.filename)
        except GGUFError as exc:
            log.debug("no GGUF card from %s: %s", rec.filename, exc)
            return
        self.catalog.fill_card(rec.sha256, architecture=info.architecture, quantization=info.quantization,
                               context_length=info.context_length, chat_template=info.has_chat_template)

    # -- reading -------------------------------------------------------------------
    def file_state(self, rec: FileRecord) -> str:
        """'local'; 'dehydrated' (fetched from its source on first open); 'missing' (no
        bytes and no source, e.g. an imported blob that was quarantined)."""
        if self.blobs.has(rec.sha256):
            return "local"
        return "dehydrated" if rec.url else "missing"

    def describe(self, m: ModelRecord, *, all_versions: bool = False) -> dict[str, Any]:
        versions = self.catalog.versions(m.name)
        pinned = m.name in self.catalog.pinned()
        out: dict[str, Any] = {
            "name": m.name, "active_version": m.active_version,
            "last_good_version": m.last_good_version, "owner_app": m.owner_app, "owner_uid": m.owner_uid,
            "visibility": m.visibility, "pinned": pinned, "last_used_at": m.last_used_at,
            "rollout": self.rollout_state(m),
        }
        active = next((v for v in versions if v.version == m.active_version), None)
        if active is not None:
            out.update(self._version_dict(active, m))
        if all_versions:
            out["versions"] = [self._version_dict(v, m) for v in versions]
        return out

    def _version_dict(self, v: VersionRecord, m: ModelRecord) -> dict[str, Any]:
        if v.version == m.active_version:
            state = "active"
        elif v.version == m.last_good_version:
            state = "last-good"
        else:
            state = v.state  # 'installed' or 'partial'
        files = [{"filename": f.filename, "role": f.role, "size": f.size, "sha256": f.sha256,
                  "state": self.file_state(f)} for f in v.files]
        return {"version": v.version, "state": state, "signed": v.signed, **v.card,
                "size": sum(f.size for f in v.files), "files": files}

    def list_models(self) -> list[dict[str, Any]]:
        return [self.describe(m) for m in self.catalog.list_models()]

    def show(self, name: str) -> dict[str, Any]:
        out = self.describe(self.catalog.get_model(name), all_versions=True)
        out["grants"] = [{"app_id": g["app_id"], "uid": g["uid"], "any_uid": g["any_uid"]}
                         for g in self.catalog.grants() if g["model"] == name]
        return out

    # -- verification ------------------------------------------------------------------
    def verify(self, name: str | None = None, progress: Progress | None = None) -> list[VerifyResult]:
        rows = [(m, v, f) for m, v, f in self.catalog.all_files() if name is None or m == name]
        if name is not None and not rows:
            self.catalog.get_model(name)  # raises NotFound for an unknown name
        results: list[VerifyResult] = []
        checked: dict[str, str] = {}
        active = {m.name: m.active_version for m in self.catalog.list_models()}
        for model, version, rec in rows:
            status = checked.get(rec.sha256)
            if status is None:
                if self.blobs.has(rec.sha256):
                    status = "ok" if self.blobs.verify(rec.sha256, progress) else "corrupt"
                    checked[rec.sha256] = status
                    if status == "ok":
                        self.record_gguf_card(rec)  # a card recorded before it had a field gets it
                else:
                    status = self.file_state(rec)
            results.append(VerifyResult(model, version, rec.filename, rec.sha256, status, active[model] == version))
            if status == "corrupt":
                self.catalog.audit(self.actor, Action.VERIFY, model=model, version=version, outcome="failed",
                                   reason=f"{rec.filename}: SHA-256 mismatch, blob quarantined",
                                   detail={"sha256": rec.sha256})
        return results

    # -- versions ----------------------------------------------------------------------
    def activate(self, name: str, version: int, *, force: bool = False) -> int | None:
        """Make ``version`` active; the version it replaces becomes last-good (see
        :meth:`Catalog.activate`). Returns the previously active version."""
        reason = self._check_activatable(self.catalog.get_version(name, version), force)
        return self.catalog.activate(name, version, actor=self.actor, reason=reason)

    def rollback(self, name: str, *, force: bool = False) -> int:
        """Go back to last-good; afterwards there is no last-good (see :meth:`Catalog.rollback`).
        Returns the version now active."""
        m = self.catalog.get_model(name)
        if m.last_good_version is None:
            raise Conflict(f"model {name!r} has no last-good version to roll back to", model=name)
        reason = self._check_activatable(self.catalog.get_version(name, m.last_good_version), force)
        return self.catalog.rollback(name, actor=self.actor, reason=reason)

    def _check_activatable(self, v: VersionRecord, force: bool) -> str | None:
        """Refuse a version whose bytes cannot be had, or (unless ``force``) one signed by a
        key that is no longer trusted. Returns the audit reason of a forced activation."""
        missing = [f.filename for f in v.files if not self.blobs.has(f.sha256) and not f.url]
        if missing:
            raise Conflict(f"version {v.version} of {v.model!r} cannot be activated: no bytes or source for "
                           f"{', '.join(missing)}")
        if not v.signed:
            return None
        from .keys import load_keyring  # cryptography costs ~100 ms: only signed versions need it

        key_id = str(v.card.get("key_id"))
        key = load_keyring(self.catalog).get(key_id)
        why = ("revoked" if key is not None and key.revoked else
               "no longer trusted" if key is None or key.problem else None)
        if why is None:
            return None
        if not force:
            raise TrustError(f"version {v.version} of {v.model!r} is signed by key {key_id!r}, which is {why}; "
                             "refusing to activate it (--force does, and is audited)",
                             reason="untrusted-signer", key_id=key_id, model=v.model, version=v.version)
        return f"forced: signed by key {key_id!r}, which is {why}"

    # -- rollout supervision (store.rollout decides) ----------------------------------------
    def rollout_rules(self) -> rollout.Rules:
        cat = self.catalog
        return rollout.Rules(int(settings.get(cat, "rollout.good_loads")),
                             float(settings.get(cat, "rollout.max_failure_increase")),
                             float(settings.get(cat, "rollout.window")))

    def _judge(self, m: ModelRecord, rules: rollout.Rules, now: float) -> rollout.Decision | None:
        """The verdict on ``m``'s candidate from the catalog's counts; None when it has none."""
        if m.candidate_since is None or m.active_version is None:
            return None
        (start, end), (b_start, b_end) = rollout.windows(m.candidate_since, rules)
        cand = rollout.Tally(*self.catalog.load_counts(m.name, m.active_version, start, end))
        base = rollout.Tally()
        if m.last_good_version is not None:
            base = rollout.Tally(*self.catalog.load_counts(m.name, m.last_good_version, b_start, b_end))
        return rollout.decide(cand, base, rules, has_last_good=m.last_good_version is not None,
                              window_over=now >= end)

    def rollout_state(self, m: ModelRecord, now: float | None = None) -> dict[str, Any] | None:
        """The probation of ``m``'s active version as ``list``, ``show`` and ``status`` show
        it; None when it is not a candidate."""
        if m.candidate_since is None:
            return None  # most models: no settings read, no count
        rules = self.rollout_rules()
        d = self._judge(m, rules, self.catalog.clock() if now is None else now)
        if d is None:
            return None
        return {"version": m.active_version, "started_at": m.candidate_since,
                "ends_at": m.candidate_since + rules.window, "good_loads": rules.good_loads,
                "last_good_version": m.last_good_version, **d.as_dict()}

    def report_load(self, name: str, ok: bool, version: int | None = None, *, uid: int | None = None,
                    app_id: str | None = None) -> tuple[int, rollout.Decision | None]:
        """Record that a caller loaded ``version`` of ``name`` (default: the active one), audited,
        and judge the candidate at once (the daemon judges again on its own). Returns the
        version reported and the verdict carried out, if the model has a candidate."""
        cat = self.catalog
        with cat.txn():
            m = cat.get_model(name)
            version = m.active_version if version is None else version
            if version is None:
                raise Conflict(f"model {name!r} has no active version to report a load of", model=name)
            cat.get_version(name, version)
            cat.add_load(name, version, ok, uid=uid, app_id=app_id)
            cat.audit(self.actor, Action.LOAD, model=name, version=version, outcome="ok" if ok else "failed",
                      detail={"uid": uid, "app": app_id})
        return version, self.supervise(name)

    def supervise(self, name: str, *, now: float | None = None) -> rollout.Decision | None:
        """Judge ``name``'s candidate and carry the verdict out: mark it good, or roll back to
        last-good (atomic, audited as the supervisor's). None when it has no candidate."""
        cat = self.catalog
        with cat.txn():  # judged and acted on under the write lock: a report cannot slip in between
            m = cat.get_model(name)
            d = self._judge(m, self.rollout_rules(), cat.clock() if now is None else now)
            if d is not None and d.verdict == "rollback":
                try:  # a last-good signed by a key revoked since is not gone back to on its own
                    self._check_activatable(cat.get_version(name, m.last_good_version or 0), force=False)
                except StoreError as exc:
                    d = dataclasses.replace(d, verdict="unhappy", reason=f"{d.reason}; last-good cannot be "
                                                                         f"activated: {exc}")
            if d is None or d.verdict in ("wait", "unhappy"):
                return d
            detail = {"by": "loads", **d.as_dict()}
            if d.verdict == "good":
                cat.mark_good(name, actor=rollout.SUPERVISOR, reason=d.reason, detail=detail)
            else:
                cat.rollback(name, actor=rollout.SUPERVISOR, reason=d.reason, detail=detail)
                log.warning("rolled %s back from version %s to %s: %s", name, m.active_version,
                            m.last_good_version, d.reason)
        return d

    def supervise_all(self, *, now: float | None = None) -> list[tuple[str, rollout.Decision]]:
        """:meth:`supervise` every model that has a candidate (the daemon's periodic pass)."""
        out = []
        for m in self.catalog.list_models():
            if m.candidate_since is not None:
                d = self.supervise(m.name, now=now)
                if d is not None:
                    out.append((m.name, d))
        return out

    def mark_good(self, name: str) -> int:
        """The admin's word that ``name``'s candidate is good (``modelfs mark-good``)."""
        m = self.catalog.get_model(name)
        d = self._judge(m, self.rollout_rules(), self.catalog.clock())
        detail = {"by": "admin", **(d.as_dict() if d is not None else {})}
        return self.catalog.mark_good(name, actor=self.actor, reason="marked good by the admin", detail=detail)

    # -- removal -------------------------------------------------------------------------
    def plan_remove(self, name: str, version: int | None = None) -> RemovalPlan:
        m = self.catalog.get_model(name)
        if version is not None:
            self.catalog.get_version(name, version)
            if version == m.active_version:
                raise Conflict(f"version {version} of {name!r} is active; activate another or remove the model")
            doomed_versions = [(name, version)]
            models: tuple[str, ...] = ()
        else:
            doomed_versions = [(name, v.version) for v in self.catalog.versions(name)]
            models = (name,)
        return self._plan_blob_removal(models, doomed_versions)

    def _plan_blob_removal(self, models: tuple[str, ...], doomed: list[tuple[str, int]],
                           quarantine: tuple[str, ...] = ()) -> RemovalPlan:
        doomed_set = set(doomed)
        users: dict[str, list[tuple[str, int]]] = {}
        for model, version, rec in self.catalog.all_files():
            users.setdefault(rec.sha256, []).append((model, version))
        blobs: list[tuple[str, int]] = []
        kept: list[tuple[str, str]] = []
        for sha, refs in sorted(users.items()):
            if not any(r in doomed_set for r in refs):
                continue
            others = [r for r in refs if r not in doomed_set]
            if others:
                kept.append((sha, others[0][0]))
            elif self.blobs.has(sha):
                blobs.append((sha, self.blobs.size(sha)))
        return RemovalPlan(models, tuple(sorted(doomed)), tuple(blobs), tuple(sorted(set(kept))), quarantine)

    def execute(self, plan: RemovalPlan, action: Action = Action.RM) -> int:
        """Carry out a plan. Rows go first, bytes second: a crash in between leaves an
        unreferenced blob (prune finds it), never a row without its bytes.

        A blob open in the mount is unlinked here but its bytes stay readable through
        the daemon's open descriptor; the kernel frees them at the last close."""
        cat = self.catalog
        with cat.txn():
            for model, version in plan.versions:
                if model not in plan.models:
                    cat.delete_version(model, version)
            for model in plan.models:
                cat.delete_model(model)
            for model in sorted({m for m, _ in plan.versions}):
                cat.audit(self.actor, action, model=model,
                          detail={"versions": [v for m2, v in plan.versions if m2 == model],
                                  "freed_bytes": plan.freed_bytes})
        still_used = cat.referenced_shas()
        freed = 0
        for sha, _ in plan.blobs:
            if sha not in still_used:  # a concurrent import may have claimed it again
                freed += self.blobs.remove(sha)
        for entry in plan.quarantine:
            path = self.layout.quarantine / entry
            if path.is_file():
                freed += path.stat().st_size
                path.unlink()
        return freed

    def plan_prune(self, *, keep_last_good: bool = True, include_quarantine: bool = True) -> RemovalPlan:
        """Versions that are neither active, last-good nor pinned; blobs nothing references."""
        pinned = self.catalog.pinned()
        doomed: list[tuple[str, int]] = []
        for m in self.catalog.list_models():
            if m.name in pinned:
                continue
            keep = {m.active_version} | ({m.last_good_version} if keep_last_good else set())
            doomed += [(m.name, v.version) for v in self.catalog.versions(m.name) if v.version not in keep]
        plan = self._plan_blob_removal((), doomed)
        referenced = self.catalog.referenced_shas()
        orphans = [(sha, self.blobs.size(sha)) for sha in self.blobs.iter_blobs() if sha not in referenced]
        quarantine = tuple(sorted(p.name for p in self.layout.quarantine.iterdir())) if include_quarantine else ()
        return RemovalPlan((), plan.versions, tuple(sorted(set(plan.blobs) | set(orphans))),
                           plan.kept_shared, quarantine)


    def plan_policy(self, policy: PrunePolicy, *, in_use: Iterable[tuple[str, int]] = (),
                    now: float | None = None) -> RemovalPlan:
        """A prune by last use and size (``store.prune``)."""
        s = select(self.catalog, self.blobs, policy, in_use=in_use, now=time.time() if now is None else now)
        return RemovalPlan(s.models, s.versions, s.blobs, s.kept_shared, (), s.steps)


def _same_files(a: tuple[FileRecord, ...], b: list[FileRecord]) -> bool:
    return sorted((f.filename, f.role, f.sha256) for f in a) == sorted((f.filename, f.role, f.sha256) for f in b)
