"""Linux capabilities for a system store's daemon: start as root, run as the store's user.

A system store (``/var/lib/modelfs``, owned by a dedicated ``modelfs`` user) is mounted
by a daemon that systemd starts as root, so it can mount with ``allow_other`` without
touching /etc/fuse.conf. Before it opens anything in the store it becomes that user,
keeping exactly:

    CAP_SYS_ADMIN    until the FUSE mount is made (mount(2) of a fuse file system), then
                     dropped: the daemon never mounts again (its own lazy unmount goes
                     through fusermount3, and ``modelfs unmount`` as root detaches it too)
    CAP_DAC_OVERRIDE until the FUSE mount is made, then dropped: /dev/fuse may be
                     root's alone (0600)
    CAP_SYS_PTRACE   for good: reading another uid's ``/proc/PID/root`` and
                     ``/proc/PID/exe`` to find its app id (``identity.py``)

The change of user is followed by a fresh start of the daemon (exec), with the two
capabilities kept as ambient ones: every module the daemon imports later then comes
from where that user can read (a Python installed under /root is not readable to it
once the process is no longer root).

Python has no capset(2); it is called through ctypes. Nothing here runs unless the
daemon was started as root for another user's store.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

from modelfs_store.owner import drop_privileges

CAP_DAC_OVERRIDE = 1
CAP_SYS_PTRACE = 19
CAP_SYS_ADMIN = 21
#: What a system store's daemon holds until its mount is made, and afterwards.
MOUNTING = frozenset({CAP_DAC_OVERRIDE, CAP_SYS_ADMIN, CAP_SYS_PTRACE})
SERVING = frozenset({CAP_SYS_PTRACE})
PR_SET_KEEPCAPS = 8
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def set_caps(caps: frozenset[int], *, inheritable: bool = False) -> None:
    """Make ``caps`` the effective and permitted set (and the inheritable one, if asked)."""
    bits = 0
    for cap in caps:
        bits |= 1 << cap
    inh = bits if inheritable else 0
    lo, hi = bits & 0xFFFFFFFF, bits >> 32
    data = (_Data * 2)(_Data(lo, lo, inh & 0xFFFFFFFF), _Data(hi, hi, inh >> 32))
    _check(_libc().capset(ctypes.byref(_Header(_LINUX_CAPABILITY_VERSION_3, 0)), data), "capset")
    if not inheritable:
        _check(_libc().prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "prctl(PR_CAP_AMBIENT)")


def exec_as(uid: int, gid: int, caps: frozenset[int], argv: list[str]) -> None:
    """Root becomes ``uid``/``gid`` for good and starts ``argv`` again (this Python, through
    a descriptor opened while still root), keeping only ``caps`` as ambient capabilities."""
    libc = _libc()
    exe = os.open(sys.executable, os.O_RDONLY)
    os.set_inheritable(exe, True)
    _check(libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0), "prctl(PR_SET_KEEPCAPS)")
    drop_privileges(uid, gid)
    set_caps(caps, inheritable=True)
    for cap in sorted(caps):
        _check(libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap, 0, 0), "prctl(PR_CAP_AMBIENT_RAISE)")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(f"/proc/self/fd/{exe}", argv)


def effective() -> frozenset[int]:
    """The effective capabilities of this process."""
    with open("/proc/self/status") as f:
        bits = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
    return frozenset(i for i in range(64) if bits >> i & 1)


def names(caps: frozenset[int]) -> str:
    known = {CAP_SYS_PTRACE: "CAP_SYS_PTRACE", CAP_SYS_ADMIN: "CAP_SYS_ADMIN", CAP_DAC_OVERRIDE: "CAP_DAC_OVERRIDE"}
    return ", ".join(known.get(c, f"cap {c}") for c in sorted(caps)) or "none"
