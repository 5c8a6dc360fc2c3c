"""Who may see which model: the visibility rules (DESIGN §4), decided here and only here.

A caller is (uid, app id), plus whether that identity could be established at all
(``sure``). A model is ``shared`` or ``private``:

    shared    every caller allowed on the mount sees it
    private   seen by
              - its owning app, as run by the uid that owns the model (the store's
                owner unless the model says otherwise);
              - an app granted the model, as run by the uid the grant names (by
                default the store owner's), or by any uid for a grant made with
                ``--any-uid`` (advisory: any uid can claim any app id);
              - the store owner's own processes that carry no app id (the user at a
                shell, who could read the store anyway);
              - a model another user pulled through the daemon without an app id
                (``owner_app`` NULL, ``owner_uid`` theirs): that user's processes
                without an app id.
              An owner's process that carries an app id sees what that app may see.
              A caller whose identity is not sure sees no private model.

What a caller may do through the daemon (DESIGN §8, :class:`Policy` below):

    the store owner   everything: its uid without an app id, identity sure
    anyone else       list what it sees, start pulls within ``apps.pull`` (deny |
                      signed | any) and its quota, see, pause, resume or cancel its
                      own pulls, remove the private models it owns. What it creates
                      is owned by its (app id, uid) and private.

An app id alone is never enough: every source of one can be faked by its own uid, so
ownership and grants bind the app id to a uid. What is a boundary and what is advisory
is in docs/security.md.

Pure logic: no /proc, no kernel, no SQL.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

SHARED = "shared"
PRIVATE = "private"
VISIBILITIES = (SHARED, PRIVATE)


@dataclass(frozen=True)
class Caller:
    uid: int
    app: str | None
    sure: bool = True


@dataclass(frozen=True)
class Grant:
    app: str
    model: str
    uid: int | None        # the uid the app must run as; None: any uid (advisory)


@dataclass(frozen=True)
class Owned:
    """What the policy needs of a model."""
    name: str
    visibility: str
    owner_app: str | None
    owner_uid: int | None  # None: the store owner's


def owner_key(caller: Caller, store_owner: int) -> tuple[str | None, int | None]:
    """(owner_app, owner_uid) as the catalog records a model ``caller`` creates: the
    store owner's uid is NULL there."""
    return caller.app, (None if caller.uid == store_owner else caller.uid)


def pull_refusal(mode: str, *, signed: bool) -> str | None:
    """Why ``apps.pull`` = ``mode`` refuses a caller's pull (None: allowed). ``signed``:
    the request can only be a signed pack."""
    if mode == "deny":
        return "the store's owner allows no pulls but their own (apps.pull = deny)"
    if mode == "signed" and not signed:
        return "only signed packs from trusted keys may be pulled (apps.pull = signed)"
    if mode not in ("signed", "any"):
        return f"apps.pull has an unknown value {mode!r}"
    return None


def quota_refusal(used: int, adding: int | None, quota: int | None) -> str | None:
    """Why a pull of ``adding`` bytes (None: unknown) is over ``quota`` when ``used``
    bytes are held already (None: allowed)."""
    if quota is None:
        return None
    if adding is None:
        return f"a quota of {quota} bytes applies, and the size of this pull is not known (give its size)"
    if used + adding > quota:
        return f"over the quota: {used} bytes held, {adding} more asked, {quota} allowed (apps.quota_bytes)"
    return None


class Policy:
    """The rules for one store, with its grants as of one catalog snapshot."""

    def __init__(self, store_owner: int, grants: Iterable[Grant] = ()) -> None:
        self.store_owner = store_owner
        self._grants: dict[tuple[str, str], set[int | None]] = {}
        for g in grants:
            self._grants.setdefault((g.app, g.model), set()).add(g.uid)

    def sees(self, caller: Caller, model: Owned) -> bool:
        if model.visibility != PRIVATE:
            return True
        if not caller.sure:
            return False
        if caller.app is None:
            return caller.uid == self.store_owner or self.owns(caller, model)
        if self.owns(caller, model):
            return True
        uids = self._grants.get((caller.app, model.name), set())
        return caller.uid in uids or None in uids

    def owns(self, caller: Caller, model: Owned) -> bool:
        """Whether ``model`` was created by (and belongs to) ``caller``'s app and uid."""
        if not caller.sure or (model.owner_app is None and model.owner_uid is None):
            return False  # no owner recorded: the store owner's
        owner_uid = self.store_owner if model.owner_uid is None else model.owner_uid
        return caller.app == model.owner_app and caller.uid == owner_uid

    def is_admin(self, caller: Caller) -> bool:
        """The store owner, who may do everything: its uid, no app id, sure. Root is not
        (as in the mount): root's CLI acts on a store as its owner, by becoming it."""
        return caller.sure and caller.app is None and caller.uid == self.store_owner

    @staticmethod
    def uniform(model: Owned) -> bool:
        """Whether every caller gets the same answer for ``model`` (only then may the
        kernel cache its entry)."""
        return model.visibility != PRIVATE
