"""Mountpoints: telling a live mount from a stale one, recovering a stale one, detaching.

A stale mount is what a killed daemon leaves: the directory answers ENOTCONN. It is
never cleaned up behind the user's back except by the next ``modelfs mount`` (or an
explicit ``unmount``), so a consumer never sees an empty directory it could take for
"no models".
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
from pathlib import Path

from modelfs_store.errors import Conflict, StoreError, UsageError

log = logging.getLogger(__name__)


def lazy_unmount(mountpoint: Path) -> None:
    """Detach a FUSE mount (stale or live) without waiting for its users."""
    for argv in (["fusermount3", "-u", "-z", str(mountpoint)], ["umount", "-l", str(mountpoint)]):
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        except FileNotFoundError:
            continue
        if r.returncode == 0:
            return
        log.debug("%s failed: %s", argv[0], r.stderr.strip())
    raise StoreError(f"could not unmount {mountpoint}; try: fusermount3 -u -z {mountpoint}")


def is_stale(mountpoint: Path) -> bool:
    """A FUSE mount whose daemon is gone. ``stat`` is not enough (the kernel may answer
    it from cached attributes); ``statvfs`` always reaches the daemon."""
    try:
        os.stat(mountpoint)
        if os.path.ismount(mountpoint):
            os.statvfs(mountpoint)
    except OSError as exc:
        return exc.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    return False


def prepare_mountpoint(mountpoint: Path) -> Path:
    """Recover a stale mount, refuse a live one, create a missing directory."""
    if is_stale(mountpoint):
        log.warning("%s is a stale mount (its daemon died); unmounting it lazily", mountpoint)
        lazy_unmount(mountpoint)
    if not mountpoint.exists():
        mountpoint.mkdir(parents=True)
    mountpoint = mountpoint.resolve()
    if not mountpoint.is_dir():
        raise UsageError(f"{mountpoint} is not a directory")
    if os.path.ismount(mountpoint):
        raise Conflict(f"{mountpoint} is already a mount point", mountpoint=str(mountpoint))
    return mountpoint


def fuse_conf_allows_other(path: str = "/etc/fuse.conf") -> bool:
    """Whether a non-root user may mount with ``allow_other`` (``user_allow_other``)."""
    try:
        with open(path) as f:
            return any(line.strip() == "user_allow_other" for line in f)
    except OSError:
        return False


def check_allow_other() -> None:
    """As a user, the kernel lets other uids in only with ``user_allow_other`` in
    /etc/fuse.conf (which belongs to the fuse3 package: modelfs never edits it), or to a
    daemon that mounts with CAP_SYS_ADMIN (a system store's, see ``caps``)."""
    from .caps import CAP_SYS_ADMIN, effective

    if os.geteuid() != 0 and CAP_SYS_ADMIN not in effective() and not fuse_conf_allows_other():
        raise UsageError("--allow-other needs `user_allow_other` in /etc/fuse.conf (ask root to add it; "
                         "modelfs never edits that file), or a system store's daemon started as root")
