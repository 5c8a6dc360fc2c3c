"""The pyfuse3 operations class: a protocol adapter only.

Inode numbers and names come in, :mod:`modelfs.tree` and :mod:`modelfs.openfiles`
decide, attributes or bytes go out. Every handler is wrapped by :func:`handler`, so
only ``FUSEError`` ever leaves one: store errors go through the one table in
:mod:`modelfs.errnos`, anything unexpected is logged with its traceback and becomes
EIO, and pyfuse3's main loop never dies from a stray exception.

Never ``direct_io`` (it breaks shared mmap); ``keep_cache`` always, because an inode
number pins its bytes (see ``tree``). A file may be answered as a link to its blob
(``links`` decides, through ``tree.Namespace``): ``readlink`` gives its target, and a
lookup that answers a link records the model's use, since the daemon never sees the
reads that follow.

Cached attributes live only as long as the kernel holds the inode: an entry is dropped
when ``forget`` brings the inode's lookup count to zero (or when ``readdir`` could not
hand the entry over), so a daemon that runs for months keeps what the kernel holds,
not every node it has ever shown.
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import pyfuse3

from . import tree
from .errnos import errno_for
from .openfiles import OpenFiles
from .tree import Caller, Namespace, Node

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT
BLKSIZE = 128 << 10  # st_blksize: what cp/cat size their buffers by

#: ``pyfuse3.readdir_reply``'s shape: False when the kernel's reply buffer is full.
ReaddirReply = Callable[[pyfuse3.ReaddirToken, bytes, pyfuse3.EntryAttributes, int], bool]


def handler(fn: F) -> F:
    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except Exception as exc:  # noqa: BLE001 - the one place every error is translated
            raise pyfuse3.FUSEError(errno_for(exc)) from None
    return wrapper  # type: ignore[return-value]


def read_only(fn: F) -> F:
    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EROFS)
    return wrapper  # type: ignore[return-value]


def caller(ctx: pyfuse3.RequestContext) -> Caller:
    return Caller(ctx.uid, ctx.gid, ctx.pid)


class ModelOps(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(self, ns: Namespace, files: OpenFiles, state: Callable[[str], str],
                 readdir_reply: ReaddirReply = pyfuse3.readdir_reply) -> None:
        super().__init__()
        self.ns = ns
        self.files = files
        self.state = state
        self.readdir_reply = readdir_reply  # injectable: the real one needs a kernel's token
        self.uid, self.gid = os.getuid(), os.getgid()
        self._dirs: dict[int, list[tuple[str, Node]]] = {}
        self._dir_fh = itertools.count(1)
        self._attrs: dict[int, tuple[Node, pyfuse3.EntryAttributes]] = {}

    def entry(self, node: Node) -> pyfuse3.EntryAttributes:
        cached = self._attrs.get(node.ino)
        if cached is not None and cached[0] is node:  # nodes are immutable: so is this
            return cached[1]
        a = tree.attr(node)
        e = pyfuse3.EntryAttributes()
        e.st_ino = a.ino
        e.entry_timeout, e.attr_timeout = a.entry_timeout, a.attr_timeout
        e.st_mode, e.st_nlink, e.st_size, e.st_blocks = a.mode, a.nlink, a.size, a.blocks
        e.st_uid, e.st_gid, e.st_blksize = self.uid, self.gid, BLKSIZE
        e.st_atime_ns = e.st_mtime_ns = e.st_ctime_ns = a.mtime_ns
        self._attrs[node.ino] = (node, e)
        return e

    def _uncache_unless_known(self, ino: int) -> None:
        """Drop the cached attributes of ``ino`` once the kernel holds it no more."""
        if ino != tree.ROOT_INODE and not self.ns.lookup_count(ino):
            self._attrs.pop(ino, None)

    # -- metadata ----------------------------------------------------------------
    @handler
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self.ns.lookup(parent_inode, os.fsdecode(name), caller(ctx))
        self.files.note_lookup(node)
        return self.entry(node)

    @handler
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return os.fsencode(self.ns.readlink(inode, caller(ctx)))

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        try:
            self.ns.forget(inode_list)
            for ino, _ in inode_list:
                self._uncache_unless_known(ino)
        except Exception:  # noqa: BLE001 - forget must not raise
            log.exception("forget failed")

    @handler
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self.entry(self.ns.get(inode))

    @handler
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        fh = next(self._dir_fh)
        self._dirs[fh] = self.ns.listing(inode, caller(ctx))
        return fh

    @handler
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        listing = self._dirs[fh]
        for i in range(start_id, len(listing)):
            name, node = listing[i]
            if not self.readdir_reply(token, os.fsencode(name), self.entry(node), i + 1):
                self._uncache_unless_known(node.ino)  # not handed over: the kernel may never ask
                return
            self.ns.remember(node)  # readdirplus: the kernel now holds the inode

    @handler
    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    @handler
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        return tree.xattr(self.ns.get(inode), os.fsdecode(name), self.state)

    @handler
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return [n.encode() for n in tree.xattrs(self.ns.get(inode), self.state)]

    @handler
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        size, files = self.ns.usage(caller(ctx))
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = (size + 4095) // 4096
        s.f_bfree = s.f_bavail = s.f_ffree = s.f_favail = 0
        s.f_files = files
        s.f_namemax = 255
        return s

    # -- data ----------------------------------------------------------------------
    @handler
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & WRITE_FLAGS:
            raise pyfuse3.FUSEError(errno.EROFS)
        node, who = self.ns.get(inode), caller(ctx)
        self.ns.check_visible(node, who)
        fh = await self.files.open(node, who)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True, direct_io=False)

    # pyfuse3's stub says bytes, but its reply takes any buffer: the 'mmap' read mode answers a
    # memoryview of the blob's mapping, with no copy.
    @handler
    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:  # type: ignore[override]
        return await self.files.read(fh, off, size)

    @handler
    async def release(self, fh: int) -> None:
        self.files.release(fh)

    # -- everything that writes: a read-only file system ------------------------------------
    write = read_only(pyfuse3.Operations.write)
    create = read_only(pyfuse3.Operations.create)
    mkdir = read_only(pyfuse3.Operations.mkdir)
    mknod = read_only(pyfuse3.Operations.mknod)
    unlink = read_only(pyfuse3.Operations.unlink)
    rmdir = read_only(pyfuse3.Operations.rmdir)
    rename = read_only(pyfuse3.Operations.rename)
    setattr = read_only(pyfuse3.Operations.setattr)
    setxattr = read_only(pyfuse3.Operations.setxattr)
    removexattr = read_only(pyfuse3.Operations.removexattr)
    symlink = read_only(pyfuse3.Operations.symlink)
    link = read_only(pyfuse3.Operations.link)
