"""Who may open a store, and the state its directories must be in before anything in
it is read or written.

A store belongs to one uid: the owner of its root directory.

    enter(layout)      the caller's uid is the owner's: go on. The caller is root and the
                       store is another user's: drop to that user now (supplementary
                       groups cleared, then gid, then uid, all three ids of each), before
                       anything inside is touched, so a link planted by that user can
                       reach nothing that user could not. Anyone else: NotOwner (exit 7),
                       naming the owner and the way in (the mount).
    secure(layout)     every directory of the layout is a real directory (a symbolic link
                       where one should be is refused, never followed), owned by the
                       owner, mode 0700 (the root may be 0750 when its group is the
                       documented ``modelfs`` group of a system store); the catalog
                       files are regular files, mode 0600. What is missing is created
                       with its mode set explicitly, never left to the umask; looser
                       modes are repaired, and each repair is reported.

Paths inside are opened relative to a directory descriptor with ``O_NOFOLLOW``
(:func:`open_dir`, :func:`open_file`), so a link swapped in later is refused too.
Nothing here reads the catalog or a blob.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import logging
import os
import pwd
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .errors import TrustError
from .layout import Layout

log = logging.getLogger(__name__)

DIR_MODE = 0o700
FILE_MODE = 0o600
SYSTEM_GROUP = "modelfs"          # a system store's root may be 0750 with this group
CATALOG_FILES = ("catalog.db", "catalog.db-wal", "catalog.db-shm")


class NotOwner(TrustError):
    """The caller's uid does not own the store (and is not root)."""


class UnsafeStore(TrustError):
    """Something stands where a store directory or file should be: a link, another
    owner's file, a special file."""


@dataclass
class Secured:
    """What :func:`secure` found and did."""
    owner: int
    repairs: list[str] = field(default_factory=list)    # one line per mode it changed
    created: list[str] = field(default_factory=list)    # directories it made


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def owner_of(root: Path) -> int:
    """The uid that owns the store at ``root`` (its root directory, never a link)."""
    try:
        st = os.lstat(root)
    except FileNotFoundError:
        return os.geteuid()  # a store about to be created is its creator's
    except PermissionError:
        raise NotOwner(f"{root} is not yours to open (permission denied on the way to it); other users reach a "
                       "store's models through its owner's mount (`modelfs mount --allow-other`)",
                       reason="not-owner") from None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise UnsafeStore(f"{root} is not a directory (a symbolic link?); a store root must be one",
                          reason="unsafe-store", path=str(root))
    return st.st_uid


def foreign_owner(root: Path) -> int | None:
    """The owner of ``root`` when this process is root and the store is another user's
    (a program that can restart itself as that user does so, see ``modelfs.cli``);
    else None."""
    if os.geteuid() != 0:
        return None
    uid = owner_of(root)
    return uid if uid != 0 else None


def enter(layout: Layout) -> int:
    """Make this process the store's owner, or refuse; returns the owner's uid."""
    owner = owner_of(layout.root)
    me = os.geteuid()
    if me == owner:
        return owner
    if me == 0:
        drop_privileges(owner, owner_gid(layout.root, owner))
        log.info("store %s belongs to %s: running as that user", layout.root, user_name(owner))
        return owner
    name = user_name(owner)
    raise NotOwner(f"{layout.root} belongs to {name}; only its owner opens the store itself. Other users reach "
                   f"its models through the mount (ask {name} to run `modelfs mount --allow-other`)",
                   reason="not-owner", owner=owner)


def owner_gid(root: Path, uid: int) -> int:
    """The group to run as for ``uid``: its primary group, else the store root's group."""
    try:
        return pwd.getpwuid(uid).pw_gid
    except KeyError:
        return os.lstat(root).st_gid


def drop_privileges(uid: int, gid: int) -> None:
    """Become ``uid``/``gid`` for good: groups cleared first (needs root), gid before uid."""
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.geteuid() != uid or os.getegid() != gid or os.getgroups():
        raise TrustError(f"could not drop privileges to uid {uid}", reason="drop-failed")


# -- descriptors that never follow a link ------------------------------------------------
def open_dir(name: str | Path, dir_fd: int | None = None, *, shown: str | Path | None = None) -> int:
    """A directory descriptor; ELOOP/ENOTDIR (refused) where a link or a file stands."""
    try:
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafeStore(f"{shown or name} is not a directory (a symbolic link?): refusing to use it",
                              reason="unsafe-store", path=str(shown or name)) from None
        raise


