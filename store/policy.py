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
                shell, who could read the store anyway).
              An owner's process that carries an app id sees what that app may see.
              A caller whose identity is not sure sees no private model.

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
            return caller.uid == self.store_owner
        owner_uid = self.store_owner if model.owner_uid is None else model.owner_uid
        if caller.app == model.owner_app and caller.uid == owner_uid:
            return True
        uids = self._grants.get((caller.app, model.name), set())
        return caller.uid in uids or None in uids

    @staticmethod
    def uniform(model: Owned) -> bool:
        """Whether every caller gets the same answer for ``model`` (only then may the
        kernel cache its entry)."""
        return model.visibility != PRIVATE
