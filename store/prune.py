"""Prune by policy: least recently used first, down to an age or a size.

``modelfs prune --older-than DURATION --max-bytes SIZE [--app ID] [--include-active]``
plans (:meth:`Store.plan_policy`), and executes only what it planned (:meth:`Store.execute`):

- candidates are versions of models that are not pinned (and, with ``--app``, owned by
  that app), never a version a reader holds open through the mount, and never an
  active or last-good version unless ``include_active`` (then whole models may go);
- they are taken least recently used first (the model's last use through the mount or
  the API, else when it was created; then the oldest version first), each while it is
  older than ``older_than`` or while the store holds more than ``max_bytes``;
- each step says the bytes it frees (blobs no remaining version uses) and the bytes it
  keeps because another version or model shares them.

Plan only: this module reads the catalog and the blobs' sizes, and writes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .blobs import BlobStore
from .catalog import Catalog, ModelRecord


@dataclass(frozen=True)
class PrunePolicy:
    older_than: float | None = None   # seconds since last use
    max_bytes: int | None = None      # the store's blob bytes to get under
    app: str | None = None            # only models this app owns
    include_active: bool = False      # active and last-good versions may go too


@dataclass(frozen=True)
class PruneStep:
    model: str
    version: int
    last_used_at: float
    reason: str                       # 'older than the limit' or 'over the size limit'
    freed_bytes: int
    kept_shared_bytes: int

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Selection:
    """What a policy prune removes; ``Store.plan_policy`` makes it a RemovalPlan."""
    models: tuple[str, ...]                   # every version of these goes
    versions: tuple[tuple[str, int], ...]
    blobs: tuple[tuple[str, int], ...]        # (sha256, size) no remaining version uses
    kept_shared: tuple[tuple[str, str], ...]  # (sha256, a model that still uses it)
    steps: tuple[PruneStep, ...]


def _candidates(catalog: Catalog, policy: PrunePolicy, in_use: set[tuple[str, int]]
                ) -> list[tuple[float, str, int]]:
    pinned = catalog.pinned()
    out = []
    for m in catalog.list_models():
        if m.name in pinned or (policy.app is not None and m.owner_app != policy.app):
            continue
        keep = set() if policy.include_active else {m.active_version, m.last_good_version}
        used = _last_use(m)
        out += [(used, m.name, v.version) for v in catalog.versions(m.name)
                if v.version not in keep and (m.name, v.version) not in in_use]
    return sorted(out)


def _last_use(m: ModelRecord) -> float:
    return m.last_used_at if m.last_used_at is not None else m.created_at


def select(catalog: Catalog, blobs: BlobStore, policy: PrunePolicy, *, in_use: Iterable[tuple[str, int]] = (),
           now: float) -> Selection:
    users: dict[str, set[tuple[str, int]]] = {}
    sizes: dict[str, int] = {}
    for model, version, rec in catalog.all_files():
        users.setdefault(rec.sha256, set()).add((model, version))
        if blobs.has(rec.sha256):
            sizes[rec.sha256] = rec.size
    total = sum(blobs.size(sha) for sha in blobs.iter_blobs())
    doomed: set[tuple[str, int]] = set()
    freed_shas: set[str] = set()
    steps: list[PruneStep] = []
    for used, model, version in _candidates(catalog, policy, set(in_use)):
        old = policy.older_than is not None and used < now - policy.older_than
        big = policy.max_bytes is not None and total > policy.max_bytes
        if not (old or big):
            continue
        doomed.add((model, version))
        mine = {sha for sha, refs in users.items() if (model, version) in refs and sha in sizes}
        free = {sha for sha in mine - freed_shas if users[sha] <= doomed}
        freed_shas |= free
        freed = sum(sizes[s] for s in free)
        total -= freed
        steps.append(PruneStep(model, version, used, "older than the limit" if old else "over the size limit",
                               freed, sum(sizes[s] for s in mine - free - freed_shas)))
    versions_by_model: dict[str, set[int]] = {}
    for model, version, _rec in catalog.all_files():
        versions_by_model.setdefault(model, set()).add(version)
    models = tuple(sorted(m for m, vs in versions_by_model.items() if {(m, v) for v in vs} <= doomed))
    kept = tuple(sorted({(sha, next(iter(sorted(refs - doomed)))[0]) for sha, refs in users.items()
                         if refs & doomed and refs - doomed and sha in sizes}))
    freed_blobs = tuple(sorted((sha, sizes[sha]) for sha in freed_shas))
    return Selection(models, tuple(sorted(doomed)), freed_blobs, kept, tuple(steps))
