"""What every verb of the ``modelfs`` command shares: the context object with its
lazily opened store, the decorators that hand it over, and logging set-up.

Verbs import from here; nothing here imports a verb. The store's modules load when a
verb first needs the store: ``modelfs --help`` and ``--version`` never do.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from modelfs_store.layout import Layout, default_root
from modelfs_store.redact import redact_text

from ._output import human_size, info

if TYPE_CHECKING:
    from modelfs.mount.socketclient import ControlClient
    from modelfs_store.core import Store

#: This command's arguments (without the program name), for running it again as the
#: owner of another user's store (:meth:`Ctx.become_owner`). Set by ``modelfs.cli.main``.
ARGV: list[str] = []


class Ctx:
    """Per-invocation state: the store root and verbosity from the group's options, and
    the store itself, opened on first use (``--help`` and ``keys generate`` need none)."""

    def __init__(self, root: str | None, verbose: int) -> None:
        self.root = root
        self.verbose = verbose
        self._store: Store | None = None

    @property
    def root_path(self) -> Path:
        """The store directory, absolute (the daemon runs with ``/`` as its directory)."""
        return Path(self.root if self.root else default_root()).absolute()

    def check_root(self, *, become_owner: bool = True) -> None:
        """Refuse a mistyped --store before a daemon would create it (see :attr:`store`).
        Unless told otherwise, root acting on another user's store becomes that user."""
        from modelfs_store.core import check_store_root

        if become_owner:
            self.become_owner()
        if self.root is not None:
            check_store_root(Layout(self.root_path))

    def become_owner(self) -> None:
        """Root acting on another user's store runs the whole command as that user: it
        drops to them and starts this command again, so that every module it imports
        later comes from where that user can read (the store itself drops in-process
        too, but a Python installed under root's home may be unreadable afterwards)."""
        from modelfs_store import owner

        uid = owner.foreign_owner(self.root_path)
        if uid is None:
            return
        sys.stdout.flush()
        sys.stderr.flush()
        # The interpreter is opened while still root: the user may not be allowed to
        # traverse to it (a Python under /root), but may run it once it is open.
        exe = os.open(sys.executable, os.O_RDONLY)
        os.set_inheritable(exe, True)
        owner.drop_privileges(uid, owner.owner_gid(self.root_path, uid))
        os.execv(f"/proc/self/fd/{exe}", [sys.executable, "-P", "-m", "modelfs", *ARGV])

    def daemon(self) -> ControlClient | None:
        """A client of the daemon serving this store (the work is then its), or None: no
        daemon answers, and the command works in this process. Root acting on another
        user's store becomes that user first; another user of a system store finds its
        daemon at the system socket."""
        self.become_owner()
        from modelfs.mount.socketclient import find_daemon
        from modelfs_store import owner
        from modelfs_store.errors import StoreError

        try:
            own = owner.owner_of(self.root_path) == os.geteuid()
        except StoreError:
            own = False
        return find_daemon(self.root_path, own_store=own)

    @property
    def store(self) -> Store:
        if self._store is None:
            from modelfs_store.core import Store

            # Only the default location is created implicitly; a path the user named
            # (--store, MODELFS_STORE) must be a store already, or an empty directory.
            self.become_owner()
            self._store = Store.open(self.root, create=self.root is None)
            rec = self._store.recovery
            if rec.stale_temps:
                info(f"recovered: removed {len(rec.stale_temps)} stale temp file(s) "
                     f"({human_size(rec.freed_bytes)}) left by an interrupted import")
        return self._store

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None


pass_ctx = click.make_pass_decorator(Ctx)
json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


class RedactingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact_text(super().format(record))


def setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(RedactingFormatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # httpx logs every request with its full URL at INFO; signed URLs must not leak.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
