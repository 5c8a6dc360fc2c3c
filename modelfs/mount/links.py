"""The fast path: which caller is answered a local file as a symbolic link to its blob.

Through the link, reads, mmaps and readahead run in the kernel on the blob itself, at
native speed; the daemon serves nothing. So the link is offered only to a caller that
could already read the blob without the mount, and only in a way that lets nobody
write it. All of these must hold, or the caller gets the regular FUSE file:

    mode      the mount runs with ``--links auto``
    uid       the caller's uid is the store owner's (the daemon runs as the owner)
    place     its root directory and mount namespace are the daemon's, so the absolute
              path into the store names the same file for it (a container, a chroot,
              ``unshare -m``: elsewhere); a place that cannot be read is elsewhere
    sandbox   it carries no Flatpak or Snap app id, and its identity could be read
    blob      the file's blob is committed (a regular file, no write bit: a non-root
              owner meets EACCES on a write open) and carries its digest xattr (a
              reader following the link sees ``user.modelfs.sha256`` there)
    root      for a caller of uid 0, whom modes do not stop, the blob is immutable too
              (``store.seal``; EPERM on any write open)

A blob committed before the marks existed is sealed once (``BlobStore.seal``) when a
caller that may follow links first looks it up. What a blob carries is cached by its
device, inode and ctime (setting a mark changes the ctime), so a lookup costs one
``lstat`` of the blob and the caller's cached identity.

The answer depends on the caller, so both the link and the regular file are entries
the kernel never caches (timeouts in ``tree``), and they are two inode numbers: one
number never changes type. This module decides; ``tree.Namespace`` picks the variant
with it at lookup, listing and readlink. No pyfuse3 here.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from modelfs_store.catalog import FileRecord
from modelfs_store.errors import StoreError
from modelfs_store.seal import Marks

from .identity import Place, Resolver
from .tree import Caller, Node

log = logging.getLogger(__name__)

LINK_MODES = ("auto", "never")
MARKS_CACHE = 65536


class Blobs(Protocol):
    """What the fast path needs of ``modelfs_store.blobs.BlobStore``."""

    def path(self, sha256: str) -> Path: ...

    def marks(self, sha256: str) -> Marks: ...

    def seal(self, sha256: str) -> Marks: ...


class FastPath:
    def __init__(self, mode: str, owner: int, resolver: Resolver, blobs: Blobs, *,
                 here: Place | None = None) -> None:
        if mode not in LINK_MODES:
            raise ValueError(f"links must be one of {LINK_MODES}")
        self.mode = mode
        self.owner = owner
        self.resolver = resolver
        self.blobs = blobs
        self.here = here if here is not None else resolver.place("self")
        self._marks: dict[str, tuple[tuple[int, int, int], Marks]] = {}

    @property
    def enabled(self) -> bool:
        """Whether any caller may get a link (and the tree has link inodes at all)."""
        return self.mode == "auto" and self.here is not None

    def target(self, rec: FileRecord) -> str:
        """Where a file's link points: its committed blob, an absolute path."""
        return str(self.blobs.path(rec.sha256))

    def follows(self, caller: Caller) -> bool:
        """Whether ``caller`` could read the store itself, from where the daemon stands."""
        if not self.enabled or caller.uid != self.owner:
            return False
        ident = self.resolver.identify(caller.pid, caller.uid)
        return ident.sure and not ident.sandboxed and ident.place == self.here

    def for_caller(self, caller: Caller) -> Callable[[Node], bool]:
        """Whether ``caller`` gets the link for each file asked about (a listing asks
        for many): the caller is identified once, for this request only."""
        if not self.follows(caller):
            return _never
        as_root = caller.uid == 0
        return lambda node: node.kind == "file" and node.file is not None and \
            self.ready(node.file.sha256, as_root)

    def offers(self, caller: Caller, node: Node) -> bool:
        return self.for_caller(caller)(node)

    def ready(self, sha256: str, as_root: bool) -> bool:
        """Whether the blob may stand behind a link: committed and sealed (immutable too
        for root). Not local yet: False, and the daemon re-announces it once fetched."""
        try:
            st = os.lstat(self.blobs.path(sha256))
        except FileNotFoundError:
            return False
        if not stat.S_ISREG(st.st_mode) or st.st_mode & 0o222:
            return False
        marks = self._marks_of(sha256, st)
        return marks is not None and marks.digest and (marks.immutable or not as_root)

    def _marks_of(self, sha256: str, st: os.stat_result) -> Marks | None:
        key = (st.st_dev, st.st_ino, st.st_ctime_ns)
        hit = self._marks.get(sha256)
        if hit is not None and hit[0] == key:
            return hit[1]
        try:
            marks = self.blobs.marks(sha256)
            if not marks.digest or not marks.immutable:
                marks = self.blobs.seal(sha256)  # a blob from before the marks; idempotent
                after = os.lstat(self.blobs.path(sha256))
                key = (after.st_dev, after.st_ino, after.st_ctime_ns)
        except (OSError, StoreError) as exc:  # gone, or a link planted in its place
            log.info("blob %s cannot stand behind a link: %s", sha256[:12], exc)
            return None
        if len(self._marks) >= MARKS_CACHE:
            self._marks.clear()
        self._marks[sha256] = (key, marks)
        return marks


def _never(node: Node) -> bool:
    return False
