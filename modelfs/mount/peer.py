"""Who is at the other end of a control-socket connection: the kernel's word for it,
never a field of the request.

``SO_PEERCRED`` gives the uid, gid and pid of the process that connected, as they were
at ``connect()``. The uid is a boundary as it stands. The pid is only a name, and a
name can be reused once its process is gone, so before an identity read from
``/proc/PID`` (``identity.Resolver``: the app id) is believed, the pid is tied to the
process that connected:

    pidfd   ``SO_PEERPIDFD`` (Linux 6.5 and later) hands over a pidfd of that process.
            After the identity is read, the pidfd must still name a live process with
            the same pid: a pid is not reused while its process lives, so what was read
            was that process's.
    start   Without it, the process behind the pid must have started no later than the
            moment the connection was accepted: a process born after it cannot be the
            one that connected. (A pid reused between connect and accept slips through;
            the pidfd closes that gap, and every kernel this runs on in CI has it.)

An identity that fails either check is not ``sure``: the policy then grants that
caller nothing beyond what any caller gets. No pyfuse3 and no trio here.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import time
from dataclasses import dataclass, replace
from pathlib import Path

from .identity import Identity, Resolver

SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)  # Linux 6.5; Python names it from 3.13 on
_CREDS = struct.Struct("3i")


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int
    pidfd: int | None      # a pidfd of the connecting process (owned: see close())
    accepted: float        # CLOCK_BOOTTIME seconds when the connection was accepted

    @property
    def via(self) -> str:
        return "pidfd" if self.pidfd is not None else "pid+start-time"

    def close(self) -> None:
        if self.pidfd is not None:
            with contextlib.suppress(OSError):
                os.close(self.pidfd)


def peer_of(sock: socket.socket) -> Peer:
    """The credentials of the process at the other end of the unix socket ``sock``."""
    accepted = time.clock_gettime(time.CLOCK_BOOTTIME)
    pid, uid, gid = _CREDS.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDS.size))
    try:
        pidfd: int | None = sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError:  # an older kernel: the start-time check stands in
        pidfd = None
    return Peer(pid, uid, gid, pidfd, accepted)


def pidfd_pid(pidfd: int, proc: Path = Path("/proc")) -> int | None:
    """The pid a pidfd names now: -1 once its process has exited (None: unreadable)."""
    try:
        with open(proc / "self" / "fdinfo" / str(pidfd)) as f:
            for line in f:
                if line.startswith("Pid:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def identify(peer: Peer, resolver: Resolver, *, proc: Path = Path("/proc"),
             ticks: int = os.sysconf("SC_CLK_TCK")) -> Identity:
    """The (uid, app id) of the peer, ``sure`` only if its pid still names the process
    that connected (module docstring)."""
    ident = resolver.identify(peer.pid, peer.uid)
    if not ident.sure:
        return ident
    if peer.pidfd is not None:
        if pidfd_pid(peer.pidfd, proc) != peer.pid:
            return replace(ident, app=None, rule="the process that connected has exited", sure=False)
        return ident
    try:
        started = resolver.start_time(peer.pid) / ticks
    except (OSError, ValueError, IndexError):
        return replace(ident, app=None, rule="process not readable", sure=False)
    if started > peer.accepted:
        return replace(ident, app=None, rule="the pid was reused after the connection", sure=False)
    return ident