def open_file(path: str | Path, flags: int, mode: int = FILE_MODE, dir_fd: int | None = None) -> int:
    """``os.open`` that refuses a symbolic link in the last component (ELOOP -> UnsafeStore)."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeStore(f"{path} is a symbolic link; a store never holds one (planted?): refusing it",
                              reason="unsafe-store", path=str(path)) from None
        raise


def read_small(path: str | Path, limit: int = 1 << 20) -> bytes:
    """The bytes of a small store file (a state, a memory, a run/ file), never through a
    link; FileNotFoundError when it is missing."""
    fd = open_file(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        return os.read(fd, limit)
    finally:
        os.close(fd)


@contextlib.contextmanager
def opened_dir(name: str | Path, dir_fd: int | None = None, *, shown: str | Path | None = None) -> Iterator[int]:
    fd = open_dir(name, dir_fd, shown=shown)
    try:
        yield fd
    finally:
        os.close(fd)


# -- the tree as it must be ------------------------------------------------------------------------
def secure(layout: Layout, owner: int) -> Secured:
    """Create what is missing and check or repair what is there (module docstring)."""
    done = Secured(owner)
    root = layout.root
    if not os.path.lexists(root):
        root.parent.mkdir(parents=True, exist_ok=True)
        _mkdir(root, done)
    # A store being made (no catalog yet: a new or empty directory) gets its modes set
    # quietly; an existing store whose modes drifted is repaired with a warning.
    fresh = not os.path.lexists(layout.catalog)
    with opened_dir(root) as fd:
        _check(fd, str(root), owner, _root_mode(fd), done)
        for rel in ("blobs", "blobs/sha256", "tmp", "partial", "quarantine", "run"):
            _ensure_dir(fd, rel, root, owner, done)
        if os.path.lexists(root / "partial" / "failed"):  # made when first needed (store.failures)
            _ensure_dir(fd, "partial/failed", root, owner, done)
        with opened_dir("blobs/sha256", fd, shown=layout.blobs) as blobs:
            for entry in os.scandir(blobs):
                if entry.is_dir(follow_symlinks=False) or entry.is_symlink():
                    _ensure_dir(blobs, entry.name, layout.blobs, owner, done)
        for name in CATALOG_FILES:
            _ensure_file(fd, name, root, owner, done, create=name == "catalog.db")
    if fresh:
        done.repairs.clear()
    for line in done.repairs:
        log.warning("repaired %s", line)
    return done


def _root_mode(fd: int) -> int:
    st = os.fstat(fd)
    if stat.S_IMODE(st.st_mode) == 0o750 and _group_name(st.st_gid) == SYSTEM_GROUP:
        return 0o750
    return DIR_MODE


def _group_name(gid: int) -> str | None:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return None


def _mkdir(path: Path | str, done: Secured, dir_fd: int | None = None) -> None:
    os.mkdir(path, DIR_MODE, dir_fd=dir_fd)  # the umask can only narrow this; fchmod below widens nothing
    done.created.append(str(path))


def _ensure_dir(parent: int, rel: str, base: Path, owner: int, done: Secured) -> None:
    try:
        fd = open_dir(rel, parent, shown=base / rel)
    except FileNotFoundError:
        _mkdir(rel, done, parent)
        fd = open_dir(rel, parent, shown=base / rel)
    try:
        _check(fd, str(base / rel), owner, DIR_MODE, done)
    finally:
        os.close(fd)


def _ensure_file(parent: int, name: str, base: Path, owner: int, done: Secured, *, create: bool) -> None:
    flags = os.O_RDONLY | os.O_NONBLOCK | (os.O_CREAT if create else 0)
    try:
        fd = open_file(name, flags, FILE_MODE, dir_fd=parent)
    except FileNotFoundError:
        return
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UnsafeStore(f"{base / name} is not a regular file: refusing to use this store",
                              reason="unsafe-store", path=str(base / name))
        _check(fd, str(base / name), owner, FILE_MODE, done)
    finally:
        os.close(fd)


def _check(fd: int, shown: str, owner: int, mode: int, done: Secured) -> None:
    st = os.fstat(fd)
    if st.st_uid != owner:
        raise UnsafeStore(f"{shown} belongs to {user_name(st.st_uid)}, not to the store's owner "
                          f"{user_name(owner)}: refusing to use this store", reason="unsafe-store", path=shown)
    have = stat.S_IMODE(st.st_mode)
    if have != mode:
        os.fchmod(fd, mode)
        done.repairs.append(f"{shown}: mode {have:04o} -> {mode:04o}")
