"""The marks a committed blob carries on disk, for readers that reach it without the mount.

    user.modelfs.sha256   the blob's SHA-256 as an extended attribute, set before the blob
                          is made read-only (the owner may then still write it). A reader
                          that follows the mount's link to the blob sees it there: the
                          kernel refuses ``user.*`` attributes on the link itself.
    immutable             ``FS_IMMUTABLE_FL`` (``chattr +i``), set after the rename into
                          ``blobs/`` where the kernel lets the owner set it (it needs
                          CAP_LINUX_IMMUTABLE: in practice a store owned by root, whose
                          modes root ignores). An immutable file cannot be written,
                          renamed or unlinked by anyone, root included, so it must be
                          cleared (:func:`thaw`) before a blob is removed or quarantined.
                          Never on a shared inode: a blob with other names (a cache blob
                          that ``modelfs adopt`` hard-linked, :mod:`.adopt`) stays
                          without it, so its own tool can still delete its name.

Neither mark is ever trusted for integrity: the SHA-256 check of the commit is what
makes a blob, and a blob may lack both marks (a store from before them, a file system
without xattrs or flags, a crash between the rename and the flag). :func:`seal` adds
what is missing to a blob already committed; the mount does it before it first offers
a link to it. Only this module sets or clears either mark.

Everything here acts on a path inside the store with ``O_NOFOLLOW``; failures to set a
mark are reported as False, never raised (a mark is an optimisation's precondition).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from .owner import open_file

log = logging.getLogger(__name__)

DIGEST_XATTR = "user.modelfs.sha256"
FS_IMMUTABLE_FL = 0x10


def _ioc(direction: int, nr: int) -> int:
    """``_IOR('f', nr, long)`` / ``_IOW``: the size of a C long is in the number."""
    return (direction << 30) | (struct.calcsize("l") << 16) | (ord("f") << 8) | nr


FS_IOC_GETFLAGS = _ioc(2, 1)
FS_IOC_SETFLAGS = _ioc(1, 2)
#: The kernel or the file system has no such flag, or the caller may not set it.
_UNSUPPORTED = (errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM, errno.EACCES, errno.ENOSYS)


@dataclass(frozen=True)
class Marks:
    """What a blob carries. ``digest``: its xattr names its SHA-256, or the file system
    keeps no user xattrs at all (no reader can see one there either)."""
    digest: bool
    immutable: bool


def get_flags(fd: int) -> int:
    return int(struct.unpack_from("i", fcntl.ioctl(fd, FS_IOC_GETFLAGS, bytes(8)))[0])


def _set_flags(fd: int, flags: int) -> None:
    fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("i", flags) + bytes(4))


def _open(path: Path) -> int:
    return open_file(path, os.O_RDONLY | os.O_NONBLOCK)


def set_digest(path: Path, sha256: str) -> bool:
    """Write the digest xattr on a file the owner can still write (a temp before its
    commit). False where the file system keeps no user xattrs."""
    try:
        os.setxattr(path, DIGEST_XATTR, sha256.encode(), follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM, errno.EACCES, errno.ENOSPC, errno.E2BIG):
            log.debug("no %s on %s: %s", DIGEST_XATTR, path.name, exc.strerror)
            return False
        raise
    return True


def clear_digest(fd: int) -> None:
    """Take the digest xattr off a file that did not become a blob after all (a cache's
    file ``modelfs adopt`` gave up hard-linking): its bytes may change now."""
    with contextlib.suppress(OSError):
        os.removexattr(fd, DIGEST_XATTR)


def shared(fd: int) -> bool:
    """Whether the file has names besides the store's: a hard link another tool's cache
    holds too (``modelfs adopt``). The flag would stop that tool deleting its own name
    (``ollama rm``), so such an inode is never made immutable."""
    return os.fstat(fd).st_nlink > 1


def freeze(path: Path) -> bool:
    """Make a committed blob immutable, where the kernel lets this process (never a
    shared inode: False)."""
    fd = _open(path)
    try:
        if shared(fd):
            log.info("%s is shared with another tool's cache: not made immutable", path.name)
            return False
        flags = get_flags(fd)
        if not flags & FS_IMMUTABLE_FL:
            _set_flags(fd, flags | FS_IMMUTABLE_FL)
    except OSError as exc:
        if exc.errno not in _UNSUPPORTED:
            raise
        return False
    finally:
        os.close(fd)
    return True


def thaw(path: Path) -> None:
    """Clear the immutable flag before ``path`` is unlinked or renamed (a no-op for a
    file that does not carry it, or that is gone)."""
    try:
        fd = _open(path)
    except FileNotFoundError:
        return
    try:
        flags = get_flags(fd)
        if flags & FS_IMMUTABLE_FL:
            _set_flags(fd, flags & ~FS_IMMUTABLE_FL)
    except OSError as exc:
        if exc.errno not in _UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def marks(path: Path, sha256: str) -> Marks:
    """The marks the blob at ``path`` carries (FileNotFoundError when it is gone)."""
    fd = _open(path)
    try:
        return Marks(_has_digest(fd, sha256), _immutable(fd))
    finally:
        os.close(fd)


def _has_digest(fd: int, sha256: str) -> bool:
    try:
        return os.getxattr(fd, DIGEST_XATTR) == sha256.encode()
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return True  # nowhere to keep it, and nowhere a reader could look for it
        if exc.errno == errno.ENODATA:
            return False
        raise


def _immutable(fd: int) -> bool:
    try:
        return bool(get_flags(fd) & FS_IMMUTABLE_FL)
    except OSError as exc:
        if exc.errno not in _UNSUPPORTED:
            raise
        return False


def seal(path: Path, sha256: str) -> Marks:
    """Give a committed blob the marks it lacks (a blob from before them): the digest,
    then the immutable flag where allowed (never on a shared inode, see :func:`shared`).
    A read-only blob is made owner-writable only for the moment the xattr is written
    (the owner can write its own files anyway)."""
    fd = _open(path)
    try:
        if not _has_digest(fd, sha256):
            if _immutable(fd):
                _set_flags(fd, get_flags(fd) & ~FS_IMMUTABLE_FL)
            mode = stat.S_IMODE(os.fstat(fd).st_mode)
            try:
                if os.geteuid() != 0:
                    os.fchmod(fd, mode | stat.S_IWUSR)
                with contextlib.suppress(OSError):
                    os.setxattr(fd, DIGEST_XATTR, sha256.encode())
            finally:
                if os.geteuid() != 0:
                    os.fchmod(fd, mode)
        immutable = _immutable(fd)
        if not immutable and not shared(fd):
            with contextlib.suppress(OSError):
                _set_flags(fd, get_flags(fd) | FS_IMMUTABLE_FL)
            immutable = _immutable(fd)
        return Marks(_has_digest(fd, sha256), immutable)
    finally:
        os.close(fd)
