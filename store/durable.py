"""Durability: the one place that says how bytes and names reach the disk for good.

    fsync_file(fd)          the file's data and metadata are on disk
    fsync_dir(path)         a rename or create in ``path`` is on disk
    create_new(path, b)     a new file holding ``b``, never over another or through a link
    atomic_write(path, b)   ``path`` holds exactly ``b`` or its old content, never a mix,
                            after a crash at any point: private temp in the same
                            directory, write, fsync, rename over, fsync of the directory

Every writer of the store that must survive ``kill -9`` or a power cut goes through
these (blob commits, partial checkpoints, archive extraction, key files, the daemon's
``run/`` files). An fsync error is never retried: after one, the page cache may hold
bytes the disk never got, so the caller must treat what it wrote as lost.

This module owns no paths of its own and never touches the catalog.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path


def fsync_file(fd: int) -> None:
    os.fsync(fd)


def fsync_dir(path: Path | str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def create_new(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Create ``path`` (never over an existing file or through a link) holding ``data``,
    durably: written, fsynced, its directory fsynced."""
    _create(path, data, mode)
    fsync_dir(path.absolute().parent)


def _create(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        fsync_file(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` durably. The temp name is unique per writer, so two
    writers of one path never share a temp; the last rename wins whole."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        _create(tmp, data, mode)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
