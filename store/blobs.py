"""Content-addressed blobs and the commit transaction that is the only way in.

A blob is named by the SHA-256 of its bytes and is read-only (0444) once committed.
Bytes reach ``blobs/`` only through :meth:`BlobStore.commit_temp`: private temp file,
fsync, size and SHA-256 check, the digest xattr, chmod, rename, fsync of the directory,
then the immutable flag where the kernel allows it (:mod:`.seal`: the marks a reader
that follows the mount's link to a blob relies on; cleared before a blob is removed or
quarantined). A mismatch goes to ``quarantine/``; a temp whose fsync failed is
discarded, never trusted.

Quarantine keeps one copy per distinct bad content (its name ends in ``sha256-<hex>`` of
the bytes it holds; the same bad bytes again are dropped, not kept twice), within a cap
in bytes that the owner of this object sets (:attr:`BlobStore.quarantine_cap`; the
store's default is the size of its largest model): the oldest copies go first, the
newest is always kept.

Temp files are held under an exclusive ``flock`` for as long as their writer lives, so
:meth:`BlobStore.recover` can tell a stale temp (its writer died, e.g. ``kill -9``)
from one still being written by another process, without trusting pids.

Files another tool already holds (``modelfs adopt``, :mod:`.adopt`) come in through
:meth:`BlobStore.commit_existing`, without a second copy where the file system allows:
a reflink (``FICLONE``: a private file sharing the source's extents, hashed after the
clone, so what is committed is what was hashed), else a hard link to the very inode
that was opened and hashed (made 0444; :mod:`.seal` never makes a shared inode
immutable), else a copy. The caller decides which ways are allowed; this module never
changes a byte of the source, nor renames or deletes it.

This module owns files on disk only; it never touches the catalog.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import secrets
import shutil
import signal
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from . import seal
from .crashpoints import crash_point
from .durable import fsync_dir, fsync_file
from .errors import Conflict, IntegrityError, NotFound, SpaceError, StoreError
from .layout import Layout, check_sha256
from .owner import open_dir, open_file, owner_of
from .partial import PartialFiles

log = logging.getLogger(__name__)

CHUNK = 4 << 20  # 4 MiB: large enough that per-call overhead vanishes beside hashing
FICLONE = 0x40049409  # _IOW(0x94, 9, int): share a whole file's extents (btrfs, XFS, bcachefs…)
#: FICLONE's answers where the file systems cannot share extents (ext4: EOPNOTSUPP;
#: two file systems: EXDEV; some answer EINVAL or ENOTTY).
_NO_REFLINK = (errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EPERM)
#: How a file another tool holds became a blob (:meth:`BlobStore.commit_existing`).
WAYS = ("reflink", "hardlink", "copy")


@dataclass(frozen=True)
class Committed:
    sha256: str
    size: int
    path: Path
    new: bool  # False when identical bytes were already present (dedup)


@dataclass
class RecoveryReport:
    stale_temps: list[str] = field(default_factory=list)  # names removed from tmp/
    freed_bytes: int = 0


def hash_file(path: Path, progress: Callable[[int], None] | None = None) -> tuple[str, int]:
    """SHA-256 and size of a file, read once."""
    h = hashlib.sha256()
    size = 0
    with os.fdopen(open_file(path, os.O_RDONLY), "rb", buffering=0) as f:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
            size += n
            if progress:
                progress(n)
    return h.hexdigest(), size


def hash_fd(fd: int, progress: Callable[[int], None] | None = None) -> tuple[str, int]:
    """SHA-256 and size of an open file, read once from offset 0 (its offset untouched)."""
    h = hashlib.sha256()
    size = 0
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    while n := os.preadv(fd, [buf], size):
        h.update(view[:n])
        size += n
        if progress:
            progress(n)
    return h.hexdigest(), size


def reflink(dst_fd: int, src_fd: int) -> bool:
    """Make ``dst`` share all of ``src``'s extents (``FICLONE``); False where the file
    system cannot (nothing is written then)."""
    try:
        fcntl.ioctl(dst_fd, FICLONE, src_fd)
    except OSError as exc:
        if exc.errno in _NO_REFLINK:
            return False
        raise
    return True


@dataclass(frozen=True)
class Adopted:
    """A file another tool holds, committed: ``how`` is a way of :data:`WAYS`, or
    'present' when the store already held those bytes (nothing was linked or copied)."""
    committed: Committed
    how: str


class Readable(Protocol):
    def readinto(self, buffer: bytearray, /) -> int | None: ...


class TempBlob:
    """A private, locked temp file being filled; hashes what is written."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd
        self.size = 0
        self._hash = hashlib.sha256()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._hash.update(data)
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.fd, view)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise SpaceError("not enough free space in the store", path=str(self.path)) from exc
                raise
            view = view[n:]
            self.size += n

    def copy_from(self, src: Readable, progress: Callable[[int], None] | None = None) -> None:
        """Copy and hash in one pass over ``src``."""
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while n := src.readinto(buf):
            self.write(view[:n])
            crash_point("import-mid-copy")
            if progress:
                progress(n)

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # also releases the flock
            self.fd = -1


