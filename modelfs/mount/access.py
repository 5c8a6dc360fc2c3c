"""Per-app visibility in the mount: the glue between the kernel's caller (uid, pid),
``identity`` (which app that process is) and ``modelfs_store.policy`` (what it may
see). Plugged into the tree as its :class:`~modelfs.mount.tree.Visibility`.

A shared model is answered without reading ``/proc``: only private models cost an
identity lookup (cached for a second per process). The policy and the table of
registered executables are replaced whole after every catalog change (a grant shows
within a second); the answers for private models are never cached by the kernel
(``uniform`` is False for them, so their entries have a zero timeout).
"""

from __future__ import annotations

from collections.abc import Callable

from modelfs_store.catalog import ModelRecord
from modelfs_store.policy import PRIVATE, Caller, Grant, Owned, Policy

from .identity import ExeTable, Identity, Resolver
from .tree import Caller as Request


class AppVisibility:
    def __init__(self, store_owner: int, resolver: Resolver | None = None) -> None:
        self.store_owner = store_owner
        self.resolver = resolver or Resolver()
        self.policy = Policy(store_owner)

    def update(self, grants: list[dict[str, object]], exes: ExeTable) -> None:
        """New catalog rows: swap in a new policy and executable table (atomic swaps:
        called from a worker thread while handlers read them)."""
        self.policy = Policy(self.store_owner, [
            Grant(str(g["app_id"]), str(g["model"]),
                  None if g["any_uid"] else (self.store_owner if g["uid"] is None else int(str(g["uid"]))))
            for g in grants])
        self.resolver.exes = exes

    def identify(self, request: Request) -> Identity:
        return self.resolver.identify(request.pid, request.uid)

    def allows(self, caller: Request, model: ModelRecord) -> bool:
        return self.for_caller(caller)(model)

    def for_caller(self, request: Request) -> Callable[[ModelRecord], bool]:
        """The answer for one request: the caller is identified at most once, and only
        if a private model is asked about."""
        policy = self.policy
        who: list[Caller] = []

        def allows(model: ModelRecord) -> bool:
            if model.visibility != PRIVATE:
                return True
            if not who:
                ident = self.identify(request)
                who.append(Caller(ident.uid, ident.app, ident.sure))
            return policy.sees(who[0], Owned(model.name, model.visibility, model.owner_app, model.owner_uid))

        return allows

    def uniform(self, model: ModelRecord) -> bool:
        return model.visibility != PRIVATE
