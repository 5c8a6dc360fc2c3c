"""Who is asking: the (uid, app id) identity of a process, found from its pid.

The uid comes from the kernel (the FUSE request) and is a boundary. The app id comes
from the first of these that names one (DESIGN §4):

    flatpak   ``[Application] name`` in ``/proc/PID/root/.flatpak-info``
    snap      the snap name in the process's cgroup v2 path (``snap.NAME.APP.*.scope``)
    systemd   the app id of a desktop-application unit in that path:
              ``app-<id>-<rnd>.scope``, ``app-<launcher>-<id>-<rnd>.scope``,
              ``app-<id>@<rnd>.service`` (``\\x2d`` in a unit name is a '-')
    exe       ``/proc/PID/exe`` is a registered executable (device and inode recorded
              by ``modelfs apps add ID --exe PATH``)
    none      no app id: the process is just its uid

Every one of these can be faked by a process of its own uid (a user namespace with a
``.flatpak-info`` in its root, scopes in its own delegated cgroup subtree, running a
registered binary): an app id means something only together with the uid, and the
policy binds them (``modelfs_store.policy``).

The pid a FUSE request carries is a thread id; the process is its thread group. A pid
of 0 (a request from outside the daemon's pid namespace) or a process that cannot be
read (gone, or another uid's without ptrace rights) gives an identity that is not
``sure``: it fails closed. Identities are cached for a second at most, keyed by
thread-group id *and* process start time, so a reused pid never inherits one.

Beside the app id, an identity says where the process sees the file system from
(:class:`Place`: its root directory and its mount namespace), so the mount can tell
whether an absolute path means to the caller what it means to the daemon (the link
fast path, :mod:`.links`). Reading it needs the same ptrace rights as ``root``; a
process whose place cannot be read has none, and is treated as elsewhere.

No pyfuse3 here: resolving is plain file reading, testable against a fake ``/proc``.
"""

from __future__ import annotations

import configparser
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

CACHE_SECONDS = 1.0
CACHE_SIZE = 4096
MAX_INFO_BYTES = 64 << 10  # a .flatpak-info is a few hundred bytes

_SNAP = re.compile(r"snap\.([a-z0-9](?:[a-z0-9-]*[a-z0-9])?)\.[^/]+\.(?:scope|service)")
_SCOPE = re.compile(r"app-(.+)-[^-]+\.scope")
_SERVICE = re.compile(r"app-(.+?)(?:@[^@]*)?\.service")

#: (device, inode) of a registered executable -> app id
ExeTable = Mapping[tuple[int, int], str]


@dataclass(frozen=True)
class Place:
    """Where a process sees the file system from: its root directory (device, inode, and
    the path ``/proc/PID/root`` names it by, which tells a chroot into a bind mount from
    the real root) and its mount namespace (device and inode of ``/proc/PID/ns/mnt``)."""
    root: tuple[int, int, str]
    mnt: tuple[int, int]


SANDBOX_RULES = frozenset({"flatpak", "snap"})  # app ids that come with a sandbox


@dataclass(frozen=True)
class Identity:
    uid: int
    app: str | None
    rule: str            # 'flatpak', 'snap', 'systemd', 'exe', 'none', or why it is not sure
    pid: int             # the thread-group id the identity was read from (0: unknown)
    sure: bool = True    # False: the process could not be identified; fail closed
    place: Place | None = None  # None: not readable (another uid's process, a vanished one)

    @property
    def sandboxed(self) -> bool:
        return self.rule in SANDBOX_RULES

    def as_dict(self) -> dict[str, object]:
        return {"uid": self.uid, "app": self.app, "rule": self.rule, "pid": self.pid, "sure": self.sure}


def systemd_app_id(unit: str) -> str | None:
    """The app id in a desktop-application unit name, or None."""
    m = _SCOPE.fullmatch(unit) or _SERVICE.fullmatch(unit)
    if m is None:
        return None
    body = m.group(1)
    app = body.rsplit("-", 1)[-1] if "-" in body else body  # app-<launcher>-<id>: the last part
    app = app.replace("\\x2d", "-")
    return app or None


def snap_name(unit: str) -> str | None:
    m = _SNAP.fullmatch(unit)
    return m.group(1) if m else None


def cgroup2_mount(mountinfo: str = "/proc/self/mountinfo") -> Path | None:
    """Where the cgroup v2 hierarchy is mounted (not always /sys/fs/cgroup)."""
    try:
        with open(mountinfo) as f:
            for line in f:
                left, _, right = line.partition(" - ")
                if right.split(" ", 1)[0] == "cgroup2":
                    return Path(left.split(" ")[4])
    except OSError:
        pass
    return None