class BlobStore:
    #: Whether a commit makes the blob immutable where the kernel allows it: a store's
    #: blobs are read through links by its owner's processes (root ignores modes). A
    #: store of one app's own files (``modelfs.client``'s local cache) says False.
    freeze_blobs = True

    def __init__(self, layout: Layout, *, quarantine_cap: Callable[[], int | None] | None = None) -> None:
        self.layout = layout
        #: How many bytes quarantine may hold (None, or no callable: no cap). Asked only
        #: when something is quarantined.
        self.quarantine_cap = quarantine_cap

    # -- reading ---------------------------------------------------------------
    def path(self, sha256: str) -> Path:
        return self.layout.blob(sha256)

    def has(self, sha256: str) -> bool:
        """A committed blob: a regular file (a link in its place is not one)."""
        try:
            return stat.S_ISREG(os.lstat(self.path(sha256)).st_mode)
        except FileNotFoundError:
            return False

    def marks(self, sha256: str) -> seal.Marks:
        """What the committed blob carries (:mod:`.seal`); FileNotFoundError when it is gone."""
        return seal.marks(self.layout.blob(sha256), sha256)

    def seal(self, sha256: str) -> seal.Marks:
        """Give a committed blob the marks it lacks (one committed before they existed)."""
        return seal.seal(self.layout.blob(sha256), sha256)

    def size(self, sha256: str) -> int:
        try:
            return os.lstat(self.layout.blob(sha256)).st_size
        except FileNotFoundError:
            raise NotFound(f"blob {sha256[:12]} is not in the store", sha256=sha256) from None

    def partial_files(self, sha256: str) -> PartialFiles:
        """Where a download of ``sha256`` keeps its partial bytes (``partial/<sha256>/``).
        A subclass that places its blobs elsewhere (an app-local cache) overrides this
        and :meth:`path`; the Downloader and the Sink ask, never assume."""
        return PartialFiles.in_dir(self.layout.partial / check_sha256(sha256))

    def iter_blobs(self) -> list[str]:
        out = []
        for sub in sorted(self.layout.blobs.iterdir()):
            if sub.is_dir():
                out.extend(sorted(p.name for p in sub.iterdir()))
        return out

    # -- writing ---------------------------------------------------------------
    def new_temp(self) -> TempBlob:
        """A fresh private temp file, flocked until closed."""
        name = f"{os.getpid()}.{secrets.token_hex(8)}.tmp"
        path = self.layout.tmp / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return TempBlob(path, fd)

    def commit_temp(
        self, temp: TempBlob, expected_sha256: str | None = None, expected_size: int | None = None
    ) -> Committed:
        """Make ``temp`` a blob, or quarantine it and raise IntegrityError."""
        try:
            fsync_file(temp.fd)
        except OSError as exc:
            # After a failed fsync the page cache may hold bytes the disk never got.
            self.discard_temp(temp)
            raise StoreError(f"could not flush temp file to disk: {exc.strerror}") from exc
        return self._commit_path(temp.path, temp.sha256, temp.size, expected_sha256, expected_size,
                                 on_done=temp.close)

    def commit_file(self, path: Path, sha256: str, size: int,
                    expected_sha256: str | None = None, expected_size: int | None = None) -> Committed:
        """Commit a file already fsynced and hashed by its writer (a finished download).

        ``path`` must be on the store's filesystem; it is renamed, not copied.
        """
        return self._commit_path(path, sha256, size, expected_sha256, expected_size)

    def _commit_path(self, path: Path, sha256: str, size: int, expected_sha256: str | None,
                     expected_size: int | None, on_done: Callable[[], None] | None = None,
                     before_rename: Callable[[], None] | None = None) -> Committed:
        try:
            if expected_size is not None and size != expected_size:
                q = self.quarantine_path(path, f"size-{size}-expected-{expected_size}", sha256)
                raise IntegrityError(
                    f"size mismatch: got {size} bytes, expected {expected_size}",
                    got=size, expected=expected_size, quarantined=str(q))
            if expected_sha256 is not None and sha256 != expected_sha256:
                q = self.quarantine_path(path, f"sha256-{sha256}", sha256)
                raise IntegrityError(
                    f"SHA-256 mismatch: got {sha256[:16]}…, expected {expected_sha256[:16]}…",
                    got=sha256, expected=expected_sha256, quarantined=str(q))
            dest = self.path(sha256)
            if self.has(sha256):
                path.unlink()
                return Committed(sha256, size, dest, new=False)
            self._blob_dir(dest.parent)
            seal.set_digest(path, sha256)  # while the owner may still write it
            os.chmod(path, 0o444)
            if before_rename is not None:  # the last word before it is a blob (it may raise)
                before_rename()
            crash_point("commit-before-rename")
            os.rename(path, dest)
            fsync_dir(dest.parent)
            if self.freeze_blobs:
                seal.freeze(dest)  # after the rename: an immutable file cannot be renamed
            return Committed(sha256, size, dest, new=True)
        finally:
            if on_done:
                on_done()

    def _blob_dir(self, path: Path) -> None:
        """``blobs/sha256/ab/``: 0700 whatever the umask, and never a link."""
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)
        os.close(open_dir(path))  # refuses a link planted in its place

    def discard_temp(self, temp: TempBlob) -> None:
        with contextlib.suppress(FileNotFoundError):
            temp.path.unlink()
        temp.close()

    def import_file(self, src: Path, progress: Callable[[int], None] | None = None,
                    expected_sha256: str | None = None) -> Committed:
        """Copy ``src`` into the store, hashing in the same pass."""
        need = src.stat().st_size
        self.check_space(need)
        temp = self.new_temp()
        try:
            with open(src, "rb", buffering=0) as f:
                temp.copy_from(f, progress)
        except BaseException:
            self.discard_temp(temp)
            raise
        return self.commit_temp(temp, expected_sha256=expected_sha256, expected_size=need)

    def can_reflink(self) -> bool:
        """Whether the store's file system shares extents (``FICLONE`` between two temps)."""
        a, b = self.new_temp(), self.new_temp()
        try:
            a.write(b"\0" * 4096)
            src = open_file(a.path, os.O_RDONLY)  # FICLONE reads its source: EBADF on a write-only one
            try:
                return reflink(b.fd, src)
            finally:
                os.close(src)
        finally:
            self.discard_temp(a)
            self.discard_temp(b)

    def commit_existing(self, fd: int, ways: tuple[str, ...], *, expected_sha256: str | None = None,
                        expected_size: int | None = None, progress: Callable[[int], None] | None = None,
                        trust_name: bool = True) -> Adopted:
        """Commit the regular file open at ``fd`` (another tool's), trying ``ways`` in order
        (a subset of :data:`WAYS`). Its bytes are hashed once and checked against
        ``expected_sha256``/``expected_size``: a mismatch raises IntegrityError and
        leaves nothing behind (no quarantine: the bytes stay where they are, for their
        tool to deal with). A file whose expected blob is present is not read at all,
        unless ``trust_name`` is False (another user's file): it is hashed then, since
        naming a hash it learnt would otherwise give its cache the store's bytes.

        ``hardlink`` links the very inode ``fd`` holds (``/proc/self/fd``, so no path is
        looked up again) after hashing it, and makes it 0444 (the store's mode: every
        name of the inode has it then). Only for a file its tool never rewrites, on the
        store's file system: the caller's rule; of the store's owner, with no other name
        and that no one else may write (:func:`hardlink_problem`): checked here again, on
        the inode, else the way is not taken. Raises Conflict
        (``reason='needs-copy'``) when no way of ``ways`` could be taken."""
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StoreError("not a regular file")
        if expected_size is not None and st.st_size != expected_size:
            raise IntegrityError(f"size mismatch: {st.st_size} bytes, its cache says {expected_size}",
                                 got=st.st_size, expected=expected_size)
        if expected_sha256 is not None and self.has(expected_sha256):
            held = self.size(expected_sha256)
            if st.st_size != held:  # not those bytes, whatever its name says
                raise IntegrityError(f"size mismatch: {st.st_size} bytes, the store's blob {expected_sha256[:12]} "
                                     f"of that name has {held}", got=st.st_size, expected=held)
            if not trust_name:
                self._check_adopted(hash_fd(fd, progress)[0], expected_sha256)
            return Adopted(Committed(expected_sha256, st.st_size, self.path(expected_sha256), new=False), "present")
        whys: list[str] = []  # why a hard link was not made
        for way in ways:
            if way == "reflink":
                done = self._adopt_reflink(fd, expected_sha256, progress)
            elif way == "hardlink":
                try:
                    done = self._adopt_hardlink(fd, expected_sha256, progress)
                except _NoHardLink as exc:
                    log.info("no hard link to the adopted file: %s", exc)
                    whys.append(str(exc))
                    continue
            elif way == "copy":
                done = self._adopt_copy(fd, st.st_size, expected_sha256, progress)
            else:
                raise ValueError(f"no such way {way!r}")
            if done is not None:
                return done
        why = f" (no hard link: {'; '.join(whys)})" if whys else ""
        raise Conflict(f"it can be taken in only as a copy (--copy){why}", reason="needs-copy")

    @staticmethod
    def _check_adopted(sha256: str, expected: str | None) -> None:
        if expected is not None and sha256 != expected:
            raise IntegrityError(f"SHA-256 mismatch: its bytes hash to {sha256[:16]}…, its cache names "
                                 f"{expected[:16]}…", got=sha256, expected=expected)

    def _adopt_reflink(self, fd: int, expected: str | None, progress: Callable[[int], None] | None) -> Adopted | None:
        temp = self.new_temp()
        try:
            if not reflink(temp.fd, fd):
                self.discard_temp(temp)
                return None
            fsync_file(temp.fd)
            rfd = open_file(temp.path, os.O_RDONLY)
            try:
                sha, size = hash_fd(rfd, progress)  # the clone's bytes: what will be committed
            finally:
                os.close(rfd)
            self._check_adopted(sha, expected)
        except BaseException:
            self.discard_temp(temp)
            raise
        c = self._commit_path(temp.path, sha, size, None, None, on_done=temp.close)
        return Adopted(c, "reflink" if c.new else "present")

    def _adopt_hardlink(self, fd: int, expected: str | None, progress: Callable[[int], None] | None) -> Adopted:
        st = os.fstat(fd)  # the inode itself, now: the plan saw it earlier, by a name
        owner = owner_of(self.layout.root)
        why = (f"owned by uid {st.st_uid}, not by the store's owner (uid {owner})" if st.st_uid != owner
               else hardlink_problem(stat.S_IMODE(st.st_mode), st.st_nlink))
        if why is not None:
            raise _NoHardLink(why)
        # A read lease: granted only while no process has the file open for writing, and
        # broken by the first that opens it so (it waits until the lease is let go). Held
        # from before the hash until the inode is 0444 and the store's, it tells whether
        # anyone could still write the bytes hashed.
        lease = _read_lease(fd)
        if lease is False:
            raise _NoHardLink("another process has it open for writing")
        try:
            return self._link_adopted(fd, stat.S_IMODE(st.st_mode), lease, expected, progress)
        finally:
            if lease:
                _drop_lease(fd)

    def _link_adopted(self, fd: int, mode: int, lease: bool | None, expected: str | None,
                      progress: Callable[[int], None] | None) -> Adopted:
        sha, size = hash_fd(fd, progress)
        self._check_adopted(sha, expected)
        if self.has(sha):
            return Adopted(Committed(sha, size, self.path(sha), new=False), "present")
        path = self.layout.tmp / f"{os.getpid()}.{secrets.token_hex(8)}.link"
        # The link in tmp/ shares the inode: hold its flock so that the recovery pass of
        # another process opening the store meanwhile leaves it alone.
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _NoHardLink("another process holds a lock on it") from None

        def still_alone() -> None:  # 0444 by now: no one may open it for writing any more
            if lease and not _lease_held(fd):
                raise _OpenedForWriting

        try:
            try:
                _link_fd(fd, path)
            except OSError as exc:
                if exc.errno in (errno.EXDEV, errno.EPERM, errno.EACCES, errno.ENOENT, errno.EMLINK):
                    raise _NoHardLink(f"the link failed: {exc.strerror}") from None
                raise
            try:
                c = self._commit_path(path, sha, size, None, None, before_rename=still_alone)
            except _OpenedForWriting:
                os.fchmod(fd, mode)  # as it was: the cache's file, not the store's
                seal.clear_digest(fd)
                path.unlink()
                raise _NoHardLink("another process opened it for writing meanwhile") from None
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
        return Adopted(c, "hardlink" if c.new else "present")

    def _adopt_copy(self, fd: int, size: int, expected: str | None,
                    progress: Callable[[int], None] | None) -> Adopted:
        self.check_space(size)
        temp = self.new_temp()
        try:
            with os.fdopen(os.dup(fd), "rb", buffering=0) as f:
                f.seek(0)
                temp.copy_from(f, progress)
            self._check_adopted(temp.sha256, expected)
        except BaseException:
            self.discard_temp(temp)
            raise
        c = self.commit_temp(temp)
        return Adopted(c, "copy" if c.new else "present")

    def check_space(self, need: int, reserve: int = 64 << 20) -> None:
        st = os.statvfs(self.layout.root)
        free = st.f_bavail * st.f_frsize
        if need + reserve > free:
            raise SpaceError(
                f"not enough free space: need {need} bytes, {free} available in {self.layout.root}",
                need=need, free=free)

    # -- verification and removal -----------------------------------------------
    def quarantine_path(self, path: Path, why: str, content_sha256: str | None = None) -> Path:
        """Move ``path`` (bytes whose SHA-256 is ``content_sha256``) to quarantine; returns
        where those bytes are kept. Bytes already quarantined are not kept twice."""
        if content_sha256 is not None:
            kept = self._quarantined(content_sha256)
            if kept is not None:
                seal.thaw(path)
                path.unlink()
                log.warning("%s holds the same bytes as the quarantined %s; not kept twice", path.name, kept.name)
                return kept
            if not why.endswith(content_sha256):
                why = f"{why}-sha256-{content_sha256}"
        seal.thaw(path)  # a committed blob found corrupt: immutable files cannot move
        dest = self.layout.quarantine / f"{int(time.time())}-{secrets.token_hex(4)}-{why}"
        os.rename(path, dest)
        log.warning("quarantined %s (%s)", path.name, why)
        self._trim_quarantine(dest)
        return dest

    def _quarantined(self, content_sha256: str) -> Path | None:
        suffix = f"sha256-{content_sha256}"
        return next((e for e in self.layout.quarantine.iterdir() if e.name.endswith(suffix) and e.is_file()), None)

    def _trim_quarantine(self, newest: Path) -> None:
        """Remove the oldest copies while quarantine holds more than its cap (never ``newest``)."""
        cap = self.quarantine_cap() if self.quarantine_cap is not None else None
        if cap is None:
            return
        entries = []
        for e in self.layout.quarantine.iterdir():
            with contextlib.suppress(FileNotFoundError):
                st = e.lstat()
                if e.is_file():
                    entries.append((_quarantined_at(e.name), st.st_ctime_ns, e, st.st_size))
        total = sum(n for *_, n in entries)
        for _, _, e, n in sorted(entries):
            if total <= cap:
                break
            if e == newest:
                continue
            e.unlink()
            total -= n
            log.warning("quarantine holds more than its cap of %d bytes: removed its oldest copy %s", cap, e.name)

    def verify(self, sha256: str, progress: Callable[[int], None] | None = None) -> bool:
        """Re-hash a blob. A corrupt blob is moved to quarantine and False returned."""
        path = self.layout.blob(sha256)
        if not self.has(sha256):
            raise NotFound(f"blob {sha256[:12]} is missing", sha256=sha256)
        got, _ = hash_file(path, progress)
        if got == sha256:
            return True
        self.quarantine_path(path, f"corrupt-{sha256}", got)
        return False

    def remove(self, sha256: str) -> int:
        path = self.layout.blob(sha256)
        try:
            size = path.lstat().st_size
            seal.thaw(path)
            path.unlink()
        except FileNotFoundError:
            return 0
        return size

    def recover(self) -> RecoveryReport:
        """Remove temp files whose writer is gone. Never touches partial downloads."""
        report = RecoveryReport()
        me = os.geteuid()
        for entry in sorted(self.layout.tmp.iterdir()):
            st = entry.lstat()
            if st.st_uid != me or not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
                # Only what the owner's writers make is cleaned up: never follow or
                # remove a link or someone else's file.
                log.warning("left %s in tmp/ alone: not a file or directory of the store's owner", entry.name)
                continue
            if stat.S_ISDIR(st.st_mode):
                # An interrupted archive extraction: its writer held no lock on a dir,
                # so it is stale only if its lock file is free.
                lock = entry / ".lock"
                if lock.exists() and not lock_free(lock):
                    continue
                report.freed_bytes += sum(p.lstat().st_size for p in entry.rglob("*")
                                          if p.is_file() and not p.is_symlink())
                shutil.rmtree(entry, ignore_errors=True)  # never follows a link inside
                report.stale_temps.append(entry.name)
                continue
            if not lock_free(entry):
                continue  # a live writer in another process
            try:
                report.freed_bytes += st.st_size
                entry.unlink()
                report.stale_temps.append(entry.name)
            except FileNotFoundError:
                pass
        if report.stale_temps:
            log.warning("removed %d stale temp file(s), %d bytes, left by an interrupted writer",
                        len(report.stale_temps), report.freed_bytes)
        return report


