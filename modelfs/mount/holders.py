"""Who reads a blob without the mount: the store owner's processes that followed a link.

A reader that followed the mount's link (``links``) holds the blob itself, open or
mapped, and the daemon never hears of it. So ``rm``, ``prune`` and ``status`` look for
such readers where the kernel keeps them: ``/proc/PID/fd`` (each descriptor's target)
and ``/proc/PID/maps`` (each mapping's device, inode and path) of every process of the
owner's uid. ``/proc/PID/map_files`` would name mappings directly, but it needs
CAP_SYS_ADMIN, which the owner lacks. Another uid's process never got a link, and its
``/proc`` entries are closed to the owner anyway.

Only paths inside ``blobs/`` are examined (a readlink of a descriptor, the path
column of a mapping), and a candidate counts when its device and inode are those of a
blob committed now (a blob already removed has no model left to warn about). The mount
daemons are skipped: their descriptors are the FUSE readers', which ``run/open.json``
already names.

No pyfuse3 and no trio here: ``modelfs status`` and ``rm`` call it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from pathlib import Path

from modelfs_store.blobs import BlobStore
from modelfs_store.catalog import FileRecord
from modelfs_store.layout import Layout

from .runstate import OpenFile, daemon_pids, open_files

BlobId = tuple[int, int]  # (st_dev, st_ino)


def blob_ids(blobs: BlobStore) -> dict[BlobId, str]:
    """(device, inode) -> SHA-256 of every committed blob."""
    out: dict[BlobId, str] = {}
    for sha in blobs.iter_blobs():
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(blobs.path(sha))
            out[(st.st_dev, st.st_ino)] = sha
    return out


def scan(ids: dict[BlobId, str], prefix: str, *, uid: int, skip: Iterable[int] = (),
         proc: Path = Path("/proc")) -> dict[str, set[int]]:
    """SHA-256 -> pids of ``uid``'s processes holding that blob open or mapped."""
    found: dict[str, set[int]] = {}
    if not ids:
        return found
    skipped = {*skip, os.getpid()}
    for entry in os.scandir(proc):
        if not entry.name.isdigit() or int(entry.name) in skipped:
            continue
        try:
            if os.stat(entry.path).st_uid != uid:
                continue
            held = _descriptors(entry.path, ids, prefix) | _mappings(entry.path, ids, prefix)
        except OSError:  # gone, or not ours to read
            continue
        for sha in held:
            found.setdefault(sha, set()).add(int(entry.name))
    return found


def _descriptors(base: str, ids: dict[BlobId, str], prefix: str) -> set[str]:
    out = set()
    for fd in os.listdir(f"{base}/fd"):
        link = f"{base}/fd/{fd}"
        try:
            if not os.readlink(link).startswith(prefix):  # never stat what may be a hung mount
                continue
            st = os.stat(link)
        except OSError:
            continue
        if (sha := ids.get((st.st_dev, st.st_ino))) is not None:
            out.add(sha)
    return out


def _mappings(base: str, ids: dict[BlobId, str], prefix: str) -> set[str]:
    out = set()
    with open(f"{base}/maps", "rb") as f:
        for line in f:
            # start-end perms offset major:minor inode path
            fields = line.split(maxsplit=5)
            if len(fields) < 6 or not fields[5].startswith(prefix.encode()):
                continue
            major, _, minor = fields[3].partition(b":")
            key = (os.makedev(int(major, 16), int(minor, 16)), int(fields[4]))
            if (sha := ids.get(key)) is not None:
                out.add(sha)
    return out


def link_readers(blobs: BlobStore, rows: Iterable[tuple[str, int, FileRecord]], *, skip: Iterable[int] = (),
                 proc: Path = Path("/proc")) -> list[OpenFile]:
    """The owner's processes reading blobs outside the mount, one entry per (pid, file
    of a version whose bytes they hold), shaped like ``run/open.json``'s entries."""
    pids = scan(blob_ids(blobs), str(blobs.layout.blobs) + os.sep, uid=os.geteuid(), skip=skip, proc=proc)
    out: list[OpenFile] = []
    for model, version, rec in rows:
        for pid in sorted(pids.get(rec.sha256, ())):
            out.append({"pid": pid, "uid": os.geteuid(), "model": model, "version": version,
                        "filename": rec.filename, "sha256": rec.sha256, "size": rec.size, "via": "link"})
    return out


def readers(layout: Layout, blobs: BlobStore, rows: Iterable[tuple[str, int, FileRecord]]) -> list[OpenFile]:
    """Everything in use: files open through any daemon of the store, then the readers
    that followed a link (the daemons' own descriptors are the first kind's)."""
    return open_files(layout) + link_readers(blobs, rows, skip=daemon_pids(layout))