class Resolver:
    """Identities of processes, read from ``proc`` (injectable for tests)."""

    def __init__(self, exes: ExeTable | None = None, *, proc: Path = Path("/proc"),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.exes: ExeTable = exes or {}
        self.proc = proc
        self.clock = clock
        self._cache: dict[tuple[int, int], tuple[float, Identity]] = {}

    def identify(self, pid: int, uid: int) -> Identity:
        if pid <= 0:
            return Identity(uid, None, "no pid (outside the daemon's pid namespace)", 0, sure=False)
        try:
            start = self.start_time(pid)  # one small read on every request: the cache's key
        except (OSError, ValueError, IndexError):
            return Identity(uid, None, "process not readable", pid, sure=False)
        now = self.clock()
        hit = self._cache.get((pid, start))
        if hit is not None and now - hit[0] < CACHE_SECONDS and hit[1].uid == uid:
            return hit[1]
        try:
            ident = self._read(self._tgid(pid), uid, self.place(pid))
        except (OSError, ValueError, StopIteration):
            return Identity(uid, None, "process not readable", pid, sure=False)
        if len(self._cache) >= CACHE_SIZE:
            self._cache.clear()
        self._cache[(pid, start)] = (now, ident)
        return ident

    def _raw(self, pid: int, name: str) -> bytes:
        fd = os.open(f"{self.proc}/{pid}/{name}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            return os.read(fd, 4096)
        finally:
            os.close(fd)

    def start_time(self, pid: int) -> int:
        """Start time (clock ticks since boot) of the task ``pid``: with the pid, a key no
        reused pid can match (OSError, ValueError or IndexError when it cannot be read)."""
        return int(self._raw(pid, "stat").rsplit(b")", 1)[1].split()[19])  # field 22: starttime

    def _tgid(self, pid: int) -> int:
        """The process (thread group) of the task ``pid``."""
        return next(int(line.split()[1]) for line in self._raw(pid, "status").splitlines()
                    if line.startswith(b"Tgid:"))

    def place(self, pid: int | str) -> Place | None:
        """Where task ``pid`` (or ``"self"``) sees the file system from; None when that
        cannot be read. Read from the task, not its process: a thread may have its own."""
        base = f"{self.proc}/{pid}"
        try:
            root = os.stat(f"{base}/root")
            named = os.readlink(f"{base}/root")
            mnt = os.stat(f"{base}/ns/mnt")
        except OSError:
            return None
        return Place((root.st_dev, root.st_ino, named), (mnt.st_dev, mnt.st_ino))

    def _read(self, tgid: int, uid: int, place: Place | None = None) -> Identity:
        base = self.proc / str(tgid)
        app = self._flatpak(base)
        if app:
            return Identity(uid, app, "flatpak", tgid, place=place)
        unit = self._unit(base)
        if unit:
            if (name := snap_name(unit)) is not None:
                return Identity(uid, name, "snap", tgid, place=place)
            if (app := systemd_app_id(unit)) is not None:
                return Identity(uid, app, "systemd", tgid, place=place)
        try:
            st = os.stat(base / "exe")
        except OSError:
            st = None
        if st is not None and (app := self.exes.get((st.st_dev, st.st_ino))) is not None:
            return Identity(uid, app, "exe", tgid, place=place)
        return Identity(uid, None, "none", tgid, place=place)

    @staticmethod
    def _flatpak(base: Path) -> str | None:
        try:
            fd = os.open(base / "root" / ".flatpak-info", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return None
        with os.fdopen(fd, "rb") as f:
            raw = f.read(MAX_INFO_BYTES + 1)
        if len(raw) > MAX_INFO_BYTES:
            return None
        info = configparser.ConfigParser(interpolation=None, strict=False)
        try:
            info.read_string(raw.decode("utf-8"))
            name = info.get("Application", "name", fallback=None)
        except (configparser.Error, UnicodeDecodeError):
            return None
        return name.strip() or None if name else None

    @staticmethod
    def _unit(base: Path) -> str | None:
        """The last component of the process's cgroup v2 path (its unit)."""
        try:
            with open(base / "cgroup") as f:
                for line in f:
                    if line.startswith("0::"):
                        return line.strip()[3:].rstrip("/").rsplit("/", 1)[-1] or None
        except OSError:
            pass
        return None