class _NoHardLink(Exception):
    """Why this inode may not be hard-linked after all (the next way is tried)."""


class _OpenedForWriting(Exception):
    """The read lease on a file being hard-linked was broken: someone opened it for writing."""


def _read_lease(fd: int) -> bool | None:
    """Take a read lease (``F_SETLEASE``) on the file open read-only at ``fd``: True,
    held; False, another descriptor has it open for writing now; None, no lease could be
    taken here (leases off, a file system without them): nothing is known then. A
    break is signalled with SIGURG, whose default is to be ignored (SIGIO's would kill)."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETSIG, signal.SIGURG)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EBUSY):
            return False
        log.info("no read lease on the adopted file (%s): whether it is open for writing is unknown", exc.strerror)
        return None
    return True


def _lease_held(fd: int) -> bool:
    """Whether the read lease is still held, unbroken (a break pending reads F_UNLCK)."""
    return int(fcntl.fcntl(fd, fcntl.F_GETLEASE)) == fcntl.F_RDLCK


def _drop_lease(fd: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)


def hardlink_problem(mode: int, nlink: int) -> str | None:
    """Why an inode of these permission bits and link count may not become a blob by a
    hard link (``commit_existing``), or None. Its mode must let no one but its owner
    write it (another user could change the store's bytes through it, or through a
    descriptor opened while they could), carry no setuid, setgid or sticky bit, and its
    cache's name must be its only one (the 0444 it gets would change every other)."""
    if mode & 0o022:
        return f"writable by other users (mode {mode:04o}): they could change the store's bytes through it"
    if mode & 0o7000:
        return f"setuid, setgid or sticky (mode {mode:04o}): not an ordinary file of its cache"
    if nlink != 1:
        return f"it has {nlink} names: making it read-only (0444) would change the others too"
    return None


def _link_fd(fd: int, dest: Path) -> None:
    """A new name for the inode open at ``fd``: ``linkat`` of ``/proc/self/fd/N`` with
    ``AT_SYMLINK_FOLLOW`` (a directory descriptor makes Python call ``linkat``, not
    ``link``, which would link the magic link itself: EXDEV)."""
    proc = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.link(str(fd), dest, src_dir_fd=proc, follow_symlinks=True)
    finally:
        os.close(proc)


def _quarantined_at(name: str) -> int:
    """The unix time at the start of a quarantine entry's name (0 when there is none)."""
    head = name.split("-", 1)[0]
    return int(head) if head.isdigit() else 0


def lock_free(path: Path) -> bool:
    """Whether no live process holds an flock on ``path`` (False when it is missing;
    UnsafeStore when a link stands in its place)."""
    try:
        fd = open_file(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
